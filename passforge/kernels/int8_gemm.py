"""Triton kernels for w8a8 on CUDA (``passforge::int8_dynamic_linear``, ``passforge::int8_static_linear``):
activation quantizers and an int8 × int8 → int32 GEMM with the dequantizing epilogue fused in.

    x (M, K) f32/f16/bf16 ──quantize_per_token──► q_x (M, K) int8, s_x (M,) f32, z_x (M,) int32
    q_x, w (N, K) int8 ──int8_gemm──► out (M, N) = ((q_x @ w.T) - z_x ⊗ Σ_k w[n, k]) * (s_x ⊗ s_w) + bias

    w8a8-static: x ──quantize_per_tensor(s, z)──► q_x; the same GEMM with s_x = s and z_x = z, constants
    passed as kernel arguments (no per-token vectors to allocate or load).

Numerics: the per-token quantizer reproduces ``choose_qparams_per_token_asymmetric`` + ``quantize_per_token``
bit for bit (the qparams in x's dtype with one rounding per op as torch does them, the scaling in float64, round
half to even, no FMA contraction), the per-tensor one ``quantize_per_tensor`` (x in fp32 times the fp32 inverse
scale, round half to even, + zero point), the GEMM is exact in int32, and the epilogue is fp32 with one rounding
to the output dtype. This module imports triton: import it only on CUDA paths (``passforge.kernels.ops`` does)
and in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QMIN, QMAX = -128, 127
FP32_EPS = torch.finfo(torch.float32).eps  # choose_qparams_per_token_asymmetric's smallest scale


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rounded(value, DTYPE: tl.constexpr):
    """An fp32 value rounded to DTYPE (to nearest, ties to even) and back: what torch stores after each op on a
    DTYPE tensor. bf16 by bit arithmetic, which is exact everywhere (TRITON_INTERPRET truncates bf16 casts)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 - DTYPE is a constexpr wrapper: its __eq__ unwraps, dtype's does not
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:  # noqa: SIM300
        return value.to(tl.float16).to(tl.float32)
    else:
        return value


@triton.jit
def _round_half_even(value):
    """torch.round: to the nearest integer, ties to even (|value| < 2^22 in fp32, < 2^51 in fp64)."""
    nearest = tl.floor(value + 0.5)
    tie_to_odd = (nearest - value == 0.5) & (tl.floor(nearest * 0.5) * 2 != nearest)
    return tl.where(tie_to_odd, nearest - 1, nearest)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr, zero_point_ptr,
    K, stride_xm, stride_qm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr,
    RECIPROCAL_DIVIDE: tl.constexpr,
):
    """One program per token: x[row] (K,) -> q[row] (K,) int8, scale[row] f32, zero_point[row] int32.

    RECIPROCAL_DIVIDE: how torch divides the range by the Python float 255 on x's device. CUDA multiplies by
    the fp32 reciprocal (aten's true-divide by a CPU scalar), the CPU divides; the two differ by an ulp at times.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    low = tl.zeros((BLOCK_K,), tl.float32)  # running min(x, 0) and max(x, 0): padding with 0 changes neither
    high = tl.zeros((BLOCK_K,), tl.float32)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)  # exact for every DTYPE
        low = tl.minimum(low, x)
        high = tl.maximum(high, x)
    min_neg = tl.min(low, axis=0)
    max_pos = tl.max(high, axis=0)

    spread = _rounded(max_pos - min_neg, DTYPE)
    if RECIPROCAL_DIVIDE:
        scale = _rounded(spread * tl.math.div_rn(tl.full((), 1.0, tl.float32), QMAX - QMIN + 0.0), DTYPE)
    else:
        scale = _rounded(tl.math.div_rn(spread, QMAX - QMIN + 0.0), DTYPE)
    scale = _rounded(tl.maximum(scale, EPS), DTYPE)
    descaled_min = _rounded(tl.math.div_rn(min_neg, scale), DTYPE)
    descaled_max = _rounded(tl.math.div_rn(max_pos, scale), DTYPE)
    error_sum = _rounded(_rounded(QMIN + descaled_min, DTYPE) + _rounded(QMAX + descaled_max, DTYPE), DTYPE)
    zero_point = tl.where(error_sum > 0, _rounded(QMIN - descaled_min, DTYPE), _rounded(QMAX - descaled_max, DTYPE))
    zero_point = _round_half_even(tl.minimum(tl.maximum(zero_point, QMIN), QMAX))
    tl.store(scale_ptr + row, scale)
    tl.store(zero_point_ptr + row, zero_point.to(tl.int32))

    inverse = 1.0 / scale.to(tl.float64)
    offset = zero_point.to(tl.float64)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = _round_half_even(x.to(tl.float64) * inverse + offset)
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, q_ptr, numel, inverse_scale, zero_point,
                                QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK elements of contiguous x: q = clamp(round(x * inverse_scale) + zero_point) int8."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)  # exact for every float dtype
    q = _round_half_even(x * inverse_scale) + zero_point
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=offs < numel)


def _gemm_configs() -> list[triton.Config]:
    """Decode tiles (BLOCK_M 16: M ≤ 16 is weight-bound, so many narrow column tiles with long K steps) and
    prefill tiles (compute-bound: square-ish tiles, K steps of 64-128 int8 = 128 bytes per row)."""

    def keep(block_m: int, block_n: int, block_k: int) -> bool:
        if block_m == 16:
            return block_n <= 64 and block_k >= 128
        return block_k <= 128 and block_n >= 64

    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8 if bm * bn >= 128 * 64 else 4,
                      num_stages=4 if bm == 16 else 3)
        for bm in (16, 64, 128) for bn in (32, 64, 128) for bk in (64, 128, 256)
        if keep(bm, bn, bk)
    ]


def _fitting_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Tiles no taller than M's bucket; under TRITON_INTERPRET (nothing to time) the first of those."""
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= named_args["M_BUCKET"]]
    return fitting[:1] if triton.knobs.runtime.interpret else fitting


