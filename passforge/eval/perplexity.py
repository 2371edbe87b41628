"""Perplexity of a causal LM over a token stream, for any ``tokens -> logits`` callable.

Taking a callable rather than an ``nn.Module`` lets the same code score the eager model and any
transformed graph module, so a pass can be judged by the perplexity change it causes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ModelFn = Callable[[Tensor], Tensor]


def perplexity(
    model_fn: ModelFn,
    token_ids: Tensor,
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> float:
    """``exp(mean next-token NLL)`` of ``token_ids`` (1-D int64) under ``model_fn``.

    Windowing: window ``k`` feeds ``token_ids[k*stride : k*stride + seq_len]`` and predicts the
    same span shifted by one. Only full windows are used (a tail shorter than ``seq_len + 1``
    tokens is dropped), so every window is the same shape and batches stack. With the default
    ``stride = seq_len`` the windows are fixed and non-overlapping and every target is scored
    once. With ``stride < seq_len`` windows overlap and, after the first window, only the last
    ``stride`` targets of each window are scored: each target is still scored exactly once, but
    with at least ``seq_len - stride`` tokens of context. ``max_windows`` caps the number of
    windows (from the start) to bound the cost.

    ``model_fn(tokens (B, T)) -> logits (B, T, V)``; the loss is computed in fp32 under no_grad.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    n_windows = (token_ids.numel() - seq_len - 1) // stride + 1
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows <= 0:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {token_ids.numel()}")

    token_ids = token_ids.long()
    offsets = torch.arange(seq_len + 1, device=token_ids.device)  # (T + 1,)
    positions = torch.arange(seq_len, device=token_ids.device)  # (T,)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, n_windows, batch_size):
            starts = torch.arange(first, min(first + batch_size, n_windows), device=token_ids.device) * stride
            chunk = token_ids[starts[:, None] + offsets]  # (B, T + 1)
            logits = model_fn(chunk[:, :-1]).float()  # (B, T, V)
            nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
            nll = nll.view(chunk.shape[0], seq_len)  # (B, T)
            # First window scores all targets; later ones only the `stride` not scored before.
            scored_from = torch.where(starts == 0, 0, seq_len - stride)  # (B,)
            scored = positions[None, :] >= scored_from[:, None]  # (B, T)
            nll_sum += nll[scored].double().sum().item()
            count += int(scored.sum().item())
    return math.exp(nll_sum / count)
