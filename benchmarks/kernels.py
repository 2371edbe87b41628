"""Are passforge's integer GEMM kernels faster than their references and than a bf16 GEMM on this device?

For each distinct (K, N) of a LLaMA preset's linear layers (``llama-100m``, ``llama-7b``) and M tokens — decode
(1, 4, 16) and prefill (512) — it times, with bf16 activations:

- ``bf16 mm``: ``torch.mm`` on a bf16 weight (cuBLAS on CUDA, oneDNN on CPU), the float baseline;
- ``w8`` / ``w8a8`` / ``w8a8-static`` / ``w4``: passforge's op (``int8_weight_linear``, ``int8_dynamic_linear``,
  ``int8_static_linear`` with one calibrated scale and zero point for x, ``int4_weight_linear`` with groups of
  128) as it runs on this device — the Triton kernel on CUDA, PyTorch's aten kernel on CPU
  (``passforge.kernels.ops.backend`` names it in the header) — and its reference, the fake-quant graph's ops
  (dequantize, then the float GEMM). ``err``: max |op - reference| / max |reference|. On CUDA also ``fp8``
  (``fp8_linear``: ``torch._scaled_mm`` from compute capability 8.9 on).

After each preset's table, one line compares w8a8-static with w8a8 (dynamic): the geometric mean of their time
ratio over the shapes and token counts, at decode (M <= 16) and at prefill.

Times are medians in ms: on CUDA ``triton.testing.do_bench`` (L2 flushed before each call, as weights streamed
from HBM are in decode), round-robin wall time on CPU (``interleaved_latency_ms``). The first call of each CUDA
shape autotunes; that is not timed. ``do_bench`` times each call from the host, launches included, and at
decode shapes the launches (a custom op's Python dispatch, the autotuner's lookup) can outweigh the kernel;
``--timer graph`` times the GPU's work alone: the calls replayed from a CUDA graph, each after an L2 flush,
less the flushes' own time (``cuda_graph_ms``).

    python benchmarks/kernels.py [--quick] [--device cuda|cpu] [--threads N] [--timer launch|graph]
                                 [--presets llama-7b,llama-100m]

``--quick``: M in (1, 16, 512) and, on CPU, only ``llama-100m`` (a 7B prefill GEMM takes seconds on a laptop CPU).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from passforge.kernels.fp8 import fp8_scale, quantize_fp8
from passforge.kernels.ops import (
    backend,
    fp8_linear_reference,
    int4_weight_linear_reference,
    int8_dynamic_linear_reference,
    int8_static_linear_reference,
    int8_weight_linear_reference,
)
from passforge.models.llama import PRESETS, LlamaConfig
from passforge.passes.quantize.observers import int8_affine_qparams
from passforge.runtime.profile import interleaved_latency_ms

GROUP_SIZE = 128
DECODE, PREFILL = (1, 4, 16), (512,)
OP_OF = {"w8": "int8_weight_linear", "w8a8": "int8_dynamic_linear", "w8a8-static": "int8_static_linear",
         "w4": "int4_weight_linear", "fp8": "fp8_linear"}
X_SCALE, X_ZERO_POINT = int8_affine_qparams(-4.0, 4.0)  # a calibrated range for N(0, 1) activations


def schemes(device: torch.device) -> tuple[str, ...]:
    """fp8 only on CUDA: elsewhere ``fp8_linear`` runs its reference (CPU ``_scaled_mm`` is an emulation)."""
    return ("w8", "w8a8", "w8a8-static", "w4") + (("fp8",) if device.type == "cuda" else ())


def linear_shapes(cfg: LlamaConfig) -> list[tuple[int, int]]:
    """Distinct (K, N) of one block's linears: q/o, k/v (grouped-query heads), gate/up, down."""
    head_dim = cfg.dim // cfg.n_heads
    shapes = [(cfg.dim, cfg.dim), (cfg.dim, cfg.n_kv_heads * head_dim), (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)]
    return list(dict.fromkeys(shapes))


