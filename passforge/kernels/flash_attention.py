"""Triton kernels for ``passforge::attention`` on CUDA: a flash-attention forward for prefill and a split-K
flash-decoding kernel for a few queries against a long cache, with the op's semantics (``attention``'s module
docstring) computed in the kernels.

Why not SDPA on CUDA: its flash kernel takes no mask (so no window, no sinks), and its memory-efficient kernel
takes them only as a materialised (Tq, Tk) mask, O(Tq · Tk) memory and time. Here every rule is computed from
indices, per tile, so no (Tq, Tk) matrix is ever built (a user mask is read tile by tile, through broadcast
strides), key blocks outside a query block's causal/window range are never visited (windowed attention costs
O(T · window), not O(T²)), grouped-query heads index their kv head (k and v are never repeated) and any strides
are taken as they are (no copies).

    forward  grid (query blocks, B · Hq): a (BLOCK_M, D) query tile streams the key blocks it can see —
             the sink blocks first, then the window's, none twice — with an online softmax; blocks that every
             query of the tile sees whole skip the per-element rules.
    decode   grid (B · Hkv, splits): one program holds the n_rep · Tq query rows of a kv-head group, so each
             K/V block is read once per group; the visible key blocks are cut into contiguous splits, each
             writing a partial (max, sum, unnormalised output) that a second kernel combines.

Numerics: scores, softmax statistics and outputs accumulate in fp32; an additive mask is added to the scaled
scores before any exponential (a ``finfo.min`` mask stays finite, as in the reference; scaled by log2(e) for
``exp2`` it would overflow to -inf); fp32 inputs use IEEE fp32 dots (not TF32); f16/bf16 probabilities are
rounded to the input dtype for the P·V dot, as flash attention does; the output is rounded once to q's dtype.
A row with no attendable key (every score -inf) returns zeros: its max is taken as 0 and its sum of 0 as 1.

What the kernels do not take, :func:`unsupported` says (callers fall back to ``attention_cpu``): head dims above
256 (others are padded to a power of two of at least 16 with masked loads; Dv may differ from D), non-float or
mixed dtypes, operands on different devices, masks that are neither bool nor float. No backward: the op's
autograd recomputes through the reference. This module imports triton: import it only on CUDA paths and in
tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from passforge.kernels.attention import check_shapes, empty_output

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # one (BLOCK_M, 256) query tile in registers is the most the tiles below are sized for
DECODE_MAX_QUERIES = 16  # the dispatcher's decode/forward boundary on Tq ...
DECODE_MAX_ROWS = 64  # ... and on the query rows of one kv-head group (n_rep · Tq): one program's tile height
DECODE_MAX_TILE_BYTES = 32 * 1024  # ... and on that query tile's size (fp32 with head dim 256: 32 rows)
KEYS_PER_SPLIT = 256  # decode: fewer keys per split would spend more on partial results than on K/V
MAX_SPLITS = 64
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _key_blocks(first, last, Tk, window, sinks, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks that queries at positions first..last can see: ``range(0, sink_stop, BLOCK_N)`` (the sink
    blocks, only with a window) then ``range(window_start, stop, BLOCK_N)``, block-aligned and disjoint (the
    window's blocks start after the sinks' last one); keys inside them that some query may not see are masked
    per element."""
    stop = Tk
    if CAUSAL:
        stop = tl.minimum(stop, last + 1)
    elif WINDOW:
        stop = tl.minimum(stop, last + window)
    stop = tl.maximum(stop, 0)  # queries before the first key (Tq > Tk) may see no key
    lo = 0
    sink_stop = 0
    if WINDOW:
        lo = tl.maximum(first - window + 1, 0)
        sink_stop = tl.minimum(sinks, stop if CAUSAL else Tk)  # not causal: sinks are exempt from both window sides
    window_start = tl.maximum(lo // BLOCK_N * BLOCK_N, tl.cdiv(sink_stop, BLOCK_N) * BLOCK_N)
    return sink_stop, window_start, stop


@triton.jit
def _open_blocks(
    first, last, Tk, window, window_start, stop, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The run ``range(open_start, open_stop, BLOCK_N)`` inside ``range(window_start, stop, BLOCK_N)`` of whole
    key blocks that every query at positions first..last may see by the rules (only a user mask can hide keys
    there): those blocks skip the per-element rules, which would otherwise cost registers on every block."""
    seen_lo = 0  # keys seen_lo .. seen_hi are inside every query's causal and window bounds
    seen_hi = Tk
    if CAUSAL:
        seen_hi = tl.minimum(seen_hi, first + 1)
    if WINDOW:
        seen_lo = tl.maximum(last - window + 1, 0)
        if not CAUSAL:
            seen_hi = tl.minimum(seen_hi, first + window)
    open_start = tl.minimum(tl.maximum(tl.cdiv(seen_lo, BLOCK_N) * BLOCK_N, window_start), stop)
    open_stop = tl.maximum(tl.minimum(tl.maximum(seen_hi, 0) // BLOCK_N * BLOCK_N, stop), open_start)
    return open_start, open_stop


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    start,
    pos,
    row_ok,
    k_base,
    v_base,
    mask_rows,
    Tk,
    D,
    DV,
    window,
    sinks,
    scale,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_mk,
    RULES: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step: the query tile q (BLOCK_M, BLOCK_D) at key positions pos (BLOCK_M,) against keys
    start..start + BLOCK_N. acc (BLOCK_M, BLOCK_DV) is unnormalised; m_i and l_i are the rows' running max
    and sum of exp(score - m_i). RULES: apply Tk, causality, the window and the sinks per element
    (False only for blocks every row may see whole)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = start + offs_n
    key_ok = keys < Tk
    first = tl.cast(start, tl.int64)  # token offsets times strides can pass 2^31 in a long cache
    k_ptrs = k_base + first * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_M, BLOCK_N)

    if MASK_KIND != 0:
        mask_ptrs = mask_rows[:, None] + (first + offs_n)[None, :] * stride_mk
        mask_ok = row_ok[:, None] & key_ok[None, :]
        if MASK_KIND == 1:
            scores = tl.where(tl.load(mask_ptrs, mask=mask_ok, other=0) != 0, scores, float("-inf"))
        else:
            scores += tl.load(mask_ptrs, mask=mask_ok, other=0.0).to(tl.float32)
    if RULES:
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (keys[None, :] <= pos[:, None])
        if WINDOW:
            near = keys[None, :] > pos[:, None] - window
            if not CAUSAL:
                near = near & (keys[None, :] < pos[:, None] + window)
            valid = valid & (near | (keys[None, :] < sinks))
        scores = tl.where(valid, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp(-inf - 0) = 0, never NaN
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptrs = v_base + first * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    H,
    N_REP,
    Tq,
    Tk,
    D,
    DV,
    window,
    sinks,
    scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M, Dv) output tile: queries start_m.. of head h of batch b against kv head h // N_REP. The
    visible key blocks in order: the sinks', the window's edge, its open middle (no per-element rules), the
    causal diagonal or the window's far edge."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kv_h = h // N_REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Tq
    pos = offs_m + (Tk - Tq)
    rows = offs_m.to(tl.int64)

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    mask_rows = mask_ptr + b * stride_mb + h * stride_mh + rows * stride_mt

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    first = start_m + (Tk - Tq)
    last = tl.minimum(start_m + BLOCK_M, Tq) - 1 + (Tk - Tq)
    sink_stop, window_start, stop = _key_blocks(first, last, Tk, window, sinks, CAUSAL, WINDOW, BLOCK_N)
    open_start, open_stop = _open_blocks(first, last, Tk, window, window_start, stop, CAUSAL, WINDOW, BLOCK_N)
    for start in range(0, sink_stop, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, start, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            True, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip
    for start in range(window_start, open_start, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, start, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            True, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip
    for start in range(open_start, open_stop, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, start, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            False, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip
    for start in range(open_stop, stop, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, start, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            True, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no key: acc is 0, so is the output
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    max_ptr,
    sum_ptr,
    acc_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    H_KV,
    N_REP,
    Tq,
    Tk,
    D,
    DV,
    window,
    sinks,
    scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Split ``split`` of kv head kv_h of batch b: the group's n_rep · Tq query rows (row r is query r % Tq of
    head kv_h · n_rep + r // Tq) against a contiguous run of the visible key blocks. Writes the rows' max, sum
    and unnormalised output to the partial buffers, (B · Hkv, splits, rows[, Dv]) contiguous fp32."""
    bkv = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b, kv_h = bkv // H_KV, bkv % H_KV
    n_rows = N_REP * Tq
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_r < n_rows
    heads = kv_h * N_REP + offs_r // Tq
    queries = (offs_r % Tq).to(tl.int64)
    pos = offs_r % Tq + (Tk - Tq)

    q_rows = q_ptr + b * stride_qb + heads * stride_qh + queries * stride_qt
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    mask_rows = mask_ptr + b * stride_mb + heads * stride_mh + queries * stride_mt

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    sink_stop, window_start, stop = _key_blocks(Tk - Tq, Tk - 1, Tk, window, sinks, CAUSAL, WINDOW, BLOCK_N)
    sink_blocks = tl.cdiv(sink_stop, BLOCK_N)
    n_blocks = sink_blocks + tl.cdiv(tl.maximum(stop - window_start, 0), BLOCK_N)
    per_split = tl.cdiv(n_blocks, n_splits)
    block_lo = split * per_split
    block_hi = tl.minimum(block_lo + per_split, n_blocks)
    for block in range(block_lo, tl.minimum(block_hi, sink_blocks)):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, block * BLOCK_N, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            True, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip
    for block in range(tl.maximum(block_lo, sink_blocks), block_hi):
        start = window_start + (block - sink_blocks) * BLOCK_N
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, start, pos, row_ok, k_base, v_base, mask_rows, Tk, D, DV, window, sinks,
            scale, stride_kt, stride_kd, stride_vt, stride_vd, stride_mk,
            True, CAUSAL, WINDOW, MASK_KIND, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )  # fmt: skip

    partial = (bkv * n_splits + split) * n_rows + offs_r  # (BLOCK_M,) row indices into the partial buffers
    tl.store(max_ptr + partial, m_i, mask=row_ok)
    tl.store(sum_ptr + partial, l_i, mask=row_ok)
    tl.store(acc_ptr + partial[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _combine_kernel(
    max_ptr,
    sum_ptr,
    acc_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    H_KV,
    N_REP,
    Tq,
    DV,
    n_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One output row (row r of kv-head group bkv): the splits' partials rescaled to their common max, summed,
    normalised. A split that saw no key has max -inf and weighs 0; a row no split saw returns zeros."""
    bkv = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    b, kv_h = bkv // H_KV, bkv % H_KV
    n_rows = N_REP * Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < n_splits
    partial = (bkv * n_splits + offs_s) * n_rows + r
    m = tl.load(max_ptr + partial, mask=split_ok, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(tl.load(sum_ptr + partial, mask=split_ok, other=0.0) * weight, axis=0)
    acc_ptrs = acc_ptr + partial[:, None] * DV + offs_dv[None, :]
    acc = tl.load(acc_ptrs, mask=split_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # (BLOCK_S, BLOCK_DV)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    head = kv_h * N_REP + r // Tq
    out_ptrs = out_ptr + b * stride_ob + head * stride_oh + (r % Tq) * stride_ot + offs_dv * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


# -------------------------------------------------------------------------------------------------- launchers


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take these operands (the caller falls back to ``attention_cpu``), or None. Shapes
    the op does not define are ``check_shapes``' to reject, not this function's."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"the kernels take 4-d q, k, v, got {q.dim()}-d, {k.dim()}-d, {v.dim()}-d"
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the kernels take q, k, v of one float32/float16/bfloat16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]} (q, k) and {v.shape[-1]} (v) must be at most {MAX_HEAD_DIM}"
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if len({t.device for t in tensors}) > 1:
        return f"operands on several devices: {', '.join(str(t.device) for t in tensors)}"
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        return f"the mask must be bool or float, got {mask.dtype}"
    if mask is not None and mask.dim() > 4:
        return f"the mask must broadcast to (B, Hq, Tq, Tk), got {mask.dim()} dims"
    return None


def flash_attention(
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
    """``passforge::attention`` on the kernels: :func:`flash_decode` for a few queries per kv-head group (Tq <=
    16 and n_rep · Tq <= 64 rows, 32 for fp32 with head dim 256: each K/V block is read once per group, and
    splits fill the GPU), else :func:`flash_attention_forward`. Raises ValueError for operands
    :func:`unsupported` names."""
    check_shapes(q, k, v, window, sinks)
    options = {"causal": causal, "scale": scale, "window": window, "sinks": sinks}
    rows = q.shape[2] * (q.shape[1] // k.shape[1])
    if q.shape[2] <= DECODE_MAX_QUERIES and rows <= _decode_max_rows(q.shape[-1], v.shape[-1], q.element_size()):
        return flash_decode(q, k, v, mask, **options)
    return flash_attention_forward(q, k, v, mask, **options)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), mask? -> (B, Hq, Tq, Dv) in q's dtype, as
    ``attention_reference`` defines it. ``block_m``/``block_n``: tile sizes (powers of two >= 16; tests),
    else :func:`_forward_tiles`'."""
    _check("flash_attention_forward", q, k, v, mask, window, sinks)
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = empty_output(q, v)  # the op's layout, (B, Tq, Hq, Dv) in memory: the kernels store through strides
    if out.numel() == 0:
        return out
    tile_m, tile_n, num_warps, num_stages = _forward_tiles(d, dv, q.element_size())
    block_m, block_n = block_m or tile_m, block_n or tile_n
    mask_kind, mask_arg, mask_strides = _mask_operand(mask, q, tk)
    grid = (triton.cdiv(tq, block_m), b * hq)
    _forward_kernel[grid](
        q, k, v, mask_arg, out, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        hq, hq // hkv, tq, tk, d, dv, window, sinks, _scale(scale, d),
        CAUSAL=causal, WINDOW=window > 0, MASK_KIND=mask_kind, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_padded(d), BLOCK_DV=_padded(dv), DOT_PRECISION=_dot_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def flash_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
    n_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The same contract as :func:`flash_attention_forward` for a few queries (n_rep · Tq <= 64 rows per kv-head
    group, 32 for fp32 with head dim 256; decode is Tq = 1): flash-decoding, the visible keys cut into
    ``n_splits`` runs of whole key blocks (default :func:`decode_splits`) whose partial softmaxes a second kernel
    combines. ``block_n``: the key block (a power of two >= 16; tests), else :func:`_decode_tiles`'."""
    _check("flash_decode", q, k, v, mask, window, sinks)
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows, max_rows = hq // hkv * tq, _decode_max_rows(d, dv, q.element_size())
    if rows > max_rows:
        raise ValueError(
            f"flash_decode: {rows} query rows per kv head (n_rep {hq // hkv} × Tq {tq}) exceed {max_rows}; "
            "use flash_attention_forward"
        )
    out = empty_output(q, v)  # the op's layout, (B, Tq, Hq, Dv) in memory: the kernels store through strides
    if out.numel() == 0:
        return out
    n_splits = n_splits or decode_splits(tq, tk, window=window, sinks=sinks)
    block_m = max(16, triton.next_power_of_2(rows))
    tile_n, num_warps = _decode_tiles(block_m, d, dv, q.element_size())
    partial_max = torch.empty((b * hkv, n_splits, rows), dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty((b * hkv, n_splits, rows, dv), dtype=torch.float32, device=q.device)
    mask_kind, mask_arg, mask_strides = _mask_operand(mask, q, tk)
    _decode_kernel[(b * hkv, n_splits)](
        q, k, v, mask_arg, partial_max, partial_sum, partial_acc, *q.stride(), *k.stride(), *v.stride(),
        *mask_strides, hkv, hq // hkv, tq, tk, d, dv, window, sinks, _scale(scale, d),
        CAUSAL=causal, WINDOW=window > 0, MASK_KIND=mask_kind, BLOCK_M=block_m, BLOCK_N=block_n or tile_n,
        BLOCK_D=_padded(d), BLOCK_DV=_padded(dv), DOT_PRECISION=_dot_precision(q),
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    _combine_kernel[(b * hkv, rows)](
        partial_max, partial_sum, partial_acc, out, *out.stride(), hkv, hq // hkv, tq, dv, n_splits,
        BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_DV=_padded(dv), num_warps=1,
    )  # fmt: skip
    return out


def decode_splits(tq: int, tk: int, *, window: int, sinks: int) -> int:
    """Splits for :func:`flash_decode`: one per ``KEYS_PER_SPLIT`` keys the queries can see (all Tk without a
    window; the sinks and the window's span with one), at most ``MAX_SPLITS``."""
    visible = tk
    if window:
        lo = max(0, tk - tq - window + 1)  # the first query's window starts here; the last query sees up to Tk
        visible = min(sinks, lo) + tk - lo
    return max(1, min(MAX_SPLITS, triton.cdiv(visible, KEYS_PER_SPLIT)))


def _check(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, window: int, sinks: int
) -> None:
    check_shapes(q, k, v, window, sinks)
    reason = unsupported(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"{name}: {reason}; passforge::attention falls back to PyTorch for such operands")


def _forward_tiles(d: int, dv: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward by the widest padded head dim: tall f16/bf16
    tiles on 8 warps, short ones for fp32 (IEEE fp32 dots run on FMAs, not tensor cores, and hold far more in
    registers). Picked from ptxas's register and spill reports for sm_90 (little or no spilling without a mask),
    not from timings."""
    width = max(_padded(d), _padded(dv))
    if element_size == 4:
        return (32, 32, 4, 2) if width <= 64 else (16, 32, 8 if width > 128 else 4, 1)
    if width <= 64:
        return 128, 64, 8, 3
    return (128, 32, 8, 2) if width <= 128 else (64, 32, 8, 2)


def _decode_max_rows(d: int, dv: int, element_size: int) -> int:
    """The most query rows of one kv-head group a decode program holds: ``DECODE_MAX_ROWS``, fewer where the
    query tile would pass ``DECODE_MAX_TILE_BYTES`` (its shared memory would not fit an sm_86's 99 KiB)."""
    return min(DECODE_MAX_ROWS, DECODE_MAX_TILE_BYTES // (max(_padded(d), _padded(dv)) * element_size))


def _decode_tiles(block_m: int, d: int, dv: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a decode tile of block_m query rows: 64 keys while the query tile is at most
    4 KiB, else 32; 8 warps above 16 rows. From ptxas's spill reports for sm_90, as the forward's."""
    tile_bytes = block_m * max(_padded(d), _padded(dv)) * element_size
    return 64 if tile_bytes <= 4096 else 32, 4 if block_m <= 16 else 8


def _mask_operand(mask: torch.Tensor | None, q: torch.Tensor, tk: int) -> tuple[int, torch.Tensor, tuple[int, ...]]:
    """(MASK_KIND, the tensor the kernel reads, its 4 strides). The mask is viewed as 4-d and expanded to
    (B, Hq, Tq, Tk), which gives its broadcast dims stride 0 without copying; a bool mask is read as uint8."""
    if mask is None:
        return MASK_NONE, q, (0, 0, 0, 0)  # q stands in for the pointer: MASK_NONE never reads it
    full = (*q.shape[:3], tk)
    try:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(full)
    except RuntimeError as error:
        raise ValueError(f"attention: mask {tuple(mask.shape)} does not broadcast to {full}") from error
    if mask.dtype == torch.bool:
        return MASK_BOOL, mask.view(torch.uint8), mask.stride()
    return MASK_ADD, mask, mask.stride()


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _padded(dim: int) -> int:
    """A head dim as a tile width: the next power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(dim))


def _dot_precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only means anything for fp32 operands
