"""Triton weight-only GEMMs for CUDA, tuned for decode (M = 1..16 tokens, where a linear layer's time is the time
to stream its weight): int8 per output channel (``passforge::int8_weight_linear``) and uint4 per group, packed
two per byte (``passforge::int4_weight_linear``). Weights stay integers in memory and are dequantized in
registers, tile by tile.

    int8:  x (M, K) · w (N, K) int8, scales (N,)                          -> (M, N) = (x @ w.T) * scales + bias
    int4:  x (M, K) · packed (N, K/2) uint8, scales, zero_points (N, K/g) -> (M, N) = x @ ((q - zp) * s).T + bias

int4 values are ``pack_int4``'s layout (byte j of a row holds k = 2j in its low nibble and k = 2j + 1 in its high
one), so each K step is two dots: even columns of x with the low nibbles, odd columns with the high ones.
The int4 weight is dequantized exactly as ``dequantize_per_channel_group`` does it ((q - zp) * s in fp32, then
x's dtype), so the kernel differs from the fake-quant graph only in summation order. fp32 inputs use IEEE fp32
dots (not TF32). This module imports triton: import it only on CUDA paths and in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------- kernels


def _configs() -> list[triton.Config]:
    """Decode tiles (BLOCK_M 16, narrow columns so a 4096-wide layer still fills ~130 SMs, long K steps — and one
    32-step tile, the longest an int4 group of 32 allows) and prefill tiles (M > 16 is compute-bound: wide
    tiles, short K steps)."""

    def keep(block_m: int, block_n: int, block_k: int) -> bool:
        if block_m == 16:
            return block_n <= 64 and (block_k >= 64 or block_n == 32)
        return block_n >= 64 and block_k <= 64

    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8 if bm * bn >= 128 * 64 else 4,
                      num_stages=4 if bm == 16 else 3)
        for bm in (16, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128, 256)
        if keep(bm, bn, bk)
    ]


def _fitting_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Tiles no taller than M's bucket whose K step divides the int4 group (one scale per column per step);
    under TRITON_INTERPRET (nothing to time) the first of those."""
    group = kwargs.get("GROUP_SIZE")
    fitting = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= named_args["M_BUCKET"] and (group is None or group % c.kwargs["BLOCK_K"] == 0)
    ]
    return fitting[:1] if triton.knobs.runtime.interpret else fitting


