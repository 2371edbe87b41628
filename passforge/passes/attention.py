"""``fuse-attention``: attention, however it was written, becomes one ``passforge::attention`` call.

Before → after (nanoGPT's hand-written causal attention, and a GQA model's SDPA call)::

    %kt  = aten.transpose(%k, -2, -1)
    %s   = aten.matmul(%q, %kt)                          # (B, H, T, T)
    %s2  = aten.mul(%s, 0.125)
    %m   = aten.eq(aten.slice(...%tril...), 0)    →      %y = passforge.attention(%q, %k, %v, None,
    %s3  = aten.masked_fill(%s2, %m, -inf)                                        causal=True, scale=0.125)
    %p   = aten.softmax(%s3, -1)
    %y   = aten.matmul(%p, %v)

    %k2 = aten._unsafe_view(aten.clone(aten.expand(aten.unsqueeze(%k, 2), [B, 4, 2, T, D])), [B, 8, T, D])
    %y  = aten.scaled_dot_product_attention(%q, %k2, %v2, %mask)   →   %y = passforge.attention(%q, %k, %v, %mask)

The op never materialises the T×T scores nor the repeated k/v (see ``kernels/attention.py``).

One matcher with tagged variants, not a rule per spelling: attention is anchored at its softmax (or SDPA call)
and read outwards, so every combination of these is one match: the scale as ``mul``/``div`` on the scores, on q,
on k (both), before or after the mask; the mask as ``masked_fill(-inf)``, ``where(keep, s, -inf)``, an additive
bias, or SDPA's ``attn_mask``/``is_causal``; softmax in fp32 with casts around it; dropout in eval; k/v head
repetition as ``unsqueeze → expand → clone → reshape`` (HF ``repeat_kv``), ``expand`` of one head (MQA) or
``repeat_interleave``. A mask computed only from buffers and constants (a ``tril`` buffer, HF's ``arange``
masks) is evaluated now: causal becomes ``causal=True``, a sliding window ``window=W``, all-visible is dropped;
any other mask (a padding mask, a decode step's ``arange <= pos``) is passed to the op as it is.
Near misses are reported with the first reason that stopped them (``passforge explain fuse-attention``).

Lossless up to float reassociation (the op sums in a different order). Idempotent: a second run finds no
softmax and no SDPA call.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.ir.graph import fake_mode_of
from passforge.kernels.attention import allowed
from passforge.passes.base import (
    BF16_ULP,
    Context,
    Pass,
    PassResult,
    PreconditionError,
    computes_in_low_precision,
    output_scale,
)
from passforge.passes.cleanup import constant_value
from passforge.passes.registry import register

aten = torch.ops.aten
ATTENTION = torch.ops.passforge.attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
SDPA = aten.scaled_dot_product_attention.default
MATMUL = (aten.matmul.default,)
CASTS = (aten._to_copy.default, aten.to.dtype, aten.type_as.default)
PASSTHROUGH = (aten.clone.default, aten.alias.default, *CASTS)  # between softmax and @ v (dropout in eval: clone)
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
NEG_INF_LIMIT = -1e30  # a fill value at or below this counts as -inf (fp32/bf16 lowest values are -3.4e38)
FP16_LOWEST = float(torch.finfo(torch.float16).min)  # what fp16 models fill with: -inf in effect there
MAX_CHAIN = 12  # ops between the scores matmul and softmax


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not attention the op can take."""


@dataclass
class AttentionMatch:
    """One attention found in the graph: what to replace and what to call instead."""

    anchor: fx.Node  # the node computing the attention output (matmul(p, v) or the SDPA call)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None = None
    mask_kind: str = ""  # "keep" (bool, True = attend), "fill" (bool, True = masked), "add" (float bias)
    mask_factor: float = 1.0  # scale applied to an additive mask after it was added
    causal: bool = False
    window: int = 0
    scale: float = 1.0
    tags: list[str] = field(default_factory=list)
    casts: tuple[torch.dtype | None, torch.dtype | None] = (None, None)  # k, v dtypes to cast to (None: as is)

    def dtypes(self) -> tuple[torch.dtype | None, ...]:
        """q, k, v dtypes as the op will see them."""
        k_cast, v_cast = self.casts
        return _dtype(self.q), k_cast or _dtype(self.k), v_cast or _dtype(self.v)

    def where(self) -> str:
        return module_path(self.anchor)