def operands(k: int, n: int, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random weights of each scheme for a (N, K) layer (seeded: every run times the same data)."""
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / 100
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    group_scales = torch.rand(n, k // GROUP_SIZE, generator=g) / 100
    zero_points = torch.randint(0, 16, group_scales.shape, generator=g, dtype=torch.int32)
    float_weight = torch.randn(n, k, generator=g)
    fp8_scales = fp8_scale(float_weight)  # (N, 1)
    weights = {"w8": (w8, scales), "w4": (packed, group_scales, zero_points),
               "fp8": (quantize_fp8(float_weight, fp8_scales), fp8_scales)}
    return {name: tuple(t.to(device) for t in tensors) for name, tensors in weights.items()}


def calls(
    x: torch.Tensor, weights: dict[str, tuple[torch.Tensor, ...]], timed: tuple[str, ...]
) -> dict[str, Callable[[], torch.Tensor]]:
    """The baseline, and each scheme in ``timed`` with its reference."""
    ops = torch.ops.passforge
    (w8, scales), (packed, group_scales, zero_points) = weights["w8"], weights["w4"]
    (fp8, fp8_scales), static = weights["fp8"], (X_SCALE, X_ZERO_POINT)
    bf16_weight = w8.to(torch.bfloat16) * scales.to(torch.bfloat16)[:, None]  # (N, K), as nn.Linear stores it
    fns = {
        "bf16 mm": lambda: torch.mm(x, bf16_weight.t()),
        "w8": lambda: ops.int8_weight_linear(x, w8, scales, None),
        "w8 ref": lambda: int8_weight_linear_reference(x, w8, scales, None),
        "w8a8": lambda: ops.int8_dynamic_linear(x, w8, scales, None),
        "w8a8 ref": lambda: int8_dynamic_linear_reference(x, w8, scales, None),
        "w8a8-static": lambda: ops.int8_static_linear(x, *static, w8, scales, None),
        "w8a8-static ref": lambda: int8_static_linear_reference(x, *static, w8, scales, None),
        "w4": lambda: ops.int4_weight_linear(x, packed, group_scales, zero_points, GROUP_SIZE, None),
        "w4 ref": lambda: int4_weight_linear_reference(x, packed, group_scales, zero_points, GROUP_SIZE, None),
        "fp8": lambda: ops.fp8_linear(x, fp8, fp8_scales, None),
        "fp8 ref": lambda: fp8_linear_reference(x, fp8, fp8_scales, None),
    }
    return {name: fn for name, fn in fns.items() if name == "bf16 mm" or name.removesuffix(" ref") in timed}


def cuda_graph_ms(fn: Callable[[], torch.Tensor], calls: int = 20, replays: int = 7) -> float:
    """GPU time of one call of ``fn`` without its host-side launch cost: ``calls`` calls, each after an L2 flush,
    captured in one CUDA graph and replayed; the same graph of flushes alone is subtracted. NaN where ``fn``
    cannot be captured (it synchronises with the host)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any GPU's L2

    def replay_ms(body: Callable[[], object]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                body()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return sorted(times)[len(times) // 2]

    try:
        with torch.inference_mode():
            return max(replay_ms(fn) - replay_ms(lambda: None), 0.0)
    except RuntimeError:  # capture refused: the call synchronises or allocates on the host's say
        torch.cuda.synchronize()
        return math.nan


def time_ms(
    fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, quick: bool, timer: str = "launch"
) -> dict[str, float]:
    if device.type == "cuda":
        if timer == "graph":
            return {name: cuda_graph_ms(fn) for name, fn in fns.items()}
        import triton.testing

        return {name: triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                              return_mode="median") for name, fn in fns.items()}
    medians = interleaved_latency_ms(list(fns.values()), device=device, repeats=3 if quick else 7, warmup=1,
                                     min_total_s=0.05 if quick else 0.2)
    return dict(zip(fns, medians))


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).abs().max() / expected.float().abs().max())


def static_vs_dynamic(ratios: dict[int, list[float]]) -> str:
    """One line: w8a8-static time / w8a8 time, geometric mean at decode (M <= 16) and prefill token counts."""

    def geomean(values: list[float]) -> float:
        return math.exp(sum(map(math.log, values)) / len(values))

    parts = []
    for label, keep in (("decode", lambda m: m <= 16), ("prefill", lambda m: m > 16)):
        values = [r for m, rs in ratios.items() if keep(m) for r in rs]
        if values:
            parts.append(f"{label} {geomean(values):.2f}x")
    return "w8a8-static / w8a8 (dynamic) time, geometric mean: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (the GPU check uses it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--timer", choices=("launch", "graph"), default="launch",
                        help="CUDA: per call from the host (launch) or replayed from a CUDA graph (graph)")
    parser.add_argument("--presets", default="", help="comma-separated presets, in this order (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = ["llama-100m"] if args.quick and device.type == "cpu" else ["llama-100m", "llama-7b"]
    if args.presets:
        presets = args.presets.split(",")
    if args.timer == "graph" and device.type != "cuda":
        parser.error("--timer graph needs CUDA")
    tokens = (1, 16, 512) if args.quick else DECODE + PREFILL
    timed = schemes(device)

    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    implementations = ", ".join(f"{s}: {backend(OP_OF[s], probe, (4096, 4096), GROUP_SIZE)}" for s in timed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; bf16 activations; w4 groups of {GROUP_SIZE}; {implementations};"
          f" timer: {args.timer if device.type == 'cuda' else 'wall'}")
    header = "| model | K | N | M | bf16 mm ms | " + " | ".join(f"{s} ms | {s} ref ms | {s} err" for s in timed) + " |"
    for preset in presets:
        print(f"\n{header}\n" + "|---" * (5 + 3 * len(timed)) + "|")
        ratios: dict[int, list[float]] = {}
        for k, n in linear_shapes(PRESETS[preset]):
            weights = operands(k, n, device)
            for m in tokens:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, torch.bfloat16)
                fns = calls(x, weights, timed)
                with torch.inference_mode():
                    outputs = {label: fn() for label, fn in fns.items()}  # also the warm-up: autotune, prepack
                times = time_ms(fns, device, args.quick, args.timer)
                ratios.setdefault(m, []).append(times["w8a8-static"] / times["w8a8"])
                cells = [f"{times['bf16 mm']:.4f}"]
                for s in timed:
                    error = relative_error(outputs[s], outputs[f"{s} ref"])
                    cells += [f"{times[s]:.4f}", f"{times[f'{s} ref']:.4f}", f"{error:.1e}"]
                print(f"| {preset} | {k} | {n} | {m} | " + " | ".join(cells) + " |", flush=True)
        print(f"\n{preset}: {static_vs_dynamic(ratios)}", flush=True)


if __name__ == "__main__":
    main()