@triton.jit(do_not_specialize=["M"])  # one compile for every token count
def _int8_weight_only_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: M rounded up to a power of two, so each new prompt length does not re-tune
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile: int8 weights converted in registers, scaled once in the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N): w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)  # |w| <= 128: exact in f16/bf16
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    out = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _int4_weight_only_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_point_ptr, bias_ptr, out_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only, as above
    stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile. BLOCK_K divides GROUP_SIZE (and so K): each K step reads one scale
    and zero point per column and needs no K mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the step holds columns 2j (low nibble) and 2j + 1 (high)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_even_ptrs = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xk  # (BLOCK_M, BLOCK_K/2)
    p_ptrs = packed_ptr + offs_j[:, None] * stride_pk + offs_n[None, :] * stride_pn  # (BLOCK_K/2, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        group = k // GROUP_SIZE
        scale = tl.load(scale_ptr + offs_n * stride_sn + group * stride_sg, mask=n_mask, other=0.0)
        zero_point = tl.load(zero_point_ptr + offs_n * stride_zn + group * stride_zg, mask=n_mask, other=0)
        packed = tl.load(p_ptrs, mask=n_mask[None, :], other=0)
        x_even = tl.load(x_even_ptrs, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_even_ptrs + stride_xk, mask=m_mask[:, None], other=0.0)
        low = (packed & 0xF).to(tl.int32) - zero_point.to(tl.int32)[None, :]
        high = (packed >> 4).to(tl.int32) - zero_point.to(tl.int32)[None, :]
        w_low = (low.to(tl.float32) * scale.to(tl.float32)[None, :]).to(x_even.dtype)
        w_high = (high.to(tl.float32) * scale.to(tl.float32)[None, :]).to(x_even.dtype)
        acc = tl.dot(x_even, w_low, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, w_high, acc, input_precision=DOT_PRECISION)
        x_even_ptrs += BLOCK_K * stride_xk
        p_ptrs += (BLOCK_K // 2) * stride_pk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_TUNING = {"configs": _configs(), "prune_configs_by": {"early_config_prune": _fitting_configs}}
_int8_weight_only_tuned = triton.autotune(key=["M_BUCKET", "N", "K", "HAS_BIAS"], **_TUNING)(
    _int8_weight_only_kernel
)
_int4_weight_only_tuned = triton.autotune(key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_BIAS"], **_TUNING)(
    _int4_weight_only_kernel
)


# -------------------------------------------------------------------------------------------------- launchers


def _check_x(name: str, x: torch.Tensor, cols: int) -> None:
    if x.dim() != 2 or x.shape[1] != cols or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: expected x (M, {cols}) f32/f16/bf16, got {tuple(x.shape)} {x.dtype}")


def _launch(
    kernel: triton.JITFunction, tuned: triton.runtime.Autotuner, config: triton.Config | None,
    rows: int, n: int, args: tuple, constants: dict[str, object],
) -> None:
    """One program per (BLOCK_M, BLOCK_N) tile of the (rows, n) output: ``config``'s tile, else the tuned one."""
    if config is None:
        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

        tuned[grid](*args, **constants)
    else:
        grid = (triton.cdiv(rows, config.kwargs["BLOCK_M"]), triton.cdiv(n, config.kwargs["BLOCK_N"]))
        kernel[grid](*args, **constants, **config.all_kwargs())


def int8_weight_only_gemm(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    *, config: triton.Config | None = None,
) -> torch.Tensor:
    """x (M, K) f32/f16/bf16, w (N, K) int8, scales (N,), bias (N,)? -> (M, N) in x's dtype.
    ``config``: one fixed tile (tests), else autotuned per (M bucket, N, K)."""
    if w.dim() != 2 or w.dtype != torch.int8:
        raise ValueError(f"int8_weight_only_gemm: expected w (N, K) int8, got {tuple(w.shape)} {w.dtype}")
    n, cols = w.shape
    _check_x("int8_weight_only_gemm", x, cols)
    if tuple(scales.shape) != (n,):
        raise ValueError(f"int8_weight_only_gemm: scales must have shape ({n},), got {tuple(scales.shape)}")
    rows = x.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    args = (
        x, w, scales, bias if bias is not None else out, out,  # bias: never read without HAS_BIAS
        rows, n, cols, max(16, triton.next_power_of_2(rows)),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
    )
    constants = {"HAS_BIAS": bias is not None, "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}
    _launch(_int8_weight_only_kernel, _int8_weight_only_tuned, config, rows, n, args, constants)
    return out


def int4_weight_only_gemm(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
    bias: torch.Tensor | None, *, config: triton.Config | None = None,
) -> torch.Tensor:
    """x (M, K) f32/f16/bf16, packed (N, K/2) uint8 (``pack_int4``), scales and zero_points (N, K/group_size),
    bias (N,)? -> (M, N) in x's dtype. ``group_size`` must be a multiple of 32 (the smallest K step: two dots of
    16). ``config``: one fixed tile (tests; its BLOCK_K must divide group_size), else autotuned."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"int4_weight_only_gemm: expected packed (N, K/2) uint8, got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    n, cols = packed.shape[0], packed.shape[1] * 2
    _check_x("int4_weight_only_gemm", x, cols)
    if group_size % 32 or cols % group_size:
        raise ValueError(f"int4_weight_only_gemm: group_size={group_size} must be a multiple of 32 dividing "
                         f"K={cols}; use passforge::int4_weight_linear, which falls back to PyTorch")
    groups = (n, cols // group_size)
    if tuple(scales.shape) != groups or tuple(zero_points.shape) != groups:
        raise ValueError(f"int4_weight_only_gemm: scales and zero_points must have shape {groups}, got "
                         f"{tuple(scales.shape)} and {tuple(zero_points.shape)}")
    if config is not None and group_size % config.kwargs["BLOCK_K"]:
        raise ValueError(f"int4_weight_only_gemm: BLOCK_K={config.kwargs['BLOCK_K']} must divide {group_size=}")
    rows = x.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    args = (
        x, packed, scales, zero_points, bias if bias is not None else out, out,
        rows, n, cols, max(16, triton.next_power_of_2(rows)),
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
        zero_points.stride(0), zero_points.stride(1), out.stride(0), out.stride(1),
    )
    constants = {"GROUP_SIZE": group_size, "HAS_BIAS": bias is not None,
                 "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}
    _launch(_int4_weight_only_kernel, _int4_weight_only_tuned, config, rows, n, args, constants)
    return out


# -------------------------------------------------------------------------------------------------- references
# The kernels compute the ops' PyTorch references, which live in ``passforge.kernels.ops`` so that installs
# without triton have them: ``int8_weight_linear_reference`` and ``int4_weight_linear_reference``.
