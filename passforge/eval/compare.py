"""Numerical agreement metrics between a reference model's outputs and a transformed one's.

Passes such as quantization or kernel fusion change numerics; these metrics say by how much,
at the level of raw logits (max abs error), distributions (KL) and generated tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(ref: Tensor, x: Tensor) -> None:
    if ref.shape != x.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(x.shape)}")
    if ref.numel() == 0:
        raise ValueError("cannot compare empty tensors")


def logits_kl(ref_logits: Tensor, logits: Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)), vocab on the last dim, in fp32."""
    _check_same_shape(ref_logits, logits)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # (...,) one value per position
    return kl.mean().item()


def max_abs_err(ref: Tensor, x: Tensor) -> float:
    """Largest elementwise ``|ref - x|``, computed in fp32."""
    _check_same_shape(ref, x)
    return (ref.float() - x.float()).abs().max().item()


def cosine_similarity(ref: Tensor, x: Tensor) -> float:
    """Cosine of the angle between ``ref`` and ``x`` as flat vectors, in fp64: for outputs without a vocabulary
    (an encoder's hidden states) the scale-free counterpart of KL — 1.0 is the same direction."""
    _check_same_shape(ref, x)
    if torch.equal(ref, x):
        return 1.0  # exactly, where the rounding of the norms would say 0.99999988
    return F.cosine_similarity(ref.double().reshape(1, -1), x.double().reshape(1, -1)).item()


def greedy_agreement(ref_tokens: Tensor, tokens: Tensor) -> float:
    """Fraction of positions where two token sequences (e.g. greedy generations) agree."""
    _check_same_shape(ref_tokens, tokens)
    return (ref_tokens == tokens).float().mean().item()
