"""How fast can this CPU multiply one token by cold int8 weights? The decode step's GEMVs, in isolation.

At batch 1 a decode step reads every weight once, from DRAM (the ~100M preset's 72 MB do not fit the cache),
so a GEMV should run at the memory's speed. This times, over ``--layers`` distinct (N, K) int8 weights read
once each per round (together well above the last-level cache):

- ``_weight_int8pack_mm``: bf16 activations × int8 weights, per-channel scales (what w8 lowers to on CPU);
- ``_int_mm``: int8 × int8 → int32, the activation already quantized (what w8a8 lowers to);
- fbgemm ``linear_dynamic``: torch.ao's dynamic int8 linear, activation quantized inside;
- an inductor-generated GEMV: ``(x * w.float()).sum(-1) * s`` compiled, all layers in one graph;
- reading the same bytes as int64 and summing them: what the memory gives a simple stream.

GB/s = int8 weight bytes / median time over ``--rounds`` rounds.

    python benchmarks/gemv_probe.py [--layers 48] [--n 2048] [--k 768] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def gbps(fn: Callable[[], object], nbytes: int, rounds: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n, k, layers = args.n, args.k, args.layers
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(layers)]
    scales = [torch.rand(n).bfloat16() / 50 for _ in range(layers)]
    x, qx = torch.randn(1, k).bfloat16(), torch.randint(-127, 128, (1, k), dtype=torch.int8)
    nbytes = layers * n * k

    def gemv(x: torch.Tensor, *operands: torch.Tensor) -> list[torch.Tensor]:
        return [((x.float() * w.float()).sum(-1) * s.float()).to(x.dtype)
                for w, s in zip(operands[:layers], operands[layers:])]

    compiled = torch.compile(gemv, dynamic=False)
    dynamic = [torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False) for _ in range(layers)]
    xf = x.float()
    cases = {
        "_weight_int8pack_mm (bf16 x)": lambda: [torch.ops.aten._weight_int8pack_mm(x, w, s)
                                                 for w, s in zip(weights, scales)],
        "_int_mm (int8 x)": lambda: [torch._int_mm(qx, w.t()) for w in weights],
        "fbgemm linear_dynamic (torch.ao)": lambda: [layer(xf) for layer in dynamic],
        "inductor GEMV, one graph": lambda: compiled(x, *weights, *scales),
        "int64 sum of the same bytes": lambda: [w.view(torch.int64).sum() for w in weights],
    }
    print(f"{layers} cold {n}x{k} int8 weights ({nbytes / 1e6:.0f} MB), M=1, {args.threads} threads, "
          f"median of {args.rounds}; torch {torch.__version__}\n")
    print("| kernel | GB/s |\n|---|---:|")
    with torch.inference_mode():
        for label, fn in cases.items():
            print(f"| {label} | {gbps(fn, nbytes, args.rounds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
