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
- ``passforge::int8_static_linear(x (..., K), x_scale, x_zero_point, w (N, K) int8, w_scales (N,), bias (N,)?)
  -> (..., N)``: w8a8-static. x quantized per tensor with calibrated constants (exactly ``quantize_per_tensor``:
  ``clamp(round(x * (1 / x_scale)) + x_zero_point, -128, 127)``), an int8 × int8 → int32 GEMM, the zero point
  corrected with the weight's cached row sums, then ``acc * (x_scale * w_scales) + bias``. CPU: oneDNN's u8 × s8
  linear (``onednn.qlinear_pointwise``, the kernel PT2E's x86 path runs: x quantized to uint8 with the zero point
  shifted by 128, the same integers, the epilogue in the GEMM) for fp32 / bf16 x where :func:`onednn_int8_exact`,
  else ``torch._int_mm``. CUDA: the Triton GEMM of ``int8_gemm`` with the constants in its epilogue.
- ``passforge::fp8_linear(x (..., K), w (N, K) float8_e4m3fn, w_scale (N, 1), bias (N,)?) -> (..., N)``: x
  quantized to e4m3 per token exactly as ``quantize(scheme=fp8)``'s graph does it (``amax(|x|) / 448``), then
  ``torch._scaled_mm`` with row-wise scales on CUDA with compute capability >= 8.9 for bf16 x and K, N multiples
  of 16 (the shapes and output dtypes its row-wise kernels take); elsewhere the reference (the fake-quant graph's
  own ops: PyTorch's CPU ``_scaled_mm`` is an emulation, 3-30x slower than a bf16 GEMM on the llama-100m shapes).
- ``passforge::int4_weight_linear(x (..., K), packed (N, K/2) uint8, scales (N, K/g), zero_points (N, K/g),
  group_size, bias (N,)?) -> (..., N)``: ``x @ ((q - zp) * s).T + bias`` for ``fold-quant``'s packed uint4
  weights, exactly the weight ``dequantize_per_channel_group`` gives. CPU: PyTorch's
  ``_weight_int4pack_mm_for_cpu`` (N a multiple of 16, group_size 32/64/128/256; the weight repacked into the
  CPU's tile layout once per process, see ``prepack``). Elsewhere: the reference.

On CUDA tensors each integer op runs its Triton kernel (``int8_gemm``, ``weight_only_gemm``; triton is imported
then, not before) and falls back to the PyTorch implementation when triton is not installed or the shape is
unsupported (``fp8_linear`` runs ``torch._scaled_mm``); :func:`backend` says which implementation runs for given
operands.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.ao.quantization.fx._decomposed

from passforge.kernels.attention import attention_cpu, attention_reference, check_shapes, empty_output
from passforge.kernels.fp8 import FP8_MAX, MIN_SCALE, dequantize_fp8, quantize_fp8
from passforge.kernels.prepack import cpu_int4_layout, int8_row_sums, onednn_int8_weight

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
OPS = ("int8_weight_linear", "int8_dynamic_linear", "int8_static_linear", "int4_weight_linear", "fp8_linear")


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once; the import itself happens on the first CUDA call)."""
    return importlib.util.find_spec("triton") is not None


def backend(op: str, x: torch.Tensor, weight_shape: tuple[int, int], group_size: int = 0) -> str:
    """Which implementation ``passforge::<op>`` runs for an activation like ``x`` and a weight of logical shape
    (N, K) — ``"triton"``, an aten kernel's name, or ``"reference"`` — so reports can say what was timed."""
    n, k = weight_shape
    if op not in OPS:
        raise ValueError(f"unknown op '{op}'; expected one of {', '.join(OPS)}")
    if op == "fp8_linear":
        return "aten._scaled_mm" if scaled_mm_unsupported(x, weight_shape) is None else "reference"
    triton_shape = op != "int4_weight_linear" or (group_size % 32 == 0 and k % group_size == 0)
    if x.device.type == "cuda" and x.dtype in FLOAT_DTYPES and triton_shape and triton_available():
        return "triton"
    if op == "int8_weight_linear":
        return "aten._weight_int8pack_mm" if x.device.type == "cpu" and x.dtype in FLOAT_DTYPES else "reference"
    if op == "int8_static_linear" and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES and onednn_int8_exact():
        return "onednn.qlinear_pointwise"
    if op in ("int8_dynamic_linear", "int8_static_linear"):
        return "reference" if x.is_cuda and (n % 8 or k % 8) else "aten._int_mm"
    cpu = x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and n % 16 == 0
    return "aten._weight_int4pack_mm_for_cpu" if cpu and group_size in CPU_INT4_GROUP_SIZES else "reference"


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)  # the output dtypes oneDNN's int8 linear writes


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether this process has oneDNN's u8 × s8 linear on a CPU with AVX-512 VNNI (AMX CPUs have it too), where
    it sums the products exactly in int32, its epilogue inside the GEMM: an LM head at 512 tokens in 34 ms with
    its bf16 output written, against 57 ms for ``_int_mm``'s int32 sums alone (benchmarks/prefill_probe.py,
    docs/benchmarks.md). Without VNNI oneDNN multiplies through 16-bit pair sums that can saturate
    (why PyTorch's x86 quantizers reduce the range there), so passforge keeps ``_int_mm``."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return torch.backends.mkldnn.is_available() and vnni is not None and bool(vnni())


def scaled_mm_unsupported(x: torch.Tensor, weight_shape: tuple[int, int]) -> str | None:
    """Why ``fp8_linear`` cannot use ``torch._scaled_mm`` with row-wise scales for an activation like ``x`` and
    a (N, K) weight, or None when it can. Row-wise fp8 GEMMs exist on CUDA from compute capability 8.9 (Ada) on;
    they need K and N multiples of 16, and bf16 is the output dtype every one of them supports (fp16 and fp32
    outputs depend on the CUDA and cuBLAS versions)."""
    n, k = weight_shape
    if x.device.type != "cuda":
        return f"no fp8 GEMM on {x.device.type} (torch._scaled_mm there is an emulation, slower than bf16)"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 9):
        return f"no fp8 tensor cores on compute capability {capability[0]}.{capability[1]} (needs 8.9 or later)"
    if x.dtype != torch.bfloat16:
        return f"row-wise torch._scaled_mm outputs bf16; activations are {x.dtype} (cast(dtype=bf16) first)"
    if n % 16 or k % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got N={n}, K={k}"
    return None


