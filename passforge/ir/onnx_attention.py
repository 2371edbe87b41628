"""ONNX translations of ``passforge::attention``, so a graph after ``fuse-attention`` still exports.

``export_onnx(..., attention=FORM)`` writes every call in one of three forms. Each returns the op's *logical*
value, (B, Hq, Tq, Dv): ONNX values have no strides, so the (B, Tq, Hq, Dv) memory layout of the op is not
something a file can say, and the ``transpose(1, 2)`` the model applies next is exported as a Transpose.

``"decompose"`` (default): standard opset-21 ops, which every ONNX runtime runs and ONNX Runtime's transformer
optimizer / TensorRT fuse back into their own attention kernels::

    passforge::attention(q, k, v, mask?, causal, scale, window, sinks)
      →  k, v: Unsqueeze → Expand → Reshape to Hq heads (GQA; only when Hkv < Hq)
         s = MatMul(q, Transpose(k)) · scale, in float32
         s = Where(rules, s, −inf) with the causal/window/sinks rules as a constant bool (Tq, Tk) initializer
         s = Where(mask, s, −inf) | s + mask
         p = Softmax(s); rows with no key: 0 (Where(IsNaN(p), 0, p))
         y = MatMul(Cast(p), v)

``"onnx"``: the standard fused op, ``Attention`` (opset 23), on the 4-D operands as they are (native GQA)::

      →  y = Attention(q, k, v, attn_mask?, is_causal, scale)

Its ``is_causal`` is aligned bottom-right only against a ``past_key`` input (without one, query 0 sees key 0
alone), so it is set for Tq == Tk only; the other causal calls, windows and sinks pass the rules as a
constant bool (Tq, Tk) ``attn_mask`` — the matrix the decomposition uses, so exact — composed with the call's
mask: ``And(mask, rules)`` for a bool mask, ``Where(rules, mask, −inf)`` for an additive one (cast to q's
dtype, as the spec and passforge's CPU kernel do). A query row with no key is zeros by the spec (its
errata), as passforge defines it. ONNX Runtime reads masks of rank 2–4 whose query dim is spelled out, so a
mask that broadcasts along the queries is Expanded first. Dims may be dynamic when no rule matrix is needed
(plain causal with Tq and Tk the same dim, or the call's own mask).

``"ort-gqa"``: ONNX Runtime's ``com.microsoft.GroupQueryAttention`` (ONNX Runtime only), on (B, T, H·D)
operands::

      →  q, k, v: Transpose(0, 2, 1, 3) → Reshape (B, T, H·D)
         y = GroupQueryAttention(q, k, v, seqlens_k = Tk − 1, total_sequence_length = Tk, attention_bias?,
                                 causal, local_window_size = window (causal, no sinks), scale)
         y: Reshape (B, T, Hq, Dv) → Transpose(0, 2, 1, 3); with a mask, Where(IsNaN(y), 0, y)

The other rules and the mask become one additive ``attention_bias`` (0 / −inf). ONNX Runtime returns NaN for
a query row the bias empties, hence the guard. Without a past cache the op takes as many keys as queries,
so a decode step (1 query against the cache) is decomposed, as is a call with dynamic dims (the sequence
lengths are constants) or with v's head size unlike q's.

A call the chosen form cannot express is decomposed and the reason recorded (``export_onnx`` warns with
the list). Imports onnxscript: import it only when exporting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnxscript import ir, values
from onnxscript import opset21 as op

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.ir.onnx_export import ATTENTION_FORMS, ATTENTION_OPSET, AttentionForm
from passforge.kernels.attention import allowed

Translation = Callable[..., ir.Value]


def _ints(values: list[int]) -> ir.Value:
    return op.Constant(value_ints=values)


def _scalar(value: float, dtype: ir.DataType) -> ir.Value:
    """A float32 constant in ``dtype`` (the optimizer folds the Cast; numpy has no bfloat16)."""
    return op.Cast(op.Constant(value=ir.tensor(np.array(value, dtype=np.float32))), to=dtype)


def _static(*dims: object) -> bool:
    return all(isinstance(d, int) for d in dims)


def _repeat_heads(x: ir.Value, n_rep: int) -> ir.Value:
    """(B, Hkv, T, D) → (B, Hkv · n_rep, T, D), kv head h // n_rep for query head h."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    expanded = op.Expand(op.Unsqueeze(x, _ints([2])), _ints([b, h, n_rep, t, d]))
    return op.Reshape(expanded, _ints([b, h * n_rep, t, d]))


def decompose(
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
) -> ir.Value:
    """The call as standard opset-21 ops; see the module docstring."""
    _, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if not _static(hq, tq, d, hkv, tk):
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