@triton.jit(do_not_specialize=["M", "a_zero_point_value"])  # one compile for every token count and zero point
def _int8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zero_point_ptr, b_scale_ptr, b_row_sum_ptr, bias_ptr,
    a_scale_value, a_zero_point_value,  # a's qparams when they are one constant (PER_TOKEN False)
    M, N, K,
    M_BUCKET,  # autotune key only: M rounded up to a power of two, so each new prompt length does not re-tune
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a (M, K) int8 · b (N, K) int8 -> int32 tile, corrected for a's zero points, scaled, biased, cast. a's
    scales and zero points are per row (PER_TOKEN: loaded from a_scale_ptr, a_zero_point_ptr) or constants."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N): w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # explicit: Triton 3.6 wants acc's dtype here
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    b_row_sum = tl.load(b_row_sum_ptr + offs_n, mask=n_mask, other=0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        a_zero_point = tl.load(a_zero_point_ptr + offs_m, mask=m_mask, other=0)
        acc -= a_zero_point[:, None] * b_row_sum[None, :]  # (q_x - z_x) @ w.T
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        out = acc.to(tl.float32) * (a_scale[:, None] * b_scale[None, :])
    else:
        acc -= a_zero_point_value * b_row_sum[None, :]
        out = acc.to(tl.float32) * (a_scale_value * b_scale)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_int8_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "PER_TOKEN", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _fitting_configs},
)(_int8_gemm_kernel)


# -------------------------------------------------------------------------------------------------- launchers


