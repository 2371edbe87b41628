"""What ``passforge::attention`` computes, its float64 reference, and its CPU implementation.

``attention(q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), mask?, *, causal, scale, window, sinks)``
returns ``(B, Hq, Tq, Dv)`` in q's dtype. Query head ``h`` reads kv head ``h // (Hq // Hkv)`` (grouped-query
attention; k and v are never repeated). Query ``i`` sits at position ``p = i + Tk - Tq`` (queries are the *last*
Tq positions of the keys: bottom-right alignment, as a decode step or a chunked prefill against a cache needs;
for Tq == Tk it is the usual causal mask). Key ``j`` is attended when all of these hold:

- ``mask`` allows it: a bool mask (True = attend) or a float mask added to the scores, broadcastable to
  (B, Hq, Tq, Tk);
- ``causal``: ``j <= p``;
- ``window > 0``: ``p - window < j`` (and ``j < p + window`` when not causal) — sliding-window attention;
- ``sinks > 0``: keys ``j < sinks`` are exempt from the window (StreamingLLM's attention sinks), not from the
  causal rule or the mask.

``scale`` defaults to ``1 / sqrt(D)``. A query row with no attendable key returns zeros (SDPA's flash kernels do
the same; its math kernel returns NaN). The output is laid out (B, Tq, Hq, Dv) in memory and returned as its
(B, Hq, Tq, Dv) transpose, as SDPA's flash kernels and flash-attn do: the usual next step,
``y.transpose(1, 2).reshape(B, T, H * D)``, is then a free view.

The CPU implementation never builds a (Tq, Tk) score matrix for a whole sequence: plain causal or unmasked calls
go to SDPA's flash CPU kernel (O(T) memory, native GQA), a long causal prompt in query blocks that each attend
only the keys up to their last query (the masked half is not computed); window/sinks calls walk query blocks,
each attending only the keys it can see (sinks + the window), so memory and time grow linearly in T. Triton
kernels for CUDA live in ``flash_attention`` (imported only for CUDA tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_BLOCK = 256  # queries per step of the windowed CPU loop: big enough for SDPA, small enough for cache
CAUSAL_BLOCK = 64  # queries per step of a long causal prefill on CPU (benchmarks/prefill_probe.py)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> None:
    """Raise ValueError (what, which shapes) for operands the op does not define."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention wants 4-d (B, H, T, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (b, hq, _, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if bk != b or v.shape[0] != b or dk != d or v.shape[1] != hkv or v.shape[2] != tk:
        raise ValueError(f"attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} kv heads")
    if window < 0 or sinks < 0:
        raise ValueError(f"attention: window={window} and sinks={sinks} must be >= 0")


def allowed(
    tq: int,
    tk: int,
    *,
    causal: bool,
    window: int,
    sinks: int,
    device: torch.device | None = None,
    query_start: int = 0,
) -> torch.Tensor | None:
    """The (tq, tk) bool matrix of the causal/window/sinks rules for queries ``query_start .. query_start + tq``
    of a call with ``Tq - Tk == tk_total - tq_total`` folded into ``query_start`` (None when nothing is ruled
    out). Positions follow the module docstring."""
    if not causal and window == 0:
        return None
    p = torch.arange(query_start, query_start + tq, device=device)
    return visible(p, torch.arange(tk, device=device), causal=causal, window=window, sinks=sinks)