def _rules(q: ir.Value, k: ir.Value, causal: bool, window: int, sinks: int) -> ir.Value | None:
    """The causal/window/sinks rules as a constant bool (Tq, Tk), or None when they rule nothing out."""
    tq, tk = q.shape[2], k.shape[2]
    if not causal and window == 0:
        return None
    if not _static(tq, tk):
        raise ValueError(
            "passforge::attention: a causal call with Tq != Tk, or a window, exports its rules as a constant "
            "(Tq, Tk) mask, which needs static sequence dims"
        )
    keep = allowed(tq, tk, causal=causal, window=window, sinks=sinks, query_start=tk - tq)
    return op.Constant(value=ir.tensor(keep.numpy()))


def _combined_mask(
    mask: ir.Value | None, rules: ir.Value | None, dtype: ir.DataType, additive: bool
) -> ir.Value | None:
    """The call's mask and the rules as one mask: bool (True = attend) where both are bool and ``additive``
    is not asked for, else additive in ``dtype`` (0 / −inf, plus the call's additive mask)."""
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        keep = mask if rules is None else op.And(mask, rules)
        return op.Where(keep, _scalar(0.0, dtype), _scalar(-np.inf, dtype)) if additive else keep
    if mask is not None:
        bias = op.Cast(mask, to=dtype)
        return bias if rules is None else op.Where(rules, bias, _scalar(-np.inf, dtype))
    if rules is not None and additive:
        return op.Where(rules, _scalar(0.0, dtype), _scalar(-np.inf, dtype))
    return rules


def _spelled_out(
    combined: ir.Value, mask: ir.Value | None, rules: ir.Value | None, q: ir.Value, k: ir.Value, rank: int
) -> ir.Value:
    """``combined`` (the call's ``mask`` and the (Tq, Tk) ``rules``, broadcast together) with at least ``rank``
    dims and its last two exactly (Tq, Tk): ONNX Runtime's fused attention kernels do not broadcast those.
    Leading dims broadcast as they did. (The shape is worked out here: traced values carry none.)"""
    tq, tk = q.shape[2], k.shape[2]
    shape = list(mask.shape) if mask is not None else []
    if rules is not None:
        shape = [*shape[:-2], tq, tk]
    if len(shape) >= rank and shape[-2:] == [tq, tk]:
        return combined
    ones = [1] * (max(len(shape), rank) - 2)
    if _static(tq, tk):
        return op.Expand(combined, _ints([*ones, tq, tk]))
    seq = op.Concat(op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0)
    return op.Expand(combined, op.Concat(_ints(ones), seq, axis=0) if ones else seq)


def attention_op(
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
) -> ir.Value:
    """The call as one ONNX ``Attention`` node (opset 23); see the module docstring."""
    tq, tk = q.shape[2], k.shape[2]
    is_causal = causal and window == 0 and tq == tk  # the op's own causal frontier is top-left without a past
    rules = None if is_causal else _rules(q, k, causal, window, sinks)
    attn_mask = _combined_mask(mask, rules, q.dtype, additive=False)
    if attn_mask is not None:
        attn_mask = _spelled_out(attn_mask, mask, rules, q, k, rank=2)
    attributes: dict[str, object] = {"is_causal": int(is_causal)}
    if scale is not None:
        attributes["scale"] = scale
    if q.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        attributes["softmax_precision"] = int(ir.DataType.FLOAT)  # as the decomposition and SDPA do
    return _attention(q, k, v, attn_mask, **attributes)


_Schema = onnx.defs.OpSchema


def _first_output_only(schema: _Schema) -> _Schema:
    """``schema`` with only its first output: the exporter's tracer gives a node every output its schema
    lists, and Attention's optional ones (present key/value, qk_matmul_output) are not for this use."""
    return _Schema(
        schema.name,
        schema.domain,
        schema.since_version,
        inputs=list(schema.inputs),
        outputs=schema.outputs[:1],
        type_constraints=[(c.type_param_str, c.allowed_type_strs, c.description) for c in schema.type_constraints],
        attributes=list(schema.attributes.values()),
    )


