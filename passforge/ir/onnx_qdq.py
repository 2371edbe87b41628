"""ONNX translations for passforge's quantization ops, in the QDQ form ONNX Runtime and TensorRT read.

:mod:`passforge.ir.onnx_export` passes :data:`TRANSLATIONS` to ``torch.onnx.export`` as its
``custom_translation_table``; :mod:`passforge.ir.onnx_cleanup` then tidies the exported model. Imports
onnxscript, so import this module only when exporting (onnx is an optional dependency).

Op mapping (opset 21; ``block_size`` is ONNX's blocked quantization)::

    quantize_per_channel(w, s, z, axis, -128, 127, int8)    →  QuantizeLinear(w, s, z:int8, axis)
    dequantize_per_channel(q, s, z, axis, ...)               →  DequantizeLinear(q, s, z, axis) [→ Cast]
    quantize_per_channel_group(w, s, z, 0, 15, uint8, g)     →  QuantizeLinear(w, s, z:uint4, axis=1, block_size=g)
    dequantize_per_channel_group(q, s, z, 0, 15, uint8, g)   →  DequantizeLinear(q:uint4, s, z:uint4, axis=1,
                                                                 block_size=g) [→ Cast]
    choose_qparams_per_token_asymmetric(x, int8)             →  ReduceMin/ReduceMax over the last dim, torch's
                                                                 arithmetic op for op (scale, zero point per row)
    quantize_per_token(x, s, z, -128, 127, int8)             →  Cast(clip(round(x * (1 / s) + z)), int8), in
                                                                 double as torch computes it (exact; see there)
    dequantize_per_token(q, s, z, ...)                       →  DequantizeLinear(q, s, z, axis=-1, block_size=K)
    quantize_per_tensor(x, s, z, -128, 127, int8)  (static)  →  QuantizeLinear(x, s, z:int8)
    dequantize_per_tensor(q, s, z, ...)                      →  DequantizeLinear(q, s, z) [→ Cast]
    passforge::quantize_fp8(x, s (..., 1))                   →  QuantizeLinear(x, s, output_dtype=float8e4m3fn),
                                                                 per axis 0 for 2-D x, else blocked on the last axis
    passforge::dequantize_fp8(q, s, dtype)                   →  DequantizeLinear(q, s, same layout) [→ Cast]
    passforge::unpack_int4(packed)                           →  a uint4 initializer holding the same bytes (ONNX
                                                                 packs 4-bit tensors low nibble first, as we do);
                                                                 BitwiseAnd/BitShift when the input is computed

After :mod:`passforge.ir.onnx_cleanup` a quantized linear reads ``[QuantizeLinear →] DequantizeLinear →
MatMul`` on a weight stored transposed, (K, N), with ``axis`` / the blocked axis flipped to match — the
pattern ONNX Runtime fuses into its MatMulNBits kernels.

The quantized type is read from ``(dtype, quant_min, quant_max)``: torch stores uint4 values in uint8 with
range 0..15, ONNX has a real ``uint4``, whose saturation *is* the clamp, so Q → DQ stays adjacent (the
pattern runtimes fold into integer kernels). A range no ONNX type has (int8 -127..127) gets an explicit
``Clip`` between Q and DQ: correct everywhere, but runtimes will not fuse it.

Numerics: DequantizeLinear computes ``(q - z) * s`` exactly as torch does. For weights, QuantizeLinear
divides by the scale where torch multiplies by its reciprocal, so a weight within an ulp of a rounding
boundary can land one step apart (run ``fold-quant`` first and the integers torch computed are stored).
Activations are quantized with torch's own arithmetic (see :func:`quantize_per_token`).
"""

from __future__ import annotations

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset21 as op

import passforge.kernels.fp8
import passforge.kernels.ops  # noqa: F401 - this import and the one above register the ops translated below

qd = torch.ops.quantized_decomposed

INT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT32: (0, 2**32 - 1),
    ir.DataType.INT64: (-(2**63), 2**63 - 1),
}
"""The values each integer ONNX type holds."""
_SUB_BYTE = {ir.DataType.UINT8: ir.DataType.UINT4, ir.DataType.INT8: ir.DataType.INT4}
"""torch keeps 4-bit values in 8-bit tensors; these are the ONNX types that hold them natively."""

UNPACK_INT4_MARK = "pkg.passforge.unpack_int4"
"""``metadata_props`` key on the last node of an emitted int4 unpack (``onnx_cleanup.fold_packed_int4``)."""


def _scalar(value: float, dtype: ir.DataType) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


