"""What does each quantization recipe cost in accuracy? Held-out perplexity of the bundled LM per recipe.

Perplexity over 64 windows of 128 bytes (8 KiB) of the bundled held-out text — the same measure the accuracy
tests assert bounds on (tests/passes/quantize/test_quantize_bundled.py) — with calibration on the bundled
calibration text (training data, never the held-out text). Deterministic: no timing, so the machine's load
does not matter.

    python benchmarks/accuracy.py [--only PATTERN]
"""

from __future__ import annotations

import argparse
import fnmatch
import time

import torch

from passforge.eval.perplexity import perplexity
from passforge.ir.capture import capture
from passforge.ir.graph import param_stats
from passforge.models.bundled import calib_text, eval_text, load_tiny_lm
from passforge.models.tokenizer import encode
from passforge.passes.base import Context
from passforge.passes.manager import PassManager

RECIPES = {
    "bf16": "cleanup,cast(dtype=bf16)",
    "w8": "cleanup,quantize(scheme=w8),fold-quant",
    "w8 + gptq": "cleanup,quantize(scheme=w8),gptq,fold-quant",
    "w8a8 (dynamic, per token)": "cleanup,quantize(scheme=w8a8),fold-quant",
    "w8a8 (dynamic, per token), lm_head too": "cleanup,quantize(scheme=w8a8,skip=''),fold-quant",
    "w8a8-static minmax": "cleanup,quantize(scheme=w8a8-static),fold-quant",
    "w8a8-static moving-average": "cleanup,quantize(scheme=w8a8-static,observer=moving-average),fold-quant",
    "w8a8-static percentile 99.99": "cleanup,quantize(scheme=w8a8-static,observer=percentile),fold-quant",
    "w8a8-static mse": "cleanup,quantize(scheme=w8a8-static,observer=mse),fold-quant",
    "w8a8-static entropy": "cleanup,quantize(scheme=w8a8-static,observer=entropy),fold-quant",
    "smooth-quant + w8a8-static minmax": "cleanup,smooth-quant,quantize(scheme=w8a8-static),fold-quant",
    "smooth-quant + w8a8-static minmax, lm_head too":
        "cleanup,smooth-quant,quantize(scheme=w8a8-static,skip=''),fold-quant",
    # the prefill benchmark's pipeline, run through the lowered int8 kernels (oneDNN's u8 linear on VNNI CPUs)
    "bf16 + fuse-attention + smooth-quant + w8a8-static minmax, lm_head too, lowered":
        "cleanup,fuse-attention,cast(dtype=bf16),smooth-quant,quantize(scheme=w8a8-static,skip=''),fold-quant,"
        "lower-quant",
    "smooth-quant(search) + w8a8-static minmax":
        "cleanup,smooth-quant(search=true),quantize(scheme=w8a8-static),fold-quant",
    "smooth-quant + w8a8-static entropy":
        "cleanup,smooth-quant,quantize(scheme=w8a8-static,observer=entropy),fold-quant",
    "fp8 (e4m3, per-token activations)": "cleanup,quantize(scheme=fp8),fold-quant",
    "w4 g128 round-to-nearest": "cleanup,quantize(scheme=w4,group_size=128),fold-quant",
    "w4 g128 + gptq": "cleanup,quantize(scheme=w4,group_size=128),gptq,fold-quant",
    "w4 g128 + gptq, lm_head too": "cleanup,quantize(scheme=w4,group_size=128,skip=''),gptq,fold-quant",
    "w4 g32 round-to-nearest": "cleanup,quantize(scheme=w4,group_size=32),fold-quant",
    "w4 g32 + gptq": "cleanup,quantize(scheme=w4,group_size=32),gptq,fold-quant",
}


def held_out_ppl(model_fn, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return perplexity(model_fn, ids, seq_len=128, batch_size=1, max_windows=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="*", help="glob over recipe names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_tiny_lm()
    ids = torch.tensor(encode(eval_text()[:16384]))
    calib = torch.tensor(encode(calib_text()))
    example = (ids[:128][None],)
    fp32 = held_out_ppl(model, ids)
    base_bytes = param_stats(capture(model, example))[1]
    print(f"bundled tiny LM, held-out perplexity fp32 {fp32:.4f}\n")
    print("| recipe | ppl | vs fp32 | weights vs fp32 | pass time s | pipeline |\n|---|---|---|---|---|---|")
    for label, spec in RECIPES.items():
        if not fnmatch.fnmatch(label, args.only):
            continue
        gm = capture(model, example)
        start = time.perf_counter()
        out = PassManager.parse(spec).run(gm, Context(example_inputs=example, calib_tokens=calib)).graph
        seconds = time.perf_counter() - start
        ppl = held_out_ppl(out, ids)
        size = param_stats(out)[1] / base_bytes
        print(f"| {label} | {ppl:.4f} | {100 * (ppl / fp32 - 1):+.2f}% | {size:.2f}x | {seconds:.1f} | `{spec}` |",
              flush=True)


if __name__ == "__main__":
    main()