@torch.library.custom_op("passforge::unpack_int4", mutates_args=())
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_int4(packed)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
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
    return _int8_weight_linear_cpu(x, w, scales, bias)


def _shaped_like_x(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear's (M, N) result for x's M = prod(x.shape[:-1]) rows, shaped (..., N) like x, plus the bias."""
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out


def _int8_weight_linear_cpu(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if backend("int8_weight_linear", x, tuple(w.shape)) == "aten._weight_int8pack_mm":
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        return _shaped_like_x(torch.ops.aten._weight_int8pack_mm(flat, w.contiguous(), scales.to(x.dtype)), x, bias)
    return int8_weight_linear_reference(x, w, scales, bias)


def _linear_shaped(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Fake impl of the ops shaped like ``linear(x (..., K), w (N, K)) -> (..., N)``."""
    return x.new_empty((*x.shape[:-1], w.shape[0]))


int8_weight_linear.register_fake(_linear_shaped)


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


def _int_mm_minus_zero_points(
    qx: torch.Tensor, w: torch.Tensor, zero_points: torch.Tensor | int, cols: slice = slice(None)
) -> torch.Tensor:
    """qx (M, K) int8, w (N, K) int8, zero points (M, 1) or one int -> (qx - zero_points) @ w[cols].T (M, n)
    int32, exactly: ``torch._int_mm``, then the zero points times the weight's row sums (cached per weight,
    sliced to ``cols``). cuBLASLt's int8 GEMM needs M > 16: on CUDA smaller M is padded with zero rows (the
    GEMM is weight-bound there anyway)."""
    rows = qx.shape[0]
    if qx.is_cuda and rows <= 16:
        qx = torch.cat([qx, qx.new_zeros(17 - rows, qx.shape[1])])
    acc = torch._int_mm(qx, w[cols].t())[:rows]  # (M, n) int32, a fresh buffer: corrected in place
    if isinstance(zero_points, torch.Tensor):  # acc -= z ⊗ row sums, one pass, no (M, n) temporary
        return acc.addr_(zero_points.reshape(-1).to(torch.int32), int8_row_sums(w)[cols], alpha=-1)
    return acc.sub_(zero_points * int8_row_sums(w)[cols]) if zero_points else acc


def _int8_gemm_eager(
    qx: torch.Tensor, zero_points: torch.Tensor | int, scales: Callable[[slice], list[torch.Tensor]],
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """The eager int8 ops' GEMM and epilogue, in :func:`column_blocks` (the inductor form's blocks): each
    block's int32 sums are dequantized in place (in fp32, times each of ``scales(cols)`` in turn) and written
    into its columns of one output in x's dtype while they are still in cache. Shaped like x, plus the bias."""

    def dequantized(cols: slice) -> torch.Tensor:
        out = _int_mm_minus_zero_points(qx, w, zero_points, cols).to(torch.float32)
        for factor in scales(cols):
            out.mul_(factor)
        return out

    blocks = column_blocks(w)
    if len(blocks) == 1:
        out = dequantized(slice(None)).to(x.dtype)
    else:
        out = qx.new_empty((qx.shape[0], w.shape[0]), dtype=x.dtype)
        for cols in blocks:
            out[:, cols] = dequantized(cols)
    return _shaped_like_x(out, x, bias)


def _int8_dynamic_linear_torch(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if backend("int8_dynamic_linear", x, tuple(w.shape)) == "reference":  # cuBLASLt int8 needs K, N multiples of 8
        return int8_dynamic_linear_reference(x, w, scales, bias)
    qx, x_scales, x_zero_points = quantize_per_token_int8(x.reshape(-1, x.shape[-1]))  # (M, K) int8, (M, 1)
    token_scales = x_scales.to(torch.float32)
    return _int8_gemm_eager(qx, x_zero_points, lambda cols: [token_scales, scales[cols].to(torch.float32)], x, w,
                            bias)


@torch.library.custom_op("passforge::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int8_dynamic_linear_torch(x, w, scales, bias)


int8_dynamic_linear.register_fake(_linear_shaped)


@int8_dynamic_linear.register_kernel("cuda")
def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if backend("int8_dynamic_linear", x, tuple(w.shape)) != "triton":
        return _int8_dynamic_linear_torch(x, w, scales, bias)
    from passforge.kernels.int8_gemm import int8_dynamic_linear as triton_int8_dynamic_linear

    return triton_int8_dynamic_linear(x, w, scales, bias)


def int8_static_linear_reference(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the w8a8-static graph computes, op for op: linear(dequantize_per_tensor(quantize_per_tensor(x)),
    dequantize_per_channel(w), bias)."""
    qd = torch.ops.quantized_decomposed
    qx = qd.quantize_per_tensor(x, x_scale, x_zero_point, -128, 127, torch.int8)
    dqx = qd.dequantize_per_tensor(qx, x_scale, x_zero_point, -128, 127, torch.int8, out_dtype=x.dtype)
    weight = qd.dequantize_per_channel(w, w_scales, None, 0, -128, 127, torch.int8, out_dtype=x.dtype)
    return torch.nn.functional.linear(dqx, weight, bias)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``choose_qparams_per_token_asymmetric`` + ``quantize_per_token`` (int8) bit for bit, ~5x faster on CPU:
    one ``amin`` / ``amax`` pass (torch's qparams depend only on each row's min and max, so they are computed by
    torch's own op on the (M, 2) extremes), then torch's float64 arithmetic on one buffer in place.
    Returns ``(q (M, K) int8, scales (M, 1) f64, zero points (M, 1) i64)``."""
    scales, zero_points = _per_token_qparams(x)
    q = x.to(torch.float64).mul_(1.0 / scales).add_(zero_points).round_().clamp_(-128, 127).to(torch.int8)
    return q, scales, zero_points


def _per_token_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amin and amax, not aminmax: aminmax over the last dim is 6x slower on CPU (0.50 vs 0.09 ms, 512 x 768 bf16)
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    return torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric(
        torch.cat([low, high], dim=-1), torch.int8
    )


def quantize_per_tensor_int8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``quantize_per_tensor(x, scale, zero_point, -128, 127, int8)`` bit for bit — the same fp32 ops (x times
    the inverse scale, which torch rounds to fp32 as a scalar operand; round half to even; + zero point; clamp)
    on one buffer in place: 1.5-5x faster on CPU than the decomposed op, which allocates at each step."""
    return _quantize_per_tensor(x, scale, zero_point, torch.int8)


def quantize_per_tensor_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """:func:`quantize_per_tensor_int8` plus 128, as uint8: the same integers shifted into oneDNN's u8 range
    (``clamp(round(x / s) + z + 128, 0, 255)``, exactly ``quantize_per_tensor(..., -128, 127, int8) + 128``)."""
    return _quantize_per_tensor(x, scale, zero_point, torch.uint8)


# the per-tensor quantizers' integer dtypes -> (zero point shift, lo, hi): uint8 holds the int8 values + 128
PER_TENSOR_RANGES = {torch.int8: (0, -128, 127), torch.uint8: (128, 0, 255)}


def _quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    shift, lo, hi = PER_TENSOR_RANGES[dtype]
    scaled = x.float() * (1.0 / scale)  # a new buffer: the in-place steps never write into x
    return scaled.round_().add_(zero_point + shift).clamp_(lo, hi).to(dtype)


@torch.library.custom_op("passforge::onednn_int8_linear", mutates_args=())
def onednn_int8_linear(
    qx: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """qx (M, K) uint8 (an int8 quantization + 128), w (N, K) int8 -> (M, N) in ``dtype``: oneDNN's u8 × s8
    linear, ``(qx - (x_zero_point + 128)) @ w.T`` summed exactly in int32 (VNNI), times ``x_scale * w_scales``
    in fp32 inside the GEMM. The weight is prepacked into this CPU's layout once per process (``prepack``).
    What ``int8_static_linear`` runs where :func:`backend` says ``onednn.qlinear_pointwise``; an op of its own
    so inductor calls it as one extern kernel (oneDNN's prepack has no fake impl to trace)."""
    return _onednn_int8_linear(qx, x_scale, x_zero_point, w, w_scales, dtype)


def _onednn_int8_linear(
    qx: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`onednn_int8_linear`'s work, called directly by the eager op (no second custom-op dispatch)."""
    packed, zero_points = onednn_int8_weight(w)
    return torch.ops.onednn.qlinear_pointwise(
        qx, x_scale, x_zero_point + 128, packed, w_scales.to(torch.float32), zero_points, None, 1.0, 0, dtype, "none",
        [], "",
    )


@onednn_int8_linear.register_fake
def _(
    qx: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return qx.new_empty((qx.shape[0], w.shape[0]), dtype=dtype)


def _int8_static_linear_torch(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    implementation = backend("int8_static_linear", x, tuple(w.shape))
    if implementation == "reference":  # cuBLASLt int8 needs K, N multiples of 8
        return int8_static_linear_reference(x, x_scale, x_zero_point, w, w_scales, bias)
    if implementation == "onednn.qlinear_pointwise":
        qx = quantize_per_tensor_uint8(x.reshape(-1, x.shape[-1]), x_scale, x_zero_point)
        return _shaped_like_x(_onednn_int8_linear(qx, x_scale, x_zero_point, w, w_scales, x.dtype), x, bias)
    qx = quantize_per_tensor_int8(x.reshape(-1, x.shape[-1]), x_scale, x_zero_point)  # (M, K) int8
    return _int8_gemm_eager(qx, x_zero_point, lambda cols: [x_scale * w_scales[cols].to(torch.float32)], x, w, bias)


@torch.library.custom_op("passforge::int8_static_linear", mutates_args=())
def int8_static_linear(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _int8_static_linear_torch(x, x_scale, x_zero_point, w, w_scales, bias)


@int8_static_linear.register_fake
def _(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@int8_static_linear.register_kernel("cuda")
def _(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if backend("int8_static_linear", x, tuple(w.shape)) != "triton":
        return _int8_static_linear_torch(x, x_scale, x_zero_point, w, w_scales, bias)
    from passforge.kernels.int8_gemm import int8_static_linear as triton_int8_static_linear

    return triton_int8_static_linear(x, x_scale, x_zero_point, w, w_scales, bias)


def _int8_dynamic_linear_for_inductor(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``passforge::int8_dynamic_linear`` in ATen ops only (see :data:`INDUCTOR_DECOMPOSITIONS`)."""
    rows = x.reshape(-1, x.shape[-1])
    x_scales, x_zero_points = _per_token_qparams(rows)  # the quantizer of quantize_per_token_int8, out of place
    qx = (rows.to(torch.float64) * (1.0 / x_scales) + x_zero_points).round().clamp(-128, 127).to(torch.int8)
    zero_points = x_zero_points.to(torch.int32)
    return _int8_gemm_in_column_blocks(
        lambda cols: torch._int_mm(qx, w[cols].t()) - zero_points * w[cols].sum(dim=1, dtype=torch.int32),
        lambda cols: x_scales.to(torch.float32) * scales[cols].to(torch.float32), x, w, bias,
    )


WIDE_BLOCK = 4096  # output columns per int8 GEMM of a wide layer (an LM head) on CPU


def column_blocks(w: torch.Tensor) -> list[slice]:
    """The output columns of an int8 activation layer, ``WIDE_BLOCK`` at a time on CPU when w (N, K) is wider:
    an LM head's int32 sums for a 512-token prompt are 66 MB written and read back in one piece, while a
    block's stay in cache until its epilogue reads them (1.42x the bf16 head alone,
    benchmarks/prefill_probe.py). One block on CUDA, where the GEMMs have their own tiling."""
    n = w.shape[0]
    if w.is_cuda or n <= WIDE_BLOCK:
        return [slice(None)]
    return [slice(j, min(j + WIDE_BLOCK, n)) for j in range(0, n, WIDE_BLOCK)]


def _int8_gemm_in_column_blocks(
    accumulate: Callable[[slice], torch.Tensor], scale: Callable[[slice], torch.Tensor], x: torch.Tensor,
    w: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """The inductor form's int8 GEMM and epilogue, one per :func:`column_blocks` block, joined by one ``cat``.
    ``accumulate(cols)`` / ``scale(cols)``: the block's int32 sums and its combined scale."""
    outs = [_int8_epilogue(accumulate(cols), scale(cols), x, w[cols], None if bias is None else bias[cols])
            for cols in column_blocks(w)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _int8_static_linear_for_inductor(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``passforge::int8_static_linear`` in ATen ops only (see :data:`INDUCTOR_DECOMPOSITIONS`); where the op
    runs oneDNN's int8 linear, the uint8 quantizer (fused by inductor into the op before) and that op."""
    onednn = backend("int8_static_linear", x, tuple(w.shape)) == "onednn.qlinear_pointwise"
    dtype = torch.uint8 if onednn else torch.int8
    shift, lo, hi = PER_TENSOR_RANGES[dtype]
    scaled = x.reshape(-1, x.shape[-1]).float() * (1.0 / x_scale)  # _quantize_per_tensor, out of place
    qx = (scaled.round() + (x_zero_point + shift)).clamp(lo, hi).to(dtype)
    if onednn:  # the linear as one extern op; its bias added after the rounding, as the eager op does
        return _shaped_like_x(onednn_int8_linear(qx, x_scale, x_zero_point, w, w_scales, x.dtype), x, bias)

    def accumulate(cols: slice) -> torch.Tensor:
        acc = torch._int_mm(qx, w[cols].t())
        return acc - x_zero_point * w[cols].sum(dim=1, dtype=torch.int32) if x_zero_point else acc

    return _int8_gemm_in_column_blocks(accumulate, lambda cols: x_scale * w_scales[cols].to(torch.float32), x, w,
                                       bias)


def _int8_epilogue(
    acc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``acc * scale`` (one multiply by the combined scale) in x's dtype, shaped like x, plus the bias.

    One multiply, not ``acc * s_x * s_w``: with ``freezing=True`` inductor rewrites the two-multiply pattern
    after a ``_int_mm`` on a constant weight into oneDNN's int8 linear with int8 activations, which on CPUs
    where oneDNN has no int8 × int8 kernel (AVX-512 VNNI takes uint8 × int8) runs its reference loop: 8.5 s
    instead of 3.8 ms for one 768 → 2048 layer at M=512 (benchmarks/int8_inductor_probe.py)."""
    return _shaped_like_x((acc.to(torch.float32) * scale).to(x.dtype), x, bias)


INDUCTOR_DECOMPOSITIONS = {
    torch.ops.passforge.int8_weight_linear.default: _int8_weight_linear_cpu,
    torch.ops.passforge.int8_dynamic_linear.default: _int8_dynamic_linear_for_inductor,
    torch.ops.passforge.int8_static_linear.default: _int8_static_linear_for_inductor,
}
"""The int8 activation ops as the ATen ops their CPU implementations run, for inductor to compile on CPU.

As opaque ops, inductor calls them as extern kernels and every activation makes a round trip through memory
around each one: the norm's output is written, read by the op's quantizer, the int8 copy written and read by
the GEMM, its int32 result dequantized into a fresh buffer, read again by the residual add or SiLU that follows.
Decomposed, inductor fuses the quantizer into the norm before it (one kernel writes the int8 activations) and
the dequantizing epilogue into the ops after it; ``torch._int_mm`` stays the GEMM (oneDNN, VNNI/AMX). Where the
static op runs oneDNN's u8 × s8 linear (:func:`onednn_int8_exact`), only its uint8 quantizer is decomposed: the
epilogue is inside that GEMM, which writes x's dtype directly (for a 32k LM head at 512 tokens, no 66 MB of int32
sums through memory). The int8
operands and int32 sums are the ops' exactly; the float results differ by fp32 rounding of the scale product
(the epilogue multiplies by ``s_x * s_w`` once) and, in bf16/fp16, by inductor fusing the bias add without
rounding in between: within an ulp or two of the activation dtype. The per-token ranges
(``choose_qparams_per_token_asymmetric``) stay one extern op: decomposed, inductor computes their bf16
arithmetic in fp32, and a quarter of the scales, zero points and int8 activations came out different.
CUDA keeps the ops: their Triton kernels fuse all of this."""


def fp8_token_scale(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (..., 1) in x's dtype: ``max(amax(|x|) / 448, 2^-24)`` per token, the aten ops
    ``quantize(scheme=fp8)`` puts in front of each linear."""
    return torch.clamp_min(x.abs().amax(-1, keepdim=True) / FP8_MAX, MIN_SCALE)


def fp8_linear_reference(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What the folded fp8 graph computes, op for op: linear(dequantize_fp8(quantize_fp8(x, s_x), s_x),
    dequantize_fp8(w, w_scale), bias) with s_x from :func:`fp8_token_scale`."""
    scale = fp8_token_scale(x)
    dqx = dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)
    return torch.nn.functional.linear(dqx, dequantize_fp8(w, w_scale, x.dtype), bias)


def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) quantized per token exactly as the graph does it, then one ``torch._scaled_mm``: e4m3 × e4m3
    with fp32 accumulation, row-wise scales (x's (M, 1), w's as (1, N)), bias and the cast to x's dtype in its
    epilogue. Operand layouts as it requires them: x row-major (M, K), the weight column-major (K, N)."""
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    scale = fp8_token_scale(flat)  # (M, 1) in x's dtype
    q = quantize_fp8(flat, scale).contiguous()  # (M, K) e4m3
    out = torch._scaled_mm(
        q, w.contiguous().t(), scale.float(), w_scale.float().reshape(1, -1), bias=bias, out_dtype=x.dtype
    )  # (M, N)
    return out.reshape(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("passforge::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _fp8_linear_default(x, w, w_scale, bias)


def _fp8_linear_default(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if backend("fp8_linear", x, tuple(w.shape)) == "aten._scaled_mm":
        return fp8_scaled_mm(x, w, w_scale, bias)
    return fp8_linear_reference(x, w, w_scale, bias)


@fp8_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def int4_weight_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the folded w4 graph computes, op for op: linear(x, dequantize_per_channel_group(unpack_int4(packed)))."""
    weight = torch.ops.quantized_decomposed.dequantize_per_channel_group(
        unpack_int4(packed), scales, zero_points, 0, 15, torch.uint8, group_size, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("passforge::int4_weight_linear", mutates_args=())
def int4_weight_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _int4_weight_linear_cpu(x, packed, scales, zero_points, group_size, bias)


def _int4_weight_linear_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    if backend("int4_weight_linear", x, (n, k), group_size) != "aten._weight_int4pack_mm_for_cpu":
        return int4_weight_linear_reference(x, packed, scales, zero_points, group_size, bias)
    tiles, scales_and_zeros = cpu_int4_layout(packed, scales, zero_points, x.dtype)
    return int4pack_linear(x, tiles, group_size, scales_and_zeros, bias)


def int4pack_linear(
    x: torch.Tensor, tiles: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) → (..., N) through ``_weight_int4pack_mm_for_cpu`` on weights already in this CPU's layout
    (``cpu_int4_layout``: (N, K/2) tiles). The CPU int4 op ends here, and so do inductor builds, which repack
    the weights once (``runtime.inductor.int4_in_cpu_layout``); its shapes follow x's, symbolic ones too."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    return _shaped_like_x(torch.ops.aten._weight_int4pack_mm_for_cpu(flat, tiles, group_size, scales_and_zeros), x,
                          bias)


@int4_weight_linear.register_fake
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@int4_weight_linear.register_kernel("cuda")
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    if backend("int4_weight_linear", x, (n, k), group_size) != "triton":
        return int4_weight_linear_reference(x, packed, scales, zero_points, group_size, bias)
    from passforge.kernels.weight_only_gemm import int4_weight_only_gemm

    out = int4_weight_only_gemm(x.reshape(-1, k), packed, scales, zero_points, group_size, bias)  # (M, N)
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op("passforge::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
) -> torch.Tensor:
    return attention_cpu(q, k, v, mask, causal=causal, scale=scale, window=window, sinks=sinks)


# The registrations below take the op's keyword options as they come (the schema above is the one signature).


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, **options: object):
    check_shapes(q, k, v, options.get("window", 0), options.get("sinks", 0))
    return empty_output(q, v)


@attention.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, **options: object):
    if attention_backend(q, k, v, mask) != "triton":
        return attention_cpu(q, k, v, mask, **options)
    from passforge.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, mask, **options)  # writes into empty_output: already the op's layout


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str:
    """Which implementation ``passforge::attention`` runs for these operands: ``"triton"`` (CUDA, kernels of
    ``flash_attention``) or ``"sdpa"`` (``attention_cpu``: SDPA's flash kernels, blocked for windows)."""
    if q.device.type != "cuda" or not triton_available():
        return "sdpa"
    from passforge.kernels.flash_attention import unsupported

    return "sdpa" if unsupported(q, k, v, mask) else "triton"


def _attention_setup(
    ctx: object, inputs: tuple[object, ...], keyword_only_inputs: dict[str, object], output: torch.Tensor
) -> None:
    q, k, v, mask = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.options = keyword_only_inputs


def _attention_backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Recompute through the float32 reference and differentiate it: O(T²) memory, but exact gradients for
    distillation and QAT through a substituted attention (the forward keeps its O(T) kernels). A float
    (additive) mask gets its gradient too: it may be a learned bias."""
    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in (q, k, v, mask)
        ]
        out = attention_reference(*leaves, compute_dtype=torch.float32, **ctx.options)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in leaves)


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


CPU_KERNELS = {
    torch.ops.passforge.unpack_int4.default: _unpack_int4,
    torch.ops.passforge.int8_weight_linear.default: _int8_weight_linear_cpu,
    torch.ops.passforge.int8_dynamic_linear.default: _int8_dynamic_linear_torch,
    torch.ops.passforge.int8_static_linear.default: _int8_static_linear_torch,
    torch.ops.passforge.fp8_linear.default: _fp8_linear_default,
    torch.ops.passforge.int4_weight_linear.default: _int4_weight_linear_cpu,
    torch.ops.passforge.attention.default: attention_cpu,
}
"""Each op's CPU implementation as the plain Python function its ``torch.library`` registration calls.

A call through the dispatcher costs a custom op tens of µs more than the function alone (the op object, the
dispatch, then the Python kernel); a one-token decode step of llama-100m makes 65 such calls (57 linears, 8
attentions), and calling the functions directly decoded ~10% faster with w8 weights (docs/benchmarks.md).
passforge's runtime calls them directly on CPU (``runtime.executor``); graphs keep the ops, which are what
export, save, inductor and every other device see."""