def _onnx_qtype(dtype: int, quant_min: int, quant_max: int) -> tuple[ir.DataType, bool]:
    """The ONNX type QuantizeLinear should produce for torch's ``(dtype, quant_min, quant_max)``, and
    whether a ``Clip`` must follow because no ONNX type saturates to exactly that range."""
    storage = ir.DataType(dtype)
    for candidate in (storage, _SUB_BYTE.get(storage)):
        if candidate is not None and INT_RANGES.get(candidate) == (quant_min, quant_max):
            return candidate, False
    return storage, True


def _quantize(
    x: ir.Value, scale: ir.Value, zero_point: ir.Value, dtype: int, quant_min: int, quant_max: int, **axes: int
) -> ir.Value:
    """QuantizeLinear to torch's storage dtype (fp32 math, like torch), in the ONNX type that saturates to
    ``quant_min..quant_max``; cast back to the storage dtype when that type is 4-bit."""
    qtype, clip = _onnx_qtype(dtype, quant_min, quant_max)
    x, scale = op.Cast(x, to=ir.DataType.FLOAT), op.Cast(scale, to=ir.DataType.FLOAT)
    q = op.QuantizeLinear(x, scale, op.Cast(zero_point, to=qtype), **axes)
    if clip:
        q = op.Clip(q, _scalar(quant_min, qtype), _scalar(quant_max, qtype))
    return q if qtype == ir.DataType(dtype) else op.Cast(q, to=dtype)


def _dequantize(
    q: ir.Value,
    scale: ir.Value,
    zero_point: ir.Value | None,
    dtype: int,
    quant_min: int,
    quant_max: int,
    out_dtype: int,
    **axes: int,
) -> ir.Value:
    """DequantizeLinear in fp32 (what torch computes), read in the ONNX type of ``quant_min..quant_max``,
    then cast to ``out_dtype``."""
    qtype, _ = _onnx_qtype(dtype, quant_min, quant_max)
    if qtype != ir.DataType(dtype):
        q = op.Cast(q, to=qtype)  # values are in range: this is the inverse of the cast in _quantize
    inputs = [q, op.Cast(scale, to=ir.DataType.FLOAT)]
    if zero_point is not None:
        inputs.append(op.Cast(zero_point, to=qtype))
    y = op.DequantizeLinear(*inputs, **axes)
    if out_dtype == -1 or ir.DataType(out_dtype) == ir.DataType.FLOAT:
        return y
    return op.Cast(y, to=out_dtype)


def _per_axis(qparam: ir.Value) -> ir.Value:
    """Per-axis Q/DQ take 1-D scales and zero points; torch accepts any shape with one value per channel."""
    return qparam if len(qparam.shape) == 1 else op.Reshape(qparam, op.Constant(value_ints=[-1]))


def quantize_per_channel(
    input: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value,
    axis: int,
    quant_min: int,
    quant_max: int,
    dtype: int,
) -> ir.Value:
    return _quantize(input, _per_axis(scales), _per_axis(zero_points), dtype, quant_min, quant_max, axis=axis)


def dequantize_per_channel(
    input: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value | None,
    axis: int,
    quant_min: int,
    quant_max: int,
    dtype: int,
    out_dtype: int = -1,
) -> ir.Value:
    zero_points = _per_axis(zero_points) if zero_points is not None else None
    return _dequantize(input, _per_axis(scales), zero_points, dtype, quant_min, quant_max, out_dtype, axis=axis)


def quantize_per_tensor(
    input: ir.Value, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int
) -> ir.Value:
    """Static activations (``w8a8-static``): constant qparams, so the Q → DQ pair is the pattern ONNX Runtime
    fuses into integer matmuls (MatMulIntegerToFloat) and TensorRT runs in int8."""
    scale_value, zero_value = _scalar(scale, ir.DataType.FLOAT), _scalar(zero_point, ir.DataType.INT64)
    return _quantize(input, scale_value, zero_value, dtype, quant_min, quant_max)


def dequantize_per_tensor(
    input: ir.Value, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int, out_dtype: int = -1
) -> ir.Value:
    scale_value, zero_value = _scalar(scale, ir.DataType.FLOAT), _scalar(zero_point, ir.DataType.INT64)
    return _dequantize(input, scale_value, zero_value, dtype, quant_min, quant_max, out_dtype)


