"""Where a 512-token prefill spends its time: inductor bf16 against passforge's best prefill pipeline through
the torch.compile backend (``STATIC_HEAD`` of ``benchmarks/compile.py``), both on llama-100m in bf16, profiled
with ``torch.profiler`` and each op's self time summed into a few categories: the GEMMs (bf16 ``mm`` / oneDNN's
int8 linear / ``_int_mm``), SDPA, inductor's generated kernels (norms, quantizers, RoPE, SiLU, the logits' fp32
copy), passforge's ops around them (the Python side of a custom op), inductor's wrapper, everything else.

Profiling adds overhead to every op, so the ms are inflated for calls that do little; compare categories, and
take latencies from ``benchmarks/compile.py``.

    python benchmarks/prefill_profile.py [--runs 5] [--default-allocator]
"""

from __future__ import annotations

import argparse
import collections
import copy
import logging

import torch
from compile import STATIC_HEAD, calibration_ids
from quant import set_allocator
from torch.profiler import profile

from passforge.models.llama import build

GEMMS = ("qlinear", "aten::mm", "aten::addmm", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm")


def category(name: str) -> str:
    if any(g in name for g in GEMMS):
        return "GEMMs"
    if "flash_attention" in name:
        return "SDPA"
    if name.startswith("graph_"):
        return "inductor's kernels"
    if name.startswith("passforge::"):
        return "passforge ops (Python side)"
    if "CompiledFxGraph" in name:
        return "inductor's wrapper"
    return "other ATen calls"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="profiled prefills per model (averaged)")
    parser.add_argument("--default-allocator", action="store_true", help="as in benchmarks/quant.py")
    args = parser.parse_args()
    print(set_allocator(args.default_allocator))
    logging.disable(logging.WARNING)
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's kernels appear by name
    torch.manual_seed(0)
    model = build("llama-100m").eval().to(torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (1, 512))
    calib = calibration_ids()
    compiled = {
        "inductor bf16": torch.compile(copy.deepcopy(model), options={"freezing": True}),
        "passforge STATIC_HEAD": torch.compile(model, backend="passforge",
                                               options={"pipeline": STATIC_HEAD, "inductor": True,
                                                        "calib_data": calib}),
    }
    print(f"# llama-100m bf16, prefill 512, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"ms per prefill (self time, averaged over {args.runs} profiled runs)\n")
    totals: dict[str, collections.Counter] = {}
    with torch.inference_mode():
        for label, fn in compiled.items():
            fn(tokens)
            fn(tokens)
            with profile() as prof:
                for _ in range(args.runs):
                    fn(tokens)
            counter: collections.Counter = collections.Counter()
            for event in prof.key_averages():
                counter[category(event.key)] += event.self_cpu_time_total / 1e3 / args.runs
            totals[label] = counter
    names = sorted({name for counter in totals.values() for name in counter})
    print("| category | " + " | ".join(totals) + " |\n|---|" + "---:|" * len(totals))
    for name in [*names, "total"]:
        cells = [sum(c.values()) if name == "total" else c[name] for c in totals.values()]
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |")


if __name__ == "__main__":
    main()