def visible(p: torch.Tensor, j: torch.Tensor, *, causal: bool, window: int, sinks: int) -> torch.Tensor:
    """(len(p), len(j)) bool: may a query at position ``p[a]`` see the key at position ``j[b]``? (the rules
    only; the user's mask comes on top)."""
    p, j = p.view(-1, 1), j.view(1, -1)
    keep = j <= p if causal else torch.ones(p.shape[0], j.shape[1], dtype=torch.bool, device=p.device)
    if window:
        near = j > p - window
        if not causal:
            near &= j < p + window
        if sinks:
            near |= j < sinks
        keep &= near
    return keep


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The definition, materialised: scores (B, Hq, Tq, Tk) in ``compute_dtype``, masked softmax, @ v.
    Differentiable (the op's backward recomputes through it). Returns q's dtype."""
    check_shapes(q, k, v, window, sinks)
    tq, tk, n_rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc, vc = kc.repeat_interleave(n_rep, dim=1), vc.repeat_interleave(n_rep, dim=1)
    scores = (qc @ kc.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    keep = allowed(tq, tk, causal=causal, window=window, sinks=sinks, device=q.device, query_start=tk - tq)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask.to(compute_dtype)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: 0/0 -> 0
    return (probs @ vc).to(q.dtype)


def attention_cpu(
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
    """The op on any device without a Triton kernel: SDPA (flash CPU kernel, native GQA) in O(T) memory."""
    check_shapes(q, k, v, window, sinks)
    tq, tk = q.shape[2], k.shape[2]
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)  # SDPA wants an additive mask in q's dtype
    if mask is not None and mask.dtype == torch.bool and not causal and window == 0 and q.device.type == "cpu":
        k, v, mask = _trim_unseen_keys(k, v, mask)
    if window == 0 or (window >= tk and (causal or tq <= tk)):  # every key is inside the window: sinks change nothing
        if causal and mask is None and tq == tk >= 4 * CAUSAL_BLOCK and q.device.type == "cpu":
            return _causal_in_query_blocks(q, k, v, scale)
        if causal and (mask is not None or tq != tk):
            keep = allowed(tq, tk, causal=True, window=0, sinks=0, device=q.device, query_start=tk - tq)
            mask = _merge(mask, keep, q.dtype)
            causal = False
        return heads_last(_sdpa(q, k, v, mask, causal=causal, scale=scale))
    out = empty_output(q, v)
    for start in range(0, tq, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, tq)
        p0, p1 = start + tk - tq, stop + tk - tq  # key positions of this block's first and one-past-last query
        lo = max(0, p0 - window + 1)
        hi = max(lo, min(tk, p1 if causal else p1 + window - 1))
        n_sinks = min(sinks, lo)  # sinks at or after lo are inside the window's range already
        if n_sinks + hi - lo == 0:  # queries before the first key (Tq > Tk): nothing to attend
            out[:, :, start:stop] = 0
            continue
        positions = torch.cat([torch.arange(n_sinks), torch.arange(lo, hi)]).to(q.device)
        keep = visible(torch.arange(p0, p1, device=q.device), positions, causal=causal, window=window, sinks=sinks)
        block_mask = None if mask is None else _keys(_rows(mask, start, stop), -1, n_sinks, lo, hi)
        block = _sdpa(
            q[:, :, start:stop],
            _keys(k, 2, n_sinks, lo, hi),
            _keys(v, 2, n_sinks, lo, hi),
            _merge(block_mask, keep, q.dtype),
            causal=False,
            scale=scale,
        )
        out[:, :, start:stop] = block
    return out


def _causal_in_query_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of a long prompt, ``CAUSAL_BLOCK`` queries at a time, each block attending only the keys
    up to its last query (a bottom-right causal mask over them). SDPA's CPU flash kernel, given ``is_causal``,
    runs a 512-token prompt no faster than the same attention unmasked; skipping the upper triangle block by
    block does half the work (1.34x at 512 tokens, docs/benchmarks.md)."""
    out = empty_output(q, v)
    t = q.shape[2]
    for start in range(0, t, CAUSAL_BLOCK):
        stop = min(start + CAUSAL_BLOCK, t)
        keep = torch.ones(stop - start, stop, dtype=torch.bool, device=q.device).tril(start)
        out[:, :, start:stop] = _sdpa(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], keep, causal=False,
                                      scale=scale)
    return out


def _keys(t: torch.Tensor, dim: int, n_sinks: int, lo: int, hi: int) -> torch.Tensor:
    """Keys ``0 .. n_sinks`` then ``lo .. hi`` of ``t`` along ``dim`` (a view when there are no sinks; a mask
    broadcast along the keys stays as it is)."""
    if t.shape[dim] == 1:
        return t
    window = t.narrow(dim, lo, hi - lo)
    return torch.cat([t.narrow(dim, 0, n_sinks), window], dim) if n_sinks else window


def _trim_unseen_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the keys after the last one any query may see (views, no copy). A decode step over a static cache
    masks everything past ``pos``: this reads ``pos + 1`` cache slots instead of all of them. Exact: masked
    keys add nothing. (CPU only: finding the last key syncs, which is free here and not on a GPU.)"""
    if mask.shape[-1] != k.shape[2]:
        return k, v, mask
    seen = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()  # (n, 1): the keys some query sees, ascending
    last = int(seen[-1]) + 1 if len(seen) else 1  # keep one key when none is seen: every row is empty anyway
    if last == k.shape[2]:
        return k, v, mask
    return k[:, :, :last], v[:, :, :last], mask[..., :last]


def empty_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, Hq, Tq, Dv) output in the op's layout: (B, Tq, Hq, Dv) in memory."""
    b, h, t, _ = q.shape
    return q.new_empty((b, t, h, v.shape[-1])).transpose(1, 2)


def heads_last(out: torch.Tensor) -> torch.Tensor:
    """``out`` (B, H, T, D) in the op's layout, copied only when it is not already."""
    if out.transpose(1, 2).is_contiguous():
        return out
    return empty_output(out, out).copy_(out)


def _rows(mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of a 4-d mask broadcastable to (B, H, Tq, Tk) (a broadcast row dim stays as it is)."""
    return mask if mask.shape[-2] == 1 else mask[..., start:stop, :]


def _merge(mask: torch.Tensor | None, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One additive SDPA mask from the user's (bool or additive) mask and the rules' bool matrix (SDPA's CPU
    flash kernel turns a bool mask into an additive one on every call anyway)."""
    if mask is not None and mask.dtype == torch.bool:
        keep, mask = mask & keep, None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device) if mask is None else mask  # in q's dtype
    return bias.masked_fill(~keep, float("-inf"))


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """SDPA with k/v in their own head count; a single-query call folds each query group onto its kv head
    ((B, Hkv, n_rep, D) queries against one kv head), which is what the decode shape needs to read each kv
    head once."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    n_rep = hq // hkv
    if tq == 1 and n_rep > 1 and not causal and (mask is None or mask.shape[1] == 1):
        out = F.scaled_dot_product_attention(q.view(b, hkv, n_rep, d), k, v, attn_mask=mask, scale=scale)
        return out.view(b, hq, 1, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=n_rep > 1)
