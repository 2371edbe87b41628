"""passforge's custom ops (``torch.library``), each with a fake impl so rewritten graphs stay traceable,
exportable and compilable.

Importing this module registers them, and torch's standard Q/DQ ops (``quantized_decomposed``, the ones
PT2E quantization and ONNX QDQ export use). Passes that insert these ops import it; so does graph loading.

- ``passforge::unpack_int4(packed (N, K/2) uint8) -> (N, K) uint8``: two 4-bit values per byte, low nibble
  first — how ``fold-quant`` stores int4 weights.
- ``passforge::int8_weight_linear(x (..., K), w (N, K) int8, scales (N,), bias (N,)?) -> (..., N)``:
  ``x @ (w * scales).T + bias`` without materialising the dequantized weight. CPU: PyTorch's
  ``_weight_int8pack_mm`` (int8 weights streamed, dequantized in the kernel). Elsewhere: the reference.
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
        out = torch.ops.aten._weight_int8pack_mm(flat, w, scales.to(x.dtype))  # (M, N)
        out = out.reshape(*x.shape[:-1], w.shape[0])
        return out + bias if bias is not None else out
    return int8_weight_linear_reference(x, w, scales, bias)


@int8_weight_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))