@register
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Replace attention subgraphs (explicit or SDPA, any mask/scale/GQA spelling) with passforge::attention."""

    name: ClassVar[str] = "fuse-attention"
    rtol: ClassVar[float] = 1e-4  # the op sums scores and probabilities in another order
    atol: ClassVar[float] = 1e-4

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """fp32: reassociation (1e-4). bf16/fp16: the explicit graph rounds the scores and probabilities to the
        low dtype, the op keeps them in fp32 — the op is the more accurate one; allow 4 bf16 ulp of the output
        scale for the difference."""
        if not computes_in_low_precision(before):
            return self.rtol, self.atol
        return 0.0, 4 * BF16_ULP * output_scale(expected)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        matches, misses = [], []
        # one at a time, in graph order: a replacement reroutes its users, so a later (chained) attention is
        # matched against the graph as it is then
        for node in [n for n in gm.graph.nodes if _is_anchor(n)]:
            if getattr(node, "_erased", False):
                continue
            outcome = match_attention(gm, node)
            if isinstance(outcome, str):
                misses.append((node, outcome))
                continue
            replace(gm, outcome)
            matches.append(outcome)
        if matches:
            gm.graph.lint()
            gm.recompile()
        tags = Counter(tag for m in matches for tag in m.tags)
        stats = {"fused": len(matches), "near_misses": len(misses), **{f"tag:{t}": n for t, n in sorted(tags.items())}}
        return PassResult(gm, modified=bool(matches), stats=stats, notes=_report_lines(matches, misses))

    @classmethod
    def explain(cls, gm: fx.GraphModule) -> list[str]:
        """What the pass would fuse in ``gm`` and why the rest does not match (graph unchanged)."""
        matches, misses = find_attention(gm)
        return [f"fuse-attention: {len(matches)} match(es)", *(f"  {line}" for line in _report_lines(matches, misses))]


def _report_lines(matches: list[AttentionMatch], misses: list[tuple[fx.Node, str]]) -> list[str]:
    """One line per match (where, tags) and per near miss (where, why): the pass's notes and ``explain``."""
    lines = [f"{m.anchor.name} ({m.where()}): {', '.join(m.tags)}" for m in matches]
    return lines + [f"near miss at {node.name} ({module_path(node)}): {reason}" for node, reason in misses]


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[tuple[fx.Node, str]]]:
    """Every attention the op can take, and (node, reason) for softmax/SDPA nodes that are not one."""
    matches, misses = [], []
    for node in gm.graph.nodes:
        if _is_anchor(node):
            outcome = match_attention(gm, node)
            if isinstance(outcome, str):
                misses.append((node, outcome))
            else:
                matches.append(outcome)
    return matches, misses


def _is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (*SOFTMAX, SDPA)


def match_attention(gm: fx.GraphModule, node: fx.Node) -> AttentionMatch | str:
    """The attention anchored at ``node`` (a softmax or an SDPA call), or the reason it is not one."""
    try:
        match = _match_sdpa(node) if node.target is SDPA else _match_explicit(node)
        _check_mask_shape(match)
        _simplify_mask(gm, match)
    except NoMatch as exc:
        return str(exc)
    return match


