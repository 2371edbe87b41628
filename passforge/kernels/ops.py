"""passforge's custom ops (``torch.library``), each with a fake impl so rewritten graphs stay traceable,
exportable and compilable.

Importing this module registers them, and torch's standard Q/DQ ops (``quantized_decomposed``, the ones
PT2E quantization and ONNX QDQ export use). Passes that insert these ops import it; so does graph loading.

- ``passforge::unpack_int4(packed (N, K/2) uint8) -> (N, K) uint8``: two 4-bit values per byte, low nibble
  first — how ``fold-quant`` stores int4 weights.
- ``passforge::int8_weight_linear(x (..., K), w (N, K) int8, scales (N,), bias (N,)?) -> (..., N)``:
  ``x @ (w * scales).T + bias`` without materialising the dequantized weight. CPU: PyTorch's
  ``_weight_int8pack_mm`` (int8 weights streamed, dequantized in the kernel). Elsewhere: the reference.
- ``passforge::int8_dynamic_linear(x (..., K), w (N, K) int8, scales (N,), bias (N,)?) -> (..., N)``: x
  quantized per token at run time (asymmetric int8, exactly as ``choose_qparams_per_token_asymmetric`` +
  ``quantize_per_token``), an int8 × int8 → int32 GEMM (``torch._int_mm``; VNNI/AMX on x86), the zero
  points corrected with the weight's row sums, then one float epilogue ``acc * s_x * s_w + bias``. (On CUDA:
  M padded above 16; K or N not multiples of 8 fall back to the reference.)
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed


@torch.library.custom_op("passforge::unpack_int4", mutates_args=())
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = (packed >> 4) & 0x0F
    return torch.stack([low, high], dim=-1).flatten(-2)  # (N, K/2, 2) -> (N, K)


@unpack_int4.register_fake
def _(packed: torch.Tensor) -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2))


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15], K even -> (N, K/2) uint8; the inverse of ``unpack_int4``."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(values.shape)}")
    pairs = values.to(torch.uint8).unflatten(-1, (-1, 2))  # (N, K/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def int8_weight_linear_reference(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    weight = w.to(x.dtype) * scales.to(x.dtype)[:, None]  # (N, K)
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("passforge::int8_weight_linear", mutates_args=())
def int8_weight_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        out = torch.ops.aten._weight_int8pack_mm(flat, w.contiguous(), scales.to(x.dtype))  # (M, N)
        out = out.reshape(*x.shape[:-1], w.shape[0])
        return out + bias if bias is not None else out
    return int8_weight_linear_reference(x, w, scales, bias)


@int8_weight_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def int8_dynamic_linear_reference(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What the fake-quant graph computes, op for op: dequantize(quantize_per_token(x)) @ dequantize(w).T + b."""
    qd = torch.ops.quantized_decomposed
    x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    qx = qd.quantize_per_token(x, x_scales, x_zero_points, -128, 127, torch.int8)
    dqx = qd.dequantize_per_token(qx, x_scales, x_zero_points, -128, 127, torch.int8, x.dtype)
    weight = qd.dequantize_per_channel(w, scales, None, 0, -128, 127, torch.int8, out_dtype=x.dtype)
    return torch.nn.functional.linear(dqx, weight, bias)


@torch.library.custom_op("passforge::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    qd = torch.ops.quantized_decomposed
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(flat, torch.int8)  # (M, 1) f64, i64
    qx = qd.quantize_per_token(flat, x_scales, x_zero_points, -128, 127, torch.int8)  # (M, K) int8
    rows = qx.shape[0]
    if x.is_cuda and (w.shape[0] % 8 or w.shape[1] % 8):  # cuBLASLt int8 needs K, N multiples of 8
        return int8_dynamic_linear_reference(x, w, scales, bias)
    if x.is_cuda and rows <= 16:  # and M > 16: pad with zero rows (the GEMM is weight-bound at small M)
        qx = torch.cat([qx, qx.new_zeros(17 - rows, qx.shape[1])])
    acc = torch._int_mm(qx, w.t())[:rows]  # (M, N) int32
    acc = acc - x_zero_points.to(torch.int32) * w.sum(dim=1, dtype=torch.int32)  # (q_x - z_x) @ w.T
    out = (acc.to(torch.float32) * (x_scales.to(torch.float32) * scales.to(torch.float32))).to(x.dtype)
    out = out.reshape(*x.shape[:-1], w.shape[0])
    return out + bias if bias is not None else out


@int8_dynamic_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))
