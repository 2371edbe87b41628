"""FP8 (e4m3) quantize / dequantize ops: ``quantize(scheme=fp8)``'s fake-quant, which ``fold-quant`` turns into
stored fp8 weights (one byte each).

torch's ``quantized_decomposed`` ops accept fp8 dtypes but round to integers first (an fp8 "integer" grid), which
is not fp8 quantization; these keep fp8's floating-point grid: ``x / scale`` rounded to the nearest e4m3 value
(3 mantissa bits: a relative step of 1/8, so at most 1/16 rounding error, at every normal magnitude) and
saturated at ±448.

- ``passforge::quantize_fp8(x, scale) -> float8_e4m3fn``: ``clamp(x / scale, ±448)`` cast to e4m3 (scale
  broadcasts: ``(N, 1)`` per output channel for weights, ``(..., 1)`` per token for activations).
- ``passforge::dequantize_fp8(q, scale, dtype) -> dtype``: ``q * scale``.
- :func:`fp8_scale`: a weight's per-output-channel scale, ``amax / 448`` along the last dim, at least 2^-24 (an
  all-zero row gets a tiny positive scale; zero stays exactly zero). Activations get the same per token, at
  run time, from aten ops in the graph.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 2.0**-24  # an all-zero row: any positive scale represents it; the smallest fp16 > 0, so the
# floor survives in fp16 graphs (1e-12 underflowed to 0 there and 0 / 0 gave NaN)


@torch.library.custom_op("passforge::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float() / scale.float(), -FP8_MAX, FP8_MAX).to(FP8)


@quantize_fp8.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=FP8)


@torch.library.custom_op("passforge::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


@dequantize_fp8.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(q, dtype=dtype)


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """``amax(|x|) / 448`` over the last dim, kept as ``(..., 1)`` in fp32."""
    return (x.detach().abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
