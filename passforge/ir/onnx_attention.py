"""ONNX translation of ``passforge::attention``, so a graph after ``fuse-attention`` still exports.

Standard opset-21 ops, which every ONNX runtime runs and ONNX Runtime's transformer optimizer / TensorRT fuse
back into their own attention kernels::

    passforge::attention(q, k, v, mask?, causal, scale, window, sinks)
      →  k, v: Unsqueeze → Expand → Reshape to Hq heads (GQA; only when Hkv < Hq)
         s = MatMul(q, Transpose(k)) · scale, in float32
         s = Where(rules, s, −inf) with the causal/window/sinks rules as a constant bool (Tq, Tk) initializer
         s = Where(mask, s, −inf) | s + mask
         p = Softmax(s); rows with no key: 0 (Where(IsNaN(p), 0, p))
         y = MatMul(Cast(p), v)

Static shapes only (the rules are a constant of the graph's Tq × Tk). Imports onnxscript: import it only when
exporting.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset21 as op

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.kernels.attention import allowed


def _ints(values: list[int]) -> ir.Value:
    return op.Constant(value_ints=values)


def _repeat_heads(x: ir.Value, n_rep: int) -> ir.Value:
    """(B, Hkv, T, D) → (B, Hkv · n_rep, T, D), kv head h // n_rep for query head h."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    expanded = op.Expand(op.Unsqueeze(x, _ints([2])), _ints([b, h, n_rep, t, d]))
    return op.Reshape(expanded, _ints([b, h * n_rep, t, d]))


def attention(
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
) -> ir.Value:
    _, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if not all(isinstance(n, int) for n in (hq, tq, d, hkv, tk)):
        raise ValueError("passforge::attention exports with static shapes only")
    dtype = q.dtype
    k, v = _repeat_heads(k, hq // hkv), _repeat_heads(v, hq // hkv)
    scores = op.MatMul(
        op.Cast(q, to=ir.DataType.FLOAT), op.Cast(op.Transpose(k, perm=[0, 1, 3, 2]), to=ir.DataType.FLOAT)
    )
    factor = 1.0 / math.sqrt(d) if scale is None else scale
    scores = op.Mul(scores, op.Constant(value=ir.tensor(np.array(factor, dtype=np.float32))))
    neg_inf = op.Constant(value=ir.tensor(np.array(-np.inf, dtype=np.float32)))
    rules = allowed(tq, tk, causal=causal, window=window, sinks=sinks, query_start=tk - tq)
    if rules is not None:
        keep = op.Constant(value=ir.tensor(rules.numpy()))
        scores = op.Where(keep, scores, neg_inf)
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            scores = op.Where(mask, scores, neg_inf)
        else:
            scores = op.Add(scores, op.Cast(mask, to=ir.DataType.FLOAT))
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.Constant(value=ir.tensor(np.array(0.0, dtype=np.float32))), probs)
    return op.MatMul(op.Cast(probs, to=dtype), v)


TRANSLATIONS = {torch.ops.passforge.attention.default: attention}
"""torch op → onnxscript (trace-only) translation; merged over torch.onnx's own table."""
