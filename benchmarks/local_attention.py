"""What does a sliding window cost in accuracy, and what does it save in decode? Held-out perplexity of the bundled
LM after ``fuse-attention,local-attention(window=W,sinks=S)`` against full attention; with ``--decode``, the
~100M preset's decode cache size and tokens/s with and without the window.

The bundled LM was trained on 256-token windows; perplexity is measured on its held-out text in non-overlapping
256-token windows (every window's later tokens see at most W earlier ones, plus the first S). Rows for several
windows, with and without attention sinks. The graph is captured once and each pipeline runs on it with
verification off (the pass is lossy by design).

``--decode``: llama-100m (random weights, max_seq_len 2048) optimized with ``cleanup,fuse-attention,cast`` and
the same plus ``local-attention(window=256,sinks=4)``; ``generate()`` (which gives the windowed decode step a
ring cache of sinks + window slots) from a 64-token prompt, tokens/s of the decode loop, medians of rounds run
alternately; cache MiB is the k + v cache the decode step takes.

    python benchmarks/local_attention.py [--windows 16,32,64,128] [--sinks 0,4] [--decode] [--new-tokens 64]
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
    parser.add_argument("--decode", action="store_true", help="the llama-100m decode table instead")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.decode:
        decode_table(args.new_tokens, args.repeats)
        return
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


def decode_table(new_tokens: int, repeats: int) -> None:
    import statistics

    from passforge.api import optimize
    from passforge.models.llama import build
    from passforge.runtime.kv_cache import ring_kv_cache

    model = build("llama-100m").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    rows = {
        "full attention": "cleanup,fuse-attention,cast(dtype=bf16)",
        "local-attention(window=256,sinks=4)": "cleanup,fuse-attention,local-attention(window=256,sinks=4),"
        "cast(dtype=bf16)",
    }
    built = {}
    for label, spec in rows.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize(model, (prompt,), pipeline=spec, profile=False, seq_len=64)
        opt.generate(prompt, 2)  # builds the generator (ring cache, in-place updates) outside the timing
        decode, _, _ = ring_kv_cache(opt.decode)  # the decode graph generate() runs
        cache = decode.graph.find_nodes(op="placeholder")[2].meta["val"]
        built[label] = (opt, 2 * cache.numel() * cache.element_size() / 2**20)
    rates: dict[str, list[float]] = {label: [] for label in built}
    for _ in range(repeats):
        for label, (opt, _) in built.items():
            _, stats = opt.generate(prompt, new_tokens)
            rates[label].append(stats.decode_tokens_per_s)
    print(f"\n# llama-100m decode, bf16, prompt 64, {new_tokens} new tokens, {torch.get_num_threads()} threads")
    print("| attention | decode cache MiB | decode tok/s (median) |")
    print("|---|---:|---:|")
    for label, (_, mib) in built.items():
        print(f"| {label} | {mib:.1f} | {statistics.median(rates[label]):.1f} |")


if __name__ == "__main__":
    main()