def _fp8_layout(x: ir.Value, scale: ir.Value) -> tuple[ir.Value, dict[str, int]]:
    """passforge's fp8 scales are (N, 1) per output channel of a weight, or (..., 1) per token: per-axis Q/DQ
    (1-D scale) for a 2-D tensor, blocked along the last axis otherwise."""
    if len(scale.shape) != len(x.shape) or scale.shape[-1] != 1:
        raise ValueError(f"fp8 scale of shape {scale.shape} for a tensor of shape {x.shape}: expected (..., 1)")
    if len(x.shape) == 2:
        return _per_axis(scale), {"axis": 0}
    return scale, {"axis": -1, "block_size": _row_length(x)}


def quantize_fp8(x: ir.Value, scale: ir.Value) -> ir.Value:
    """``clamp(x / s, ±448)`` rounded to e4m3: QuantizeLinear's saturating float8 cast computes exactly this
    (the same float32 division, round to nearest even, saturation at ±448)."""
    scale, axes = _fp8_layout(x, scale)
    x, scale = op.Cast(x, to=ir.DataType.FLOAT), op.Cast(scale, to=ir.DataType.FLOAT)
    return op.QuantizeLinear(x, scale, output_dtype=ir.DataType.FLOAT8E4M3FN, **axes)


def dequantize_fp8(q: ir.Value, scale: ir.Value, dtype: int) -> ir.Value:
    scale, axes = _fp8_layout(q, scale)
    y = op.DequantizeLinear(q, op.Cast(scale, to=ir.DataType.FLOAT), **axes)
    return y if ir.DataType(dtype) == ir.DataType.FLOAT else op.Cast(y, to=dtype)