def quantize_per_token(
    x: torch.Tensor, *, block_k: int = 1024, reciprocal_divide: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) f32/f16/bf16 -> (q (M, K) int8, scales (M,) f32, zero points (M,) int32), asymmetric per token,
    exactly as ``choose_qparams_per_token_asymmetric`` + ``quantize_per_token`` compute them on x's device
    (scales are values of x's dtype, so fp32 holds them exactly). ``reciprocal_divide`` (default: x on CUDA)
    picks CUDA's rule for the range / 255 step; tests set it to check that rule under the interpreter."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_per_token: expected x (M, K) f32/f16/bf16, got {tuple(x.shape)} {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    zero_points = torch.empty(rows, dtype=torch.int32, device=x.device)
    if rows:
        block_k = min(block_k, triton.next_power_of_2(max(cols, 16)))
        _quantize_per_token_kernel[(rows,)](
            x, q, scales, zero_points, cols, x.stride(0), q.stride(0),
            QMIN=QMIN, QMAX=QMAX, EPS=FP32_EPS, BLOCK_K=block_k, RECIPROCAL_DIVIDE=(
                x.device.type == "cuda" if reciprocal_divide is None else reciprocal_divide),
            num_warps=4, enable_fp_fusion=False,
        )
    return q, scales, zero_points


def int8_gemm(
    q_x: torch.Tensor, w: torch.Tensor, x_scales: torch.Tensor | float, x_zero_points: torch.Tensor | int,
    w_scales: torch.Tensor, w_row_sums: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
    *, config: triton.Config | None = None,
) -> torch.Tensor:
    """q_x (M, K) int8, w (N, K) int8, x_scales (M,) f32 and x_zero_points (M,) int32 — or one scale and zero
    point for all of q_x (w8a8-static) —, w_scales (N,), w_row_sums (N,) int32, bias (N,)? -> (M, N)
    ``out_dtype``. ``config``: one fixed tile (tests), else autotuned."""
    rows, cols = q_x.shape
    if q_x.dtype != torch.int8 or w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != cols:
        raise ValueError(
            f"int8_gemm: expected q_x (M, K) int8 and w (N, K) int8, got {tuple(q_x.shape)} {q_x.dtype} and "
            f"{tuple(w.shape)} {w.dtype}"
        )
    n = w.shape[0]
    per_token = isinstance(x_scales, torch.Tensor)
    if per_token != isinstance(x_zero_points, torch.Tensor):
        raise ValueError("int8_gemm: x_scales and x_zero_points must both be (M,) tensors or both be numbers")
    vectors = [("w_scales", w_scales, n), ("w_row_sums", w_row_sums, n)]
    if per_token:
        vectors += [("x_scales", x_scales, rows), ("x_zero_points", x_zero_points, rows)]
    for name, vector, length in vectors:
        if tuple(vector.shape) != (length,):
            raise ValueError(f"int8_gemm: {name} must have shape ({length},), got {tuple(vector.shape)}")
    out = torch.empty((rows, n), dtype=out_dtype, device=q_x.device)
    if rows == 0 or n == 0:
        return out
    if per_token:
        x_vectors, x_constants = (x_scales, x_zero_points.to(torch.int32)), (1.0, 0)
    else:
        x_vectors, x_constants = (out, out), (float(x_scales), int(x_zero_points))  # never read: no PER_TOKEN
    args = (
        q_x, w, out, *x_vectors, w_scales, w_row_sums.to(torch.int32),
        bias if bias is not None else out,  # never read without HAS_BIAS
        *x_constants, rows, n, cols, max(16, triton.next_power_of_2(rows)),
        q_x.stride(0), q_x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
    )
    flags = {"PER_TOKEN": per_token, "HAS_BIAS": bias is not None}
    if config is None:
        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

        _int8_gemm_tuned[grid](*args, **flags)
    else:
        grid = (triton.cdiv(rows, config.kwargs["BLOCK_M"]), triton.cdiv(n, config.kwargs["BLOCK_N"]))
        _int8_gemm_kernel[grid](*args, **flags, **config.all_kwargs())
    return out


def int8_dynamic_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) -> (..., N): quantize x per token, int8 GEMM with w (N, K) int8 and per-channel ``scales``
    (N,), + bias, in x's dtype. The weight's row sums are computed once per weight (``prepack``)."""
    from passforge.kernels.prepack import int8_row_sums

    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    q_x, x_scales, x_zero_points = quantize_per_token(flat)
    out = int8_gemm(q_x, w, x_scales, x_zero_points, scales, int8_row_sums(w), bias, x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, *, block: int = 1024) -> torch.Tensor:
    """x (...) f32/f16/bf16 -> int8 of x's shape, exactly ``quantize_per_tensor(x, scale, zero_point, -128, 127,
    int8)`` (the inverse scale rounded to fp32 as torch rounds a scalar operand)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_per_tensor: expected f32/f16/bf16 x, got {x.dtype}")
    x = x.contiguous()
    q = torch.empty_like(x, dtype=torch.int8)
    if x.numel():
        _quantize_per_tensor_kernel[(triton.cdiv(x.numel(), block),)](
            x, q, x.numel(), 1.0 / scale, zero_point, QMIN=QMIN, QMAX=QMAX, BLOCK=block, enable_fp_fusion=False,
        )
    return q


def int8_static_linear(
    x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., K) -> (..., N): quantize x per tensor with the constants, int8 GEMM with w (N, K) int8 and
    per-channel ``w_scales`` (N,), + bias, in x's dtype. The weight's row sums are computed once per weight."""
    from passforge.kernels.prepack import int8_row_sums

    q_x = quantize_per_tensor(x.reshape(-1, x.shape[-1]), x_scale, x_zero_point)  # (M, K)
    out = int8_gemm(q_x, w, x_scale, x_zero_point, w_scales, int8_row_sums(w), bias, x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


# -------------------------------------------------------------------------------------------------- references


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`quantize_per_token` computes, with torch's Q/DQ ops."""
    qd = torch.ops.quantized_decomposed
    scales, zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)  # (M, 1) f64, i64
    q = qd.quantize_per_token(x, scales, zero_points, QMIN, QMAX, torch.int8)
    return q, scales.reshape(-1).float(), zero_points.reshape(-1).int()


def int8_gemm_reference(
    q_x: torch.Tensor, w: torch.Tensor, x_scales: torch.Tensor | float, x_zero_points: torch.Tensor | int,
    w_scales: torch.Tensor, w_row_sums: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """What :func:`int8_gemm` computes, in PyTorch on any device. The int32 GEMM runs as a float64 matmul (CUDA has
    no integer matmul): every product and partial sum is an integer below 2^53, so it is exact."""
    rows = q_x.shape[0]
    x_scales = torch.as_tensor(x_scales, dtype=torch.float32, device=q_x.device).expand(rows)
    x_zero_points = torch.as_tensor(x_zero_points, device=q_x.device).expand(rows)
    acc = q_x.double() @ w.double().t() - x_zero_points.double()[:, None] * w_row_sums.double()[None, :]
    out = acc.float() * (x_scales.float()[:, None] * w_scales.float()[None, :])
    return (out + bias.float() if bias is not None else out).to(out_dtype)
