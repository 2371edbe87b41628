"""What does a sliding window cost in accuracy? Held-out perplexity of the bundled LM after
``fuse-attention,local-attention(window=W,sinks=S)`` against full attention.

The bundled LM was trained on 256-token windows; perplexity is measured on its held-out text in non-overlapping
256-token windows (every window's later tokens see at most W earlier ones, plus the first S). Rows for several
windows, with and without attention sinks. The graph is captured once and each pipeline runs on it with
verification off (the pass is lossy by design).

    python benchmarks/local_attention.py [--windows 16,32,64,128] [--sinks 0,4]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from passforge.eval.perplexity import perplexity
from passforge.ir.capture import capture
from passforge.models.registry import resolve
from passforge.passes.base import Context
from passforge.passes.manager import PassManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="16,32,64,128")
    parser.add_argument("--sinks", default="0,4")
    args = parser.parse_args()
    source = resolve("tiny-lm", seq_len=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(source.module, source.example_inputs, name=source.name)
    tokens = torch.tensor(source.encode(source.eval_text), dtype=torch.long)
    ctx = Context(example_inputs=source.example_inputs)

    def ppl(graph: torch.fx.GraphModule) -> float:
        with torch.inference_mode():
            return perplexity(graph, tokens, seq_len=256, batch_size=1)

    full = ppl(PassManager.parse("fuse-attention", hooks=[]).run(gm, ctx).graph)
    print(f"# bundled LM, held-out text, 256-token windows; full attention ppl {full:.4f}")
    print("| window | sinks | ppl | vs full |")
    print("|---:|---:|---:|---:|")
    for window in (int(w) for w in args.windows.split(",")):
        for sinks in (int(s) for s in args.sinks.split(",")):
            spec = f"fuse-attention,local-attention(window={window},sinks={sinks})"
            value = ppl(PassManager.parse(spec, hooks=[]).run(gm, ctx).graph)
            print(f"| {window} | {sinks} | {value:.4f} | {100 * (value / full - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
