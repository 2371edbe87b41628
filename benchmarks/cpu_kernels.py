"""Which CPU kernel should passforge lower a quantized linear to? Every int8 / int4 / float GEMM that torch offers
on x86, timed on the linear shapes of a LLaMA preset at decode (M=1) and prefill (M=512) sizes.

Each candidate computes ``y = x @ W.T`` for the same fp32 ``x`` (M, K) and ``W`` (N, K); weight quantization and
prepacking happen before timing (a graph pass does them once). Rows marked "(part)" time one piece of a candidate
(activation quantization alone, or the GEMM alone on pre-quantized activations) to split its cost. All candidates
of one shape are timed round-robin, so machine noise hits them alike; figures are medians. The table sums each
candidate over the model's linears (``n_layers`` × q/k/v/o/gate/up/down + lm_head), which is what a prefill or a
decode step spends in them. ``rel err`` is ``‖y − y_fp32‖ / ‖y_fp32‖``, the largest over shapes: a wrongly
called kernel shows.

``benchmarks/kernels.py`` times passforge's own ops against their references on any device; this survey is the
CPU side of choosing which kernels those ops should call.

    python benchmarks/cpu_kernels.py [--model llama-100m] [--m 1,512] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import passforge.kernels.ops  # noqa: F401 - registers torch.ops.passforge.*
from passforge.models.llama import PRESETS, LlamaConfig
from passforge.runtime.profile import interleaved_latency_ms

qd = torch.ops.quantized_decomposed
INT4_GROUP = 128


@dataclass(frozen=True)
class Candidate:
    """A way to compute the linear: ``prepare(x, w)`` does the offline work and returns the timed call."""

    name: str
    prepare: Callable[[Tensor, Tensor], Callable[[], Tensor]]
    weight_bits: float  # bits per weight element streamed per call (scales excluded)
    part: bool = False  # times a piece of a linear, not a whole one


def per_channel_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8, as ``quantize(scheme=w8)`` stores weights: (int8 (N, K), scales (N,))."""
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def per_token_quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """passforge's w8a8 activation quantization (``int8_dynamic_linear``'s first two calls)."""
    scales, zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    return qd.quantize_per_token(x, scales, zero_points, -128, 127, torch.int8), scales, zero_points


def per_tensor_quantize_u8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per-tensor uint8 activations, what oneDNN's qlinear (and fbgemm, inside its op) consume; eager
    ops here, one fused kernel under inductor."""
    low, high = x.aminmax()
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero_point = torch.round(-low / scale).to(torch.int32)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255).to(torch.uint8), scale, zero_point


def int4_tinygemm(w: Tensor) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP along K, packed for ``_weight_int4pack_mm_for_cpu``: returns
    (packed (N, K/2) uint8, scales_and_zeros (K/group, N, 2)); tinygemm dequantizes ``(q - 8) * scale + zero``."""
    n, k = w.shape
    groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros


def fp32_linear(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    return lambda: torch.nn.functional.linear(x, w)


def fp32_mkl_packed(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    """What inductor's ``freezing`` emits for fp32 linears (MKL packed GEMM)."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
    return lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, x.shape[0])


def bf16_linear(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    xb, wb = x.bfloat16(), w.bfloat16()
    return lambda: torch.nn.functional.linear(xb, wb)


def bf16_onednn_packed(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    """What inductor's ``freezing`` emits for bf16 linears (oneDNN with a reordered weight)."""
    xb = x.bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), x.shape[0])
    return lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], "")