@register
@dataclass(frozen=True)
class LocalAttention(Pass):
    """Causal attention sees only the last ``window`` positions plus the first ``sinks`` tokens.

    Longformer's sliding window with StreamingLLM's attention sinks: cost and (with a bounded cache) memory
    per token stop growing with the context. Rewrites the options of ``passforge::attention`` calls, so run
    ``fuse-attention`` first. Before → after::

        passforge.attention(%q, %k, %v, None, causal=True, scale=0.125, window=0, sinks=0)
        passforge.attention(%q, %k, %v, None, causal=True, scale=0.125, window=256, sinks=4)

    Lossy (keys further back are dropped): measured by the per-pass profile. Non-causal attention (an encoder)
    is left alone and named in the notes. Idempotent.
    """

    name: ClassVar[str] = "local-attention"
    lossy: ClassVar[bool] = True
    window: int = 256
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION]
        if not calls:
            raise PreconditionError(
                "local-attention rewrites passforge::attention calls and the graph has none; run fuse-attention "
                f"first: 'fuse-attention,local-attention(window={self.window},sinks={self.sinks})'"
            )
        changed, notes = 0, []
        for node in calls:
            if node.meta.get(LOCAL_WINDOW) == (self.window, self.sinks):
                continue
            if not node.kwargs.get("causal") and (step := decode_step_mask(node)) is not None:
                _window_decode_mask(gm, node, *step, self.window, self.sinks)
                changed += 1
                continue
            if not node.kwargs.get("causal"):
                notes.append(f"{node.name} ({module_path(node)}): not causal, left alone")
                continue
            existing = (node.kwargs.get("window", 0), node.kwargs.get("sinks", 0))
            if existing[0] and existing != (self.window, self.sinks) and LOCAL_WINDOW not in node.meta:
                notes.append(
                    f"{node.name} ({module_path(node)}): the model's own window={existing[0]}, "
                    f"sinks={existing[1]} kept (local-attention does not widen or combine windows)"
                )
                continue
            node.meta[LOCAL_WINDOW] = (self.window, self.sinks)
            options = {**node.kwargs, "window": self.window, "sinks": self.sinks}
            if options != node.kwargs:
                node.kwargs = options
                changed += 1
        if changed:
            gm.recompile()
        return PassResult(gm, modified=changed > 0, stats={"windowed": changed}, notes=notes)


LOCAL_WINDOW = "passforge.local_window"
"""``node.meta`` key: ``(window, sinks)`` of a decode step's attention windowed through its mask; the runtime
reads it to give that step a ring cache of ``sinks + window`` slots (``runtime.kv_cache.ring_kv_cache``)."""


