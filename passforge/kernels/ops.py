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
  points corrected with the weight's row sums, then one float epilogue ``acc * s_x * s_w + bias``. (On CUDA
  without triton: M padded above 16; K or N not multiples of 8 fall back to the reference.)
- ``passforge::int4_weight_linear(x (..., K), packed (N, K/2) uint8, scales (N, K/g), zero_points (N, K/g),
  group_size, bias (N,)?) -> (..., N)``: ``x @ ((q - zp) * s).T + bias`` for ``fold-quant``'s packed uint4
  weights, exactly the weight ``dequantize_per_channel_group`` gives. CPU: PyTorch's
  ``_weight_int4pack_mm_for_cpu`` (N a multiple of 16, group_size 32/64/128/256; the weight repacked into the
  CPU's tile layout once per process, see ``prepack``). Elsewhere: the reference.

On CUDA tensors each op runs its Triton kernel (``int8_gemm``, ``weight_only_gemm``; triton is imported then, not
before) and falls back to the PyTorch implementation when triton is not installed or the shape is unsupported;
:func:`backend` says which implementation runs for given operands.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.ao.quantization.fx._decomposed

from passforge.kernels.prepack import cpu_int4_layout, int8_row_sums

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once; the import itself happens on the first CUDA call)."""
    return importlib.util.find_spec("triton") is not None


def backend(op: str, x: torch.Tensor, weight_shape: tuple[int, int], group_size: int = 0) -> str:
    """Which implementation ``passforge::<op>`` runs for an activation like ``x`` and a weight of logical shape
    (N, K) — ``"triton"``, an aten kernel's name, or ``"reference"`` — so reports can say what was timed."""
    n, k = weight_shape
    triton_shape = op != "int4_weight_linear" or (group_size % 32 == 0 and k % group_size == 0)
    if x.device.type == "cuda" and x.dtype in FLOAT_DTYPES and triton_shape and triton_available():
        return "triton"
    if op == "int8_weight_linear":
        return "aten._weight_int8pack_mm" if x.device.type == "cpu" and x.dtype in FLOAT_DTYPES else "reference"
    if op == "int8_dynamic_linear":
        return "reference" if x.is_cuda and (n % 8 or k % 8) else "aten._int_mm"
    if op == "int4_weight_linear":
        cpu = x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and n % 16 == 0
        return "aten._weight_int4pack_mm_for_cpu" if cpu and group_size in CPU_INT4_GROUP_SIZES else "reference"
    raise ValueError(f"unknown op '{op}'; expected int8_weight_linear, int8_dynamic_linear or int4_weight_linear")


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
    if backend("int8_weight_linear", x, tuple(w.shape)) == "aten._weight_int8pack_mm":
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        out = torch.ops.aten._weight_int8pack_mm(flat, w.contiguous(), scales.to(x.dtype))  # (M, N)
        out = out.reshape(*x.shape[:-1], w.shape[0])
        return out + bias if bias is not None else out
    return int8_weight_linear_reference(x, w, scales, bias)


@int8_weight_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@int8_weight_linear.register_kernel("cuda")
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if backend("int8_weight_linear", x, tuple(w.shape)) != "triton":
        return int8_weight_linear_reference(x, w, scales, bias)
    from passforge.kernels.weight_only_gemm import int8_weight_only_gemm

    out = int8_weight_only_gemm(x.reshape(-1, x.shape[-1]), w, scales, bias)  # (M, N)
    return out.reshape(*x.shape[:-1], w.shape[0])


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


def _int8_dynamic_linear_torch(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    qd = torch.ops.quantized_decomposed
    if backend("int8_dynamic_linear", x, tuple(w.shape)) == "reference":  # cuBLASLt int8 needs K, N multiples of 8
        return int8_dynamic_linear_reference(x, w, scales, bias)
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(flat, torch.int8)  # (M, 1) f64, i64
    qx = qd.quantize_per_token(flat, x_scales, x_zero_points, -128, 127, torch.int8)  # (M, K) int8
    rows = qx.shape[0]
    if x.is_cuda and rows <= 16:  # and M > 16: pad with zero rows (the GEMM is weight-bound at small M)
        qx = torch.cat([qx, qx.new_zeros(17 - rows, qx.shape[1])])
    acc = torch._int_mm(qx, w.t())[:rows]  # (M, N) int32
    acc = acc - x_zero_points.to(torch.int32) * int8_row_sums(w)  # (q_x - z_x) @ w.T
    out = (acc.to(torch.float32) * (x_scales.to(torch.float32) * scales.to(torch.float32))).to(x.dtype)
    out = out.reshape(*x.shape[:-1], w.shape[0])
    return out + bias if bias is not None else out


@torch.library.custom_op("passforge::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int8_dynamic_linear_torch(x, w, scales, bias)


@int8_dynamic_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@int8_dynamic_linear.register_kernel("cuda")
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if backend("int8_dynamic_linear", x, tuple(w.shape)) != "triton":
        return _int8_dynamic_linear_torch(x, w, scales, bias)
    from passforge.kernels.int8_gemm import int8_dynamic_linear as triton_int8_dynamic_linear

    return triton_int8_dynamic_linear(x, w, scales, bias)


def int4_weight_linear_reference(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the folded w4 graph computes, op for op: linear(x, dequantize_per_channel_group(unpack_int4(packed)))."""
    weight = torch.ops.quantized_decomposed.dequantize_per_channel_group(
        unpack_int4(packed), scales, zero_points, 0, 15, torch.uint8, group_size, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("passforge::int4_weight_linear", mutates_args=())
def int4_weight_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    if backend("int4_weight_linear", x, (n, k), group_size) != "aten._weight_int4pack_mm_for_cpu":
        return int4_weight_linear_reference(x, packed, scales, zero_points, group_size, bias)
    tiles, scales_and_zeros = cpu_int4_layout(packed, scales, zero_points, x.dtype)
    flat = x.reshape(-1, k).contiguous()  # (M, K)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, tiles, group_size, scales_and_zeros)  # (M, N)
    out = out.reshape(*x.shape[:-1], n)
    return out + bias if bias is not None else out


@int4_weight_linear.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@int4_weight_linear.register_kernel("cuda")
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    if backend("int4_weight_linear", x, (n, k), group_size) != "triton":
        return int4_weight_linear_reference(x, packed, scales, zero_points, group_size, bias)
    from passforge.kernels.weight_only_gemm import int4_weight_only_gemm

    out = int4_weight_only_gemm(x.reshape(-1, k), packed, scales, zero_points, group_size, bias)  # (M, N)
    return out.reshape(*x.shape[:-1], n)