def int8pack(dtype: torch.dtype) -> Callable[[Tensor, Tensor], Callable[[], Tensor]]:
    def prepare(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
        wq, scales = per_channel_int8(w)
        xd, scales = x.to(dtype), scales.to(dtype)
        return lambda: torch.ops.aten._weight_int8pack_mm(xd, wq, scales)

    return prepare


def passforge_weight_only_bf16(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    """passforge's custom op (``_weight_int8pack_mm`` + the custom-op dispatch), as lower-quant emits it."""
    wq, scales = per_channel_int8(w)
    xb = x.bfloat16()
    return lambda: torch.ops.passforge.int8_weight_linear(xb, wq, scales, None)


def passforge_dynamic(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    wq, scales = per_channel_int8(w)
    return lambda: torch.ops.passforge.int8_dynamic_linear(x, wq, scales, None)


def per_token_quantize_only(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    return lambda: per_token_quantize(x)[0]


def int_mm_only(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    """``torch._int_mm`` on pre-quantized activations (oneDNN's s8s8s32 gemm on x86)."""
    wq, _ = per_channel_int8(w)
    qx, _, _ = per_token_quantize(x)
    return lambda: torch._int_mm(qx, wq.t())


def fbgemm_dynamic(per_channel: bool) -> Callable[[Tensor, Tensor], Callable[[], Tensor]]:
    """torch.ao ``quantize_dynamic``'s op: per-tensor uint8 activations quantized inside, fbgemm u8s8s32 GEMM on
    a prepacked weight, fp32 out. ``quantize_dynamic``'s default qconfig quantizes weights per tensor."""

    def prepare(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
        wq, scales = per_channel_int8(w)
        if per_channel:
            qw = torch._make_per_channel_quantized_tensor(wq, scales.double(), torch.zeros_like(scales).long(), 0)
        else:
            scale = float(w.abs().max()) / 127
            qw = torch._make_per_tensor_quantized_tensor(torch.round(w / scale).to(torch.int8), scale, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)

    return prepare


def onednn_qlinear_only(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    """oneDNN's int8 linear (u8 activations × s8 per-channel weights, prepacked, fp32 out) on pre-quantized
    activations: what inductor emits for PT2E x86 quantization."""
    wq, scales = per_channel_int8(w)
    qx, x_scale, x_zero_point = per_tensor_quantize_u8(x)
    packed = torch.ops.onednn.qlinear_prepack(wq, list(x.shape))
    w_zero_points = torch.zeros(w.shape[0], dtype=torch.int32)
    return lambda: torch.ops.onednn.qlinear_pointwise.tensor(
        qx, x_scale, x_zero_point, packed, scales, w_zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


def per_tensor_quantize_only(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    return lambda: per_tensor_quantize_u8(x)[0]


def int4pack(dtype: torch.dtype) -> Callable[[Tensor, Tensor], Callable[[], Tensor]]:
    def prepare(x: Tensor, w: Tensor) -> Callable[[], Tensor]:
        packed, scales_and_zeros = int4_tinygemm(w)
        xd, scales_and_zeros = x.to(dtype), scales_and_zeros.to(dtype)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xd, packed, INT4_GROUP, scales_and_zeros)

    return prepare


CANDIDATES = (
    Candidate("fp32 F.linear (eager fp32)", fp32_linear, 32),
    Candidate("fp32 MKL packed (inductor freezing)", fp32_mkl_packed, 32),
    Candidate("bf16 F.linear (eager / passforge bf16)", bf16_linear, 16),
    Candidate("bf16 oneDNN packed (inductor freezing)", bf16_onednn_packed, 16),
    Candidate("w8 _weight_int8pack_mm, fp32 x (passforge w8)", int8pack(torch.float32), 8),
    Candidate("w8 _weight_int8pack_mm, bf16 x", int8pack(torch.bfloat16), 8),
    Candidate("w8 passforge.int8_weight_linear, bf16 x (passforge w8+bf16)", passforge_weight_only_bf16, 8),
    Candidate("w8a8 passforge.int8_dynamic_linear, fp32 x (passforge w8a8)", passforge_dynamic, 8),
    Candidate("  (part) per-token quantize_decomposed quantization", per_token_quantize_only, 0, part=True),
    Candidate("  (part) torch._int_mm s8s8s32", int_mm_only, 8, part=True),
    Candidate("w8a8 fbgemm linear_dynamic, per-tensor w (torch.ao quantize_dynamic)", fbgemm_dynamic(False), 8),
    Candidate("w8a8 fbgemm linear_dynamic, per-channel w", fbgemm_dynamic(True), 8),
    Candidate("  (part) oneDNN qlinear u8s8, per-channel w", onednn_qlinear_only, 8, part=True),
    Candidate("  (part) per-tensor u8 quantization, eager ops", per_tensor_quantize_only, 0, part=True),
    Candidate(f"w4 g{INT4_GROUP} _weight_int4pack_mm_for_cpu, bf16 x", int4pack(torch.bfloat16), 4),
    Candidate(f"w4 g{INT4_GROUP} _weight_int4pack_mm_for_cpu, fp32 x", int4pack(torch.float32), 4),
)


def linear_shapes(cfg: LlamaConfig) -> dict[tuple[int, int], int]:
    """(K, N) of every linear in the model -> how many it has."""
    hd = cfg.head_dim
    per_layer = [(cfg.dim, cfg.n_heads * hd), (cfg.dim, cfg.n_kv_heads * hd), (cfg.dim, cfg.n_kv_heads * hd),
                 (cfg.n_heads * hd, cfg.dim), (cfg.dim, cfg.ffn_dim), (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)]
    counts = collections.Counter(per_layer * cfg.n_layers)
    counts[(cfg.dim, cfg.vocab_size)] += 1  # lm_head
    return dict(counts)


@dataclass
class Measurement:
    """Per (K, N) shape and candidate name: median ms, relative error; which figures come from one call only."""

    times: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    errors: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    single_call: set[tuple[tuple[int, int], str]] = field(default_factory=set)


def measure(m: int, shapes: dict[tuple[int, int], int], repeats: int, max_call_s: float) -> Measurement:
    """Time every candidate on every shape. Each is called once for its relative error (and one-time setup), then
    timed once: a candidate slower than ``max_call_s`` keeps that time instead of being repeated round-robin (some
    kernels take tens of seconds at M=512, and their figure matters only as 'far too slow')."""
    generator = torch.Generator().manual_seed(0)
    result = Measurement()
    for k, n in shapes:
        shape = (k, n)
        x = torch.randn(m, k, generator=generator)
        w = torch.randn(n, k, generator=generator) * 0.02
        reference = x @ w.T
        calls = {c.name: c.prepare(x, w) for c in CANDIDATES}
        first_ms, result.errors[shape] = {}, {}
        for c in CANDIDATES:
            y = calls[c.name]()
            if not c.part:
                result.errors[shape][c.name] = float((y.float() - reference).norm() / reference.norm())
            start = time.perf_counter()
            calls[c.name]()
            first_ms[c.name] = (time.perf_counter() - start) * 1e3
        repeated = {name: call for name, call in calls.items() if first_ms[name] <= max_call_s * 1e3}
        result.single_call |= {(shape, name) for name in calls if name not in repeated}
        medians = interleaved_latency_ms(
            list(repeated.values()), device=torch.device("cpu"), repeats=repeats, warmup=1, min_total_s=0.05
        )
        result.times[shape] = {**first_ms, **dict(zip(repeated, medians))}
        print(f"  M={m} K={k} N={n}: done", flush=True)
    return result


def report(m: int, shapes: dict[tuple[int, int], int], result: Measurement) -> None:
    """One markdown table: µs per shape, the model's total, the ratio to fp32 F.linear, and for M=1 the weight
    bytes streamed per second (decode is bandwidth-bound), for M>1 the GEMM rate."""
    times, errors = result.times, result.errors
    flops = sum(2 * m * k * n * count for (k, n), count in shapes.items())
    total = {c.name: sum(times[s][c.name] * count for s, count in shapes.items()) for c in CANDIDATES}
    base = total[CANDIDATES[0].name]
    rate = "weights GB/s" if m == 1 else "GFLOP/s"
    print(f"\nM={m}: µs per call (median)\n")
    columns = [f"{k}→{n}" for k, n in shapes] + ["model linears ms", "× fp32", rate, "rel err"]
    print("| kernel | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(shapes) + 4))
    for c in CANDIDATES:
        cells = [f"{1e3 * times[s][c.name]:.0f}{'*' if (s, c.name) in result.single_call else ''}" for s in shapes]
        if m == 1:
            streamed = sum(k * n * count for (k, n), count in shapes.items()) * c.weight_bits / 8
            figure = f"{streamed / total[c.name] / 1e6:.1f}" if c.weight_bits else "—"
        else:
            figure = "—" if c.part else f"{flops / total[c.name] / 1e6:.0f}"
        error = "—" if c.part else f"{max(e[c.name] for e in errors.values()):.1e}"
        print(f"| {c.name} | " + " | ".join(cells) + f" | {total[c.name]:.2f} | {base / total[c.name]:.2f} | "
              f"{figure} | {error} |")
    if result.single_call:
        print("\n\\* one call only: slower than --max-call-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m", choices=list(PRESETS))
    parser.add_argument("--m", default="1,512", help="comma-separated activation rows (tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-call-s", type=float, default=1.0, help="time slower kernels from one call only")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # quantized-tensor constructors warn that they are deprecated
    torch.set_num_threads(args.threads)
    shapes = linear_shapes(PRESETS[args.model])
    print(f"{args.model}: {len(shapes)} linear shapes (K→N: count) "
          f"{', '.join(f'{k}→{n}: {c}' for (k, n), c in shapes.items())}; {args.threads} threads")
    for m in (int(v) for v in args.m.split(",")):
        report(m, shapes, measure(m, shapes, args.repeats, args.max_call_s))


if __name__ == "__main__":
    main()