_attention = values.Op(
    values.Opset("", ATTENTION_OPSET), "Attention", _first_output_only(onnx.defs.get_schema("Attention", 23))
)
_ONE, _OPTIONAL = _Schema.FormalParameterOption.Single, _Schema.FormalParameterOption.Optional
_GQA_INPUTS = [  # (name, type, option) in ONNX Runtime's order, up to the last one written
    ("query", "T", _ONE), ("key", "T", _OPTIONAL), ("value", "T", _OPTIONAL), ("past_key", "T", _OPTIONAL),
    ("past_value", "T", _OPTIONAL), ("seqlens_k", "M", _ONE), ("total_sequence_length", "M", _ONE),
    ("cos_cache", "T", _OPTIONAL), ("sin_cache", "T", _OPTIONAL), ("position_ids", "tensor(int64)", _OPTIONAL),
    ("attention_bias", "T", _OPTIONAL),
]  # fmt: skip
_GQA_SCHEMA = _Schema(
    "GroupQueryAttention",
    "com.microsoft",
    1,
    inputs=[_Schema.FormalParameter(name, kind, param_option=option) for name, kind, option in _GQA_INPUTS],
    outputs=[_Schema.FormalParameter("output", "T")],
    type_constraints=[
        ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v, bias, output"),
        ("M", ["tensor(int32)"], "sequence lengths"),
    ],
    attributes=[
        _Schema.Attribute("num_heads", _Schema.AttrType.INT),
        _Schema.Attribute("kv_num_heads", _Schema.AttrType.INT),
        _Schema.Attribute("scale", _Schema.AttrType.FLOAT, required=False),
        _Schema.Attribute("causal", _Schema.AttrType.INT, required=False),
        _Schema.Attribute("local_window_size", _Schema.AttrType.INT, required=False),
    ],
)
"""The part of ONNX Runtime's schema this translation writes (onnx does not know com.microsoft ops, and the
exporter's tracer needs a schema to name the inputs)."""
_group_query_attention = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _GQA_SCHEMA)


def _heads_flat(x: ir.Value) -> ir.Value:
    """(B, H, T, D) → (B, T, H·D)."""
    b, h, t, d = x.shape
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), _ints([b, t, h * d]))


def group_query_attention(
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
) -> ir.Value:
    """The call as ONNX Runtime's ``GroupQueryAttention``; see the module docstring."""
    b, hq, tq, _ = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    local_window = causal and window > 0 and sinks == 0  # the op's local_window_size is exactly our window
    rules = None if local_window or window == 0 else _rules(q, k, causal, window, sinks)
    bias = _combined_mask(mask, rules, q.dtype, additive=True)
    attributes: dict[str, object] = {"num_heads": hq, "kv_num_heads": hkv}
    if not causal:
        attributes["causal"] = 0  # written only when needed: older ONNX Runtimes know no such attribute
    if local_window:
        attributes["local_window_size"] = window
    if scale is not None:
        attributes["scale"] = scale
    y = _group_query_attention(
        _heads_flat(q), _heads_flat(k), _heads_flat(v), None, None,
        op.Constant(value=ir.tensor(np.full(b, tk - 1, dtype=np.int32))),
        op.Constant(value=ir.tensor(np.array(tk, dtype=np.int32))),
        None, None, None,
        None if bias is None else _spelled_out(bias, mask, rules, q, k, rank=4),
        **attributes,
    )  # fmt: skip
    y = op.Transpose(op.Reshape(y, _ints([b, tq, hq, dv])), perm=[0, 2, 1, 3])
    if mask is not None:  # a row the mask empties is NaN in ONNX Runtime's kernel, zeros in passforge's
        y = op.Where(op.IsNaN(y), _scalar(0.0, q.dtype), y)
    return y


def _unsupported_by_group_query_attention(q: ir.Value, k: ir.Value, v: ir.Value) -> str | None:
    """Why ``GroupQueryAttention`` cannot take this call, or None."""
    b, _, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    if not _static(b, tq, tk, d, dv):
        return "dynamic dims (GroupQueryAttention's sequence lengths are written as constants)"
    if tq != tk:
        return (
            f"{tq} {'query' if tq == 1 else 'queries'} against {tk} keys (GroupQueryAttention without a past "
            "cache takes as many keys as queries; a decode step reads its whole cache)"
        )
    if dv != d:
        return f"v's head size {dv} is not q's {d}"
    return None


_FORMS: dict[str, tuple[Translation, Callable[..., str | None] | None]] = {
    "onnx": (attention_op, None),  # every call fits: the rules ride in its mask
    "ort-gqa": (group_query_attention, _unsupported_by_group_query_attention),
}


def translations(form: AttentionForm, fallbacks: list[tuple[str, str]]) -> dict[torch._ops.OpOverload, Translation]:
    """torch op → onnxscript (trace-only) translation writing ``form``; merged over torch.onnx's own table.

    A call ``form`` cannot express is decomposed and ``(q's name, reason)`` appended to ``fallbacks``."""
    if form == "decompose":
        return {torch.ops.passforge.attention.default: decompose}
    if form not in _FORMS:
        raise ValueError(f"attention={form!r}: expected one of {', '.join(map(repr, ATTENTION_FORMS))}")
    express, unsupported = _FORMS[form]

    def translate(
        q: ir.Value,
        k: ir.Value,
        v: ir.Value,
        mask: ir.Value | None = None,
        causal: bool = False,
        scale: float | None = None,
        window: int = 0,
        sinks: int = 0,
    ) -> ir.Value:
        reason = unsupported(q, k, v) if unsupported is not None else None
        if reason is not None:
            fallbacks.append((q.name, reason))
            return decompose(q, k, v, mask, causal, scale, window, sinks)
        return express(q, k, v, mask, causal, scale, window, sinks)

    return {torch.ops.passforge.attention.default: translate}