def decode_step_mask(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(mask, key positions, pos)`` when ``node``'s mask is a decode step's ``le(arange(S), pos)`` (keys up to
    the input position ``pos``), else None."""
    mask = node.args[3] if len(node.args) > 3 else None
    if isinstance(mask, fx.Node) and LOCAL_WINDOW in mask.meta:  # windowed by local-attention already
        mask = mask.args[0]
    if not (isinstance(mask, fx.Node) and mask.target is aten.le.Tensor):
        return None
    positions, pos = mask.args
    if not (isinstance(pos, fx.Node) and pos.op == "placeholder" and isinstance(positions, fx.Node)):
        return None
    return mask, positions, pos


def _window_decode_mask(
    gm: fx.GraphModule, node: fx.Node, mask: fx.Node, positions: fx.Node, pos: fx.Node, window: int, sinks: int
) -> None:
    """A decode step over a static cache attends slot j when ``j <= pos``; windowed, also ``j > pos − window`` or
    ``j < sinks``. (Its query is not at the cache's last position, so the op's own window rule cannot say it.)"""
    graph = gm.graph
    with graph.inserting_before(node):
        near = graph.call_function(aten.gt.Tensor, (positions, graph.call_function(aten.sub.Tensor, (pos, window))))
        if sinks:
            near = graph.call_function(
                aten.logical_or.default, (near, graph.call_function(aten.lt.Scalar, (positions, sinks)))
            )
        windowed = graph.call_function(aten.logical_and.default, (mask, near))
    windowed.meta[LOCAL_WINDOW] = (window, sinks)
    old = node.args[3]
    node.args = (*node.args[:3], windowed, *node.args[4:])
    node.meta[LOCAL_WINDOW] = (window, sinks)
    if old is not mask and not old.users:  # a previous window's mask
        _erase_dead(graph, old)


# ------------------------------------------------------------------------------------------------ matching


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    args = dict(zip(names, defaults))
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    if args["dropout_p"]:
        raise NoMatch(f"dropout_p={args['dropout_p']} (attention dropout in training mode)")
    q = args["query"]
    _require_4d(q, "query")
    k, k_rep, k_tag, k_cast = _unrepeat_cast(args["key"])
    v, v_rep, v_tag, v_cast = _unrepeat_cast(args["value"])
    match = AttentionMatch(node, q, k, v, causal=bool(args["is_causal"]), tags=["sdpa"], casts=(k_cast, v_cast))
    if args["enable_gqa"] and k_rep == v_rep == 1:  # SDPA's own GQA: k/v already in their head count
        k_rep = v_rep = _shape(q)[1] // max(1, _shape(k)[1])
        k_tag = "gqa:enable_gqa"
    d = _shape(q)[-1]
    match.scale = 1.0 / math.sqrt(d) if args["scale"] is None else float(args["scale"])
    mask = args["attn_mask"]
    if mask is not None:
        match.mask = mask
        match.mask_kind = "keep" if _dtype(mask) == torch.bool else "add"
    _check_heads(match, k_rep, v_rep, k_tag or v_tag)
    if match.causal and _shape(q)[2] != _shape(k)[2]:
        raise NoMatch("is_causal with Tq != Tk: SDPA aligns the mask top-left, passforge::attention bottom-right")
    return match


def _match_explicit(softmax: fx.Node) -> AttentionMatch:
    dim = softmax.args[1] if len(softmax.args) > 1 else -1
    scores = softmax.args[0]
    if not isinstance(scores, fx.Node) or len(_shape(scores)) != 4:
        raise NoMatch(f"softmax over a {len(_shape(scores))}-d tensor (attention scores are (B, H, Tq, Tk))")
    if dim not in (-1, 3):
        raise NoMatch(f"softmax over dim {dim}, not the key dim")
    pv = _follow_probabilities(softmax)
    qk, path = _scores_path(scores)
    match = AttentionMatch(pv, q=qk.args[0], k=qk.args[1], v=pv.args[1], tags=["explicit"])
    scale = 1.0
    for op, chain in path:  # from the matmul up to softmax's input
        scale = _read_score_op(op, chain, match, scale)
    q, q_scale = _peel_scale(qk.args[0])
    kt, k_scale = _peel_scale(qk.args[1])
    if q_scale != 1.0 or k_scale != 1.0:
        match.tags.append("scale-on-q/k")
    match.scale = scale * q_scale * k_scale
    match.q = q
    k, k_rep, k_tag, k_cast = _unrepeat_cast(_untranspose(kt))
    v, v_rep, v_tag, v_cast = _unrepeat_cast(pv.args[1])
    match.k, match.v, match.casts = k, v, (k_cast, v_cast)
    _require_4d(q, "q")
    _check_heads(match, k_rep, v_rep, k_tag or v_tag)
    if _dtype(softmax) == torch.float32 != _dtype(q) and "softmax-fp32" not in match.tags:
        match.tags.append("softmax-fp32")  # softmax(x, dtype=float32), as HF writes it
    if _dtype(pv) != _dtype(q):
        raise NoMatch(f"attention output is {_dtype(pv)} but q is {_dtype(q)}")
    return match


def _follow_probabilities(softmax: fx.Node) -> fx.Node:
    """softmax → (casts, dropout in eval) → matmul(p, v): the matmul."""
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise NoMatch(
                f"the attention probabilities ({node.name}) have {len(users)} users, not one "
                "(returned as attention weights?)"
            )
        user = users[0]
        if user.target in PASSTHROUGH or _is_eval_dropout(user):
            node = user
            continue
        if user.target in MATMUL and user.args[0] is node and len(_shape(user)) == 4:
            return user
        raise NoMatch(f"the probabilities feed {_op(user)}, not a matmul with v")


SCORE_OPS = (
    *CASTS,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add.Tensor,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.where.self,
    aten.where.ScalarOther,
)


def _scores_path(scores: fx.Node) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]]:
    """Walk from softmax's input down to the q @ kᵀ matmul through single-use ops; returns the matmul and
    (op, its operand on the scores side) from the matmul upwards."""
    path, node = [], scores
    for depth in range(MAX_CHAIN, 0, -1):
        if node.target in MATMUL:
            return node, path[::-1]
        if node.op != "call_function" or node.target not in SCORE_OPS:
            raise NoMatch(f"{_op(node)} ({node.name}) between the scores and softmax")
        if len(node.users) != 1:
            raise NoMatch(f"the scores ({node.name}) are used outside the attention")
        chain = [a for a in node.all_input_nodes if _reaches_matmul(a, depth - 1)]
        if len(chain) != 1:
            raise NoMatch(f"{node.name} ({_op(node)}) combines {len(chain)} score tensors")
        path.append((node, chain[0]))
        node = chain[0]
    raise NoMatch(f"no q @ kᵀ matmul within {MAX_CHAIN} ops below softmax")


def _reaches_matmul(node: fx.Node, depth: int) -> bool:
    """Whether a 4-d matmul is reachable from ``node`` through score ops within ``depth`` steps."""
    if node.target in MATMUL:
        return len(_shape(node)) == 4
    if depth <= 0 or node.op != "call_function" or node.target not in SCORE_OPS:
        return False
    return any(_reaches_matmul(a, depth - 1) for a in node.all_input_nodes)


def _read_score_op(op: fx.Node, chain: fx.Node, match: AttentionMatch, scale: float) -> float:
    """Fold one op between the matmul and softmax into ``match`` (mask) or the running ``scale``."""
    if op.target in CASTS:
        if "softmax-fp32" not in match.tags and _dtype(op) == torch.float32:
            match.tags.append("softmax-fp32")
        return scale
    if op.target in (aten.mul.Tensor, aten.div.Tensor):
        other = op.args[1] if op.args[0] is chain else op.args[0]
        factor = _scalar(other)
        if factor is None:
            raise NoMatch(f"{_op(op)} ({op.name}) scales the scores by a tensor, not a constant")
        if op.target is aten.div.Tensor:
            if op.args[1] is chain:
                raise NoMatch(f"{op.name} divides by the scores")
            factor = 1.0 / factor
        match.tags.append("scale-after-mask" if match.mask is not None else "scale")
        if match.mask_kind == "add":
            match.mask_factor *= factor
        return scale * factor
    if match.mask is not None:
        raise NoMatch(f"a second mask at {op.name} (one mask per attention is supported)")
    if op.target is aten.add.Tensor:
        bias = op.args[1] if op.args[0] is chain else op.args[0]
        if not isinstance(bias, fx.Node):
            raise NoMatch(f"{op.name} adds a constant to the scores")
        if op.kwargs.get("alpha", 1) != 1:
            raise NoMatch(f"{op.name} adds with alpha={op.kwargs['alpha']}")
        if not (_dtype(bias) is not None and _dtype(bias).is_floating_point):
            raise NoMatch(f"{op.name} adds a {_dtype(bias)} tensor to the scores (a float bias is a mask; this is not)")
        match.mask, match.mask_kind = bias, "add"
        match.tags.append("mask:additive")
    elif op.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        if op.args[0] is not chain:
            raise NoMatch(f"{op.name}: masked_fill fills the scores into another tensor")
        _require_neg_inf(op.args[2], op)
        match.mask, match.mask_kind = op.args[1], "fill"
        match.tags.append("mask:masked_fill")
    else:  # where(keep, scores, -inf)
        if op.args[1] is not chain:
            raise NoMatch(f"{op.name}: where() keeps the scores in its false branch")
        _require_neg_inf(op.args[2], op)
        match.mask, match.mask_kind = op.args[0], "keep"
        match.tags.append("mask:where")
    return scale


def _require_neg_inf(value: object, op: fx.Node) -> None:
    fill = _scalar(value)
    if fill is None or not (fill <= NEG_INF_LIMIT or (fill == FP16_LOWEST and _dtype(op) == torch.float16)):
        raise NoMatch(f"{op.name} fills masked scores with {value!r}, not -inf (or a dtype's lowest value)")


def _peel_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """``x * c`` / ``x / c`` (c a constant) → (x, c or 1/c); anything else → (node, 1)."""
    factor = 1.0
    while node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor):
        if isinstance(node.args[0], fx.Node) and (c := _scalar(node.args[1])) is not None:
            factor *= c if node.target is aten.mul.Tensor else 1.0 / c
            node = node.args[0]
        elif (
            node.target is aten.mul.Tensor
            and isinstance(node.args[1], fx.Node)
            and (c := _scalar(node.args[0])) is not None
        ):
            factor *= c
            node = node.args[1]
        else:
            break
    return node, factor


def _untranspose(kt: fx.Node) -> fx.Node:
    """kᵀ (the last two dims swapped) → k. Also the 3-D spelling ONNX exporters write (torch.onnx's SDPA
    decomposition): ``view(permute(view(k, (B·H, T, D)), [0, 2, 1]), (B, H, D, T))``."""
    if kt.op == "call_function":
        if kt.target is aten.transpose.int and {_dim(kt, kt.args[1]), _dim(kt, kt.args[2])} == {2, 3}:
            return kt.args[0]
        if kt.target is aten.permute.default and list(kt.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
            return kt.args[0]
        if (k := _untranspose_flattened(kt)) is not None:
            return k
    raise NoMatch(f"the scores matmul's right operand ({kt.name}, {_op(kt)}) is not a transposed k")


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _untranspose_flattened(kt: fx.Node) -> fx.Node | None:
    """k (B, H, T, D) for ``view(swap12(view(k, (B·H, T, D))), (B, H, D, T))``, else None."""
    swapped = kt.args[0] if kt.target in _VIEWS and isinstance(kt.args[0], fx.Node) else None
    if swapped is None or swapped.op != "call_function":
        return None
    is_swap = (swapped.target is aten.permute.default and list(swapped.args[1]) in ([0, 2, 1], [0, -1, -2])) or (
        swapped.target is aten.transpose.int and {_dim(swapped, swapped.args[1]), _dim(swapped, swapped.args[2])}
        == {1, 2}
    )
    flat = swapped.args[0] if is_swap else None
    if not isinstance(flat, fx.Node) or flat.target not in _VIEWS or not isinstance(flat.args[0], fx.Node):
        return None
    k = flat.args[0]
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in (k, flat, kt)]
    if any(shape is None for shape in shapes) or [len(shape) for shape in shapes[1:]] != [3, 4]:
        return None
    if len(shapes[0]) == 5:  # k repeated for GQA, (B, Hkv, n, T, D), flattened in the same view
        b, hkv, n, t, d = shapes[0]
        h, found = hkv * n, flat  # _unrepeat reads the repetition off the flattening view
    elif len(shapes[0]) == 4:
        (b, h, t, d), found = shapes[0], k
    else:
        return None
    (bh, t3, d3), (b2, h2, d2, t2) = shapes[1:]
    same = [(bh, b * h), (t3, t), (d3, d), (b2, b), (h2, h), (d2, d), (t2, t)]
    return found if all(statically_known_true(x == y) for x, y in same) else None


def _unrepeat_cast(node: fx.Node) -> tuple[fx.Node, int, str, torch.dtype | None]:
    """``_unrepeat``, also through a dtype cast after the repetition (``cast`` ran before this pass): then the
    dtype to cast the un-repeated tensor to comes back too (repeat and cast commute)."""
    if node.op == "call_function" and node.target is aten._to_copy.default and set(node.kwargs) == {"dtype"}:
        base, rep, tag = _unrepeat(node.args[0])
        if rep > 1:
            return base, rep, tag, node.kwargs["dtype"]
    return (*_unrepeat(node), None)


def _unrepeat(node: fx.Node) -> tuple[fx.Node, int, str]:
    """k or v with its heads repeated for GQA/MQA → (the un-repeated tensor, repeats, tag)."""
    if node.op != "call_function":
        return node, 1, ""
    if (
        node.target is aten.repeat_interleave.self_int
        and _dim(node, node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")) == 1
    ):
        return node.args[0], int(node.args[1]), "gqa:repeat_interleave"
    if node.target in VIEWS:  # (B, Hkv, n, T, D) → (B, H, T, D)
        inner = node.args[0]
        if inner.target is aten.clone.default:
            inner = inner.args[0]
        if inner.target is aten.expand.default and inner.args[0].target is aten.unsqueeze.default:
            base = inner.args[0].args[0]
            b, hkv, t, d = _shape(base) if len(_shape(base)) == 4 else (0, 0, 0, 0)
            n = _shape(inner)[2]
            # (B, H, T, D), or (B·H, T, D) when the view also flattens batch and heads (kᵀ from ONNX exports)
            if _dim(inner.args[0], inner.args[0].args[1]) == 2 and _shape(node) in (
                (b, hkv * n, t, d), (b * hkv * n, t, d)
            ):
                return base, n, "gqa:expand"
    if node.target is aten.expand.default and len(_shape(node)) == 4:  # MQA: (B, 1, T, D) → (B, H, T, D)
        base = node.args[0]
        if _shape(base)[1] == 1 and _shape(base)[0] == _shape(node)[0] and _shape(base)[2:] == _shape(node)[2:]:
            return base, _shape(node)[1], "mqa:expand"
    return node, 1, ""


def _check_heads(match: AttentionMatch, k_rep: int, v_rep: int, tag: str) -> None:
    q, k, v = (_shape(n) for n in (match.q, match.k, match.v))
    for name, shape in (("k", k), ("v", v)):
        if len(shape) != 4:
            raise NoMatch(f"{name} is {len(shape)}-d, not (B, H, T, D)")
    if q[1] != k[1] * k_rep or q[1] != v[1] * v_rep or k[1] != v[1]:
        raise NoMatch(f"head counts do not line up: q {q[1]}, k {k[1]}×{k_rep}, v {v[1]}×{v_rep}")
    if q[0] != k[0] or q[0] != v[0] or q[-1] != k[-1] or k[2] != v[2]:
        raise NoMatch(f"shapes do not line up: q {tuple(q)}, k {tuple(k)}, v {tuple(v)}")
    if len(set(match.dtypes())) != 1:
        raise NoMatch("q, k, v dtypes differ: {}, {}, {}".format(*match.dtypes()))
    if tag:
        match.tags.append(f"{tag}×{q[1] // k[1]}")


def _check_mask_shape(match: AttentionMatch) -> None:
    """The mask must broadcast *into* (B, Hq, Tq, Tk): a mask that would enlarge the output is not one."""
    if match.mask is None:
        return
    b, hq, tq, _ = _shape(match.q)
    target = (b, hq, tq, _shape(match.k)[2])
    shape = _shape(match.mask)
    if len(shape) > 4 or any(m not in (1, t) for m, t in zip(reversed(shape), reversed(target))):
        raise NoMatch(f"the mask {tuple(shape)} does not broadcast into the scores {target}")


def _simplify_mask(gm: fx.GraphModule, match: AttentionMatch) -> None:
    """A mask that is a constant (buffers, aranges) is read now: causal/window masks become flags."""
    if match.mask is None:
        return
    value = constant_value(gm, match.mask)
    if value is None:
        match.tags.append("mask:runtime")
        return
    if match.mask_kind == "add":
        finite = value[value > NEG_INF_LIMIT]
        if finite.numel() and bool((finite != 0).any()):
            match.tags.append("mask:constant-bias")  # a real bias (ALiBi-like): keep it
            return
        keep = value > NEG_INF_LIMIT
    else:
        keep = ~value if match.mask_kind == "fill" else value
    tq, tk = _shape(match.q)[2], _shape(match.k)[2]
    keep = keep.expand(*keep.shape[:-2], tq, tk) if keep.dim() >= 2 else keep.expand(tq, tk)
    rows = keep.reshape(-1, tq, tk)
    if not bool((rows == rows[:1]).all()):
        match.tags.append("mask:constant")  # differs per batch/head: keep it
        return
    keep = rows[0]
    if bool(keep.all()) and not match.causal:
        found: tuple[bool, int] | None = (False, 0)
    else:
        found = _causal_window(keep, tq, tk, match.causal)
    if found is None:
        match.tags.append("mask:constant")
        return
    match.causal, match.window = found
    match.mask, match.mask_kind = None, ""
    match.tags.append(
        "mask→" + ("causal" if match.causal else "none") + (f"+window={match.window}" if match.window else "")
    )


def _causal_window(keep: torch.Tensor, tq: int, tk: int, causal: bool) -> tuple[bool, int] | None:
    """(causal, window) whose rule equals ``keep`` (already AND-ed with ``causal`` by the op), or None."""
    causal_keep = allowed(tq, tk, causal=True, window=0, sinks=0, query_start=tk - tq)
    if causal:
        keep = keep & causal_keep
    if torch.equal(keep, causal_keep):
        return True, 0
    window = int(keep[-1].sum())
    if 0 < window < tk and torch.equal(keep, allowed(tq, tk, causal=True, window=window, sinks=0, query_start=tk - tq)):
        return True, window
    return None


# ------------------------------------------------------------------------------------------------ rewriting


def replace(gm: fx.GraphModule, match: AttentionMatch) -> fx.Node:
    """Insert ``passforge::attention`` for ``match``, reroute the output, drop what only fed the old subgraph."""
    graph = gm.graph
    inserted: list[fx.Node] = []

    def call(target: object, args: tuple, kwargs: dict | None = None) -> fx.Node:
        inserted.append(graph.call_function(target, args, kwargs or {}))
        return inserted[-1]

    with graph.inserting_before(match.anchor):
        mask = match.mask
        if mask is not None and match.mask_kind == "fill":
            mask = call(aten.logical_not.default, (mask,))
        elif mask is not None and match.mask_kind == "add" and match.mask_factor != 1.0:
            mask = call(aten.mul.Tensor, (mask, match.mask_factor))
        k, v = (
            node if dtype is None else call(aten._to_copy.default, (node,), {"dtype": dtype})
            for node, dtype in zip((match.k, match.v), match.casts)
        )
        kwargs = {"causal": match.causal, "scale": match.scale, "window": match.window, "sinks": 0}
        out = fused = call(ATTENTION, (match.q, k, v, mask), kwargs)
        if _contiguous(match.anchor) and not all(_swaps_heads_and_time(user) for user in match.anchor.users):
            # the op's output is (B, T, H, D) in memory; what read a contiguous (B, H, T, D) (a view, directly
            # or after elementwise ops) gets one — unless it is the usual transpose(1, 2), for which ours is
            # better
            out = call(aten.clone.default, (fused,), {"memory_format": torch.contiguous_format})
    fused.meta["nn_module_stack"] = match.anchor.meta.get("nn_module_stack", {})
    with fake_mode_of(gm):  # shapes now, so a later (chained) match in the same run can read them
        for node in inserted:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)
    match.anchor.replace_all_uses_with(out)
    _erase_dead(graph, match.anchor)
    return fused


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` (replaced; SDPA counts as impure for its dropout RNG) and every ancestor left without users
    (only what fed the replaced subgraph)."""
    stack = node.all_input_nodes
    graph.erase_node(node)
    while stack:
        current = stack.pop()
        if current.users or current.op != "call_function" or current.is_impure():
            continue
        inputs = current.all_input_nodes
        graph.erase_node(current)
        stack.extend(inputs)


# ------------------------------------------------------------------------------------------------ helpers


def module_path(node: fx.Node) -> str:
    """The module that produced ``node`` (``model.layers.0.self_attn``), from export's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "?"
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").removeprefix("L__self___") or "?"


def _shape(node: object) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{getattr(node, 'name', node)} has no tensor meta['val'] (run shape propagation)")
    return tuple(val.shape)


def _dtype(node: fx.Node) -> torch.dtype:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _swaps_heads_and_time(node: fx.Node) -> bool:
    """``transpose(1, 2)`` / ``permute(0, 2, 1, 3)`` of a 4-d tensor: (B, H, T, D) → (B, T, H, D)."""
    if node.target is aten.transpose.int:
        return {_dim(node, node.args[1]), _dim(node, node.args[2])} == {1, 2}
    return node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1, 3]


def _contiguous(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_contiguous()


def _dim(node: fx.Node, dim: object) -> int | None:
    if not isinstance(dim, int):
        return None
    rank = len(_shape(node.args[0])) + (1 if node.target is aten.unsqueeze.default else 0)
    return dim % rank


def _scalar(value: object) -> float | None:
    """A Python number, or a 0-d constant tensor's value; None for anything computed at run time (or a tensor
    that could broadcast the operand to another shape)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(value, fx.Node)
        and value.op == "call_function"
        and value.target in (aten.scalar_tensor.default, aten.full.default)
        and not value.all_input_nodes
        and isinstance(value.meta.get("val"), torch.Tensor)
        and value.meta["val"].dim() == 0
    ):
        return float(value.args[0] if value.target is aten.scalar_tensor.default else value.args[1])
    return None


def _is_eval_dropout(node: fx.Node) -> bool:
    return node.target is aten.dropout.default and (node.args[2] is False or node.args[1] == 0)


def _require_4d(node: fx.Node, name: str) -> None:
    if len(_shape(node)) != 4:
        raise NoMatch(f"{name} is {len(_shape(node))}-d, not (B, H, T, D)")


def _op(node: fx.Node) -> str:
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return str(getattr(node.target, "__name__", node.target))
    return node.op