def _group_block(
    input: ir.Value, scales: ir.Value, zero_points: ir.Value | None, group_size: int
) -> tuple[ir.Value, ir.Value | None, int]:
    """Scales and zero points shaped (rows, K / g) as blocked Q/DQ want them, and the block size (torch
    widens a group larger than the row to the whole row, as GPTQ's single-column case needs)."""
    rows, cols = input.shape
    if group_size > cols:
        group_size = cols
    shape = op.Constant(value_ints=[rows, cols // group_size])
    scales = op.Reshape(scales, shape)
    zero_points = op.Reshape(zero_points, shape) if zero_points is not None else None
    return scales, zero_points, group_size


def quantize_per_channel_group(
    input: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value,
    quant_min: int,
    quant_max: int,
    dtype: int,
    group_size: int = 128,
) -> ir.Value:
    scales, zero_points, block = _group_block(input, scales, zero_points, group_size)
    return _quantize(input, scales, zero_points, dtype, quant_min, quant_max, axis=1, block_size=block)


def dequantize_per_channel_group(
    input: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value | None,
    quant_min: int,
    quant_max: int,
    dtype: int,
    group_size: int = 128,
    output_dtype: int = ir.DataType.FLOAT,
) -> ir.Value:
    scales, zero_points, block = _group_block(input, scales, zero_points, group_size)
    return _dequantize(input, scales, zero_points, dtype, quant_min, quant_max, output_dtype, axis=1, block_size=block)


def choose_qparams_per_token_asymmetric(input: ir.Value, dtype: int) -> tuple[ir.Value, ir.Value]:
    """torch's arithmetic op for op, in the input's dtype (torch's range is -128..127 whatever ``dtype``)::

        lo = min(min(x, -1), 0); hi = max(max(x, -1), 0); s = max((hi - lo) / 255, eps)
        z = round(clip(lo / s + hi / s + 1 > 0 ? -128 - lo / s : 127 - hi / s, -128, 127))

    Returns (scale as double, zero point as int64), torch's types."""
    qmin, qmax = -128.0, 127.0

    def const(value: float) -> ir.Value:
        return op.CastLike(_scalar(value, ir.DataType.FLOAT), input)

    last = op.Constant(value_ints=[-1])
    low = op.Min(op.ReduceMin(input, last, keepdims=1), const(0.0))
    high = op.Max(op.ReduceMax(input, last, keepdims=1), const(0.0))
    scale = op.Max(op.Div(op.Sub(high, low), const(qmax - qmin)), const(float(torch.finfo(torch.float32).eps)))
    descaled_low, descaled_high = op.Div(low, scale), op.Div(high, scale)
    from_low = op.Sub(const(qmin), descaled_low)
    from_high = op.Sub(const(qmax), descaled_high)
    errors = op.Add(op.Add(const(qmin), descaled_low), op.Add(const(qmax), descaled_high))
    zero_point = op.Where(op.Greater(errors, const(0.0)), from_low, from_high)
    zero_point = op.Clip(zero_point, const(qmin), const(qmax))
    zero_point = op.Round(op.Cast(zero_point, to=ir.DataType.FLOAT))  # ONNX has no bf16 Round; lossless
    return op.Cast(scale, to=ir.DataType.DOUBLE), op.Cast(zero_point, to=ir.DataType.INT64)


def _per_token(input: ir.Value, qparam: ir.Value) -> ir.Value:
    """Per-token qparams shaped (..., 1) like the input, as blocked Q/DQ along the last axis want them."""
    if len(qparam.shape) == len(input.shape):
        return qparam
    shape = op.Concat(op.Shape(input, end=-1), op.Constant(value_ints=[1]), axis=0)
    return op.Reshape(qparam, shape)


def _row_length(input: ir.Value) -> int:
    width = input.shape[-1]
    if not isinstance(width, int):
        raise ValueError(f"per-token quantization needs a static last dimension, got {input.shape}")
    return width


def quantize_per_token(
    input: ir.Value, scales: ir.Value, zero_points: ir.Value, quant_min: int, quant_max: int, dtype: int
) -> ir.Value:
    """torch's arithmetic, not QuantizeLinear: ``clip(round(x * (1 / s) + z))`` in the scales' type (double,
    as ``choose_qparams_per_token_asymmetric`` returns them), so ONNX Runtime quantizes every activation
    exactly as passforge does. QuantizeLinear computes ``round(x / s)`` in float32 and puts a value near a
    rounding boundary one step off (1 element in 262,144 random ones). Exact is worth more here than the
    QDQ pattern: no runtime fuses a Q whose scale is computed at run time (TensorRT needs constant scales;
    ONNX Runtime runs it unfused). The DequantizeLinear that follows is exact either way."""
    compute = ir.DataType.FLOAT if scales.dtype == ir.DataType.FLOAT else ir.DataType.DOUBLE
    scales, zero_points = _per_token(input, scales), _per_token(input, zero_points)
    scaled = op.Mul(op.Cast(input, to=compute), op.Reciprocal(op.Cast(scales, to=compute)))
    q = op.Round(op.Add(scaled, op.Cast(zero_points, to=compute)))
    q = op.Clip(q, _scalar(quant_min, compute), _scalar(quant_max, compute))
    return op.Cast(q, to=dtype)


def dequantize_per_token(
    input: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value,
    quant_min: int,
    quant_max: int,
    dtype: int,
    output_dtype: int = ir.DataType.FLOAT,
) -> ir.Value:
    scales, zero_points = _per_token(input, scales), _per_token(input, zero_points)
    width = _row_length(input)
    return _dequantize(
        input, scales, zero_points, dtype, quant_min, quant_max, output_dtype, axis=-1, block_size=width
    )


def unpack_int4(packed: ir.Value) -> ir.Value:
    """(..., K/2) uint8 → (..., K) uint8, low nibble first. The last node is marked so that
    ``onnx_cleanup.fold_packed_int4`` can turn an unpacked *initializer* into a uint4 initializer."""
    low = op.BitwiseAnd(packed, _scalar(0x0F, ir.DataType.UINT8))
    high = op.BitShift(packed, _scalar(4, ir.DataType.UINT8), direction="RIGHT")
    axis = op.Constant(value_ints=[-1])
    pairs = op.Concat(op.Unsqueeze(low, axis), op.Unsqueeze(high, axis), axis=-1)  # (..., K/2, 2)
    unpacked = op.Reshape(pairs, op.Concat(op.Shape(packed, end=-1), axis, axis=0))
    unpacked.producer().metadata_props[UNPACK_INT4_MARK] = "1"
    return unpacked


TRANSLATIONS = {
    qd.quantize_per_channel.default: quantize_per_channel,
    qd.dequantize_per_channel.default: dequantize_per_channel,
    qd.quantize_per_channel_group.default: quantize_per_channel_group,
    qd.dequantize_per_channel_group.default: dequantize_per_channel_group,
    qd.choose_qparams_per_token_asymmetric.default: choose_qparams_per_token_asymmetric,
    qd.quantize_per_token.default: quantize_per_token,
    qd.dequantize_per_token.default: dequantize_per_token,
    qd.quantize_per_tensor.default: quantize_per_tensor,
    qd.dequantize_per_tensor.default: dequantize_per_tensor,
    torch.ops.passforge.quantize_fp8.default: quantize_fp8,
    torch.ops.passforge.dequantize_fp8.default: dequantize_fp8,
    torch.ops.passforge.unpack_int4.default: unpack_int4,
}
"""torch op → onnxscript (trace-only) translation; merged over torch.onnx's own table."""
