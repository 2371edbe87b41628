"""``cleanup``: identity rewrites, parameter-only constant folding, common subexpressions, dead code.

Before → after on the nanoGPT attention mask (``bias`` is a buffer, T static)::

    %bias   = get_attr[bias]                       %_folded_0 = get_attr[_folded_0]   # bool[1, 1, T, T]
    %slice  = aten.slice(%bias, 2, 0, T)     →     %masked = aten.masked_fill(%att, %_folded_0, -inf)
    %slice1 = aten.slice(%slice, 3, 0, T)
    %eq     = aten.eq(%slice1, 0)
    %masked = aten.masked_fill(%att, %eq, -inf)

Folding evaluates a subgraph that reads only parameters and constants once, at optimisation time, and stores
the result as a buffer — unless the result is larger than the parameters it reads (an ``expand`` would
bloat the model).
Lossless and idempotent: a second run finds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch.fx.passes.utils.matcher_utils import InternalMatch

from passforge.ir.graph import add_buffer, drop_unused_attrs, get_attr, same_shape
from passforge.passes.base import Context, Pass, PassResult
from passforge.passes.registry import register
from passforge.passes.rewrite import Rule, apply_rules


def _input_val(match: InternalMatch) -> torch.Tensor | None:
    val = match.placeholder_nodes[0].meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def _output_val(match: InternalMatch) -> torch.Tensor | None:
    val = match.returning_nodes[0].meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def _clone_is_redundant(match: InternalMatch, gm: fx.GraphModule) -> str | None:
    val = _input_val(match)
    if val is None:
        return "input has no meta['val']"
    if not val.is_contiguous():
        return f"input is not contiguous (stride {tuple(val.stride())}); a later view may need the copy"
    return None


def _same_shape(match: InternalMatch, gm: fx.GraphModule) -> str | None:
    before, after = _input_val(match), _output_val(match)
    if before is None or after is None:
        return "missing meta['val']"
    if not same_shape(before, after):
        return f"changes the shape {tuple(before.shape)} → {tuple(after.shape)}"
    return None


def _same_dtype(match: InternalMatch, gm: fx.GraphModule) -> str | None:
    before, after = _input_val(match), _output_val(match)
    if before is None or after is None:
        return "missing meta['val']"
    if before.dtype != after.dtype:
        return f"converts {before.dtype} → {after.dtype}"
    return None


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3),)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


IDENTITY_RULES: tuple[Rule, ...] = (
    Rule("contiguous-of-contiguous", lambda x: x.contiguous(), _identity, lambda: (torch.randn(3, 2).t(),),
         check=_clone_is_redundant),
    Rule("view-to-same-shape", lambda x: x.view(3, 2), _identity, _example, _same_shape, ignore_literals=True),
    Rule("reshape-to-same-shape", lambda x: x.reshape(3, 2), _identity, _example, _same_shape, ignore_literals=True),
    Rule("expand-to-same-shape", lambda x: x.expand(2, 3), _identity, _example, _same_shape, ignore_literals=True),
    *(
        Rule(f"noop-cast-to-{str(dtype).removeprefix('torch.')}", lambda x, d=dtype: x.to(d), _identity,
             lambda d=dtype: (torch.randn(2, 3, dtype=torch.float64 if d != torch.float64 else torch.float32),),
             check=_same_dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ),
)


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove identities, fold parameter-only subgraphs into buffers, merge common subexpressions, drop dead
    code. Options: ``fold`` (constant folding on/off), ``cse``."""

    name: ClassVar[str] = "cleanup"
    fold: bool = True
    cse: bool = True

    @classmethod
    def rules(cls) -> Sequence[Rule]:
        return IDENTITY_RULES

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        stats = {name: n for name, n in apply_rules(gm, IDENTITY_RULES).items() if n}
        if self.cse:  # before folding, so two equal constant subgraphs fold into one buffer
            stats["cse"] = eliminate_common_subexpressions(gm)
        if self.fold:
            stats["folded"] = fold_constants(gm)
        stats["dead"] = eliminate_dead_code(gm)
        gm.recompile()
        return PassResult(gm, modified=any(stats.values()), stats=stats)


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove nodes nobody uses (side-effecting ops stay) and the parameters only they read; returns how many
    nodes and attributes went."""
    before = len(gm.graph.nodes) + len(gm.state_dict(keep_vars=True))
    gm.graph.eliminate_dead_code()
    drop_unused_attrs(gm)
    return before - len(gm.graph.nodes) - len(gm.state_dict(keep_vars=True))


def _is_pure(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or node.is_impure():
        return False
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        return not (schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags)
    return False


def eliminate_common_subexpressions(gm: fx.GraphModule) -> int:
    """Merge nodes computing the same pure op on the same inputs, and duplicate reads of one attribute."""
    seen: dict[object, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            key: object = ("get_attr", node.target)
        elif _is_pure(node):
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("%node", n.name))
            key = (node.target, repr(args))
        else:
            continue
        twin = seen.get(key)
        if twin is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(twin)
        gm.graph.erase_node(node)
        merged += 1
    return merged


def _static_tensor(val: object) -> bool:
    return isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape)


FOLD_BARRIER_NAMESPACES = frozenset({"quantized_decomposed", "passforge"})
"""Ops other passes own the meaning of (Q/DQ, passforge kernels): folding ``dequantize(quantize(w))`` would
silently undo quantization, so these are never evaluated at optimisation time by cleanup."""


def _foldable_op(node: fx.Node) -> bool:
    target = node.target
    return _is_pure(node) and getattr(target, "namespace", None) not in FOLD_BARRIER_NAMESPACES


def fold_constants(gm: fx.GraphModule) -> int:
    """Evaluate pure nodes whose inputs are all parameters/constants; store results as buffers."""
    values: dict[fx.Node, object] = {}
    foldable: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = get_attr(gm, node.target)
            foldable.add(node)
        elif _foldable_op(node) and _static_tensor(node.meta.get("val")) and all(
            arg in foldable for arg in node.all_input_nodes
        ):
            foldable.add(node)
    # Fold the frontier: foldable compute nodes with at least one non-foldable user (or the output).
    frontier = [
        node for node in gm.graph.nodes
        if node in foldable and node.op == "call_function" and any(u not in foldable for u in node.users)
    ]
    folded = 0
    for node in frontier:
        value = _evaluate(node, values)
        if not isinstance(value, torch.Tensor) or value.nbytes > _input_bytes(node, values):
            continue
        with gm.graph.inserting_before(node):
            replacement = add_buffer(gm, "_folded", value)
        replacement.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(replacement)
        folded += 1
    return folded


def _evaluate(node: fx.Node, values: dict[fx.Node, object]) -> object:
    if node in values:
        return values[node]
    for arg in node.all_input_nodes:
        _evaluate(arg, values)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
    with torch.no_grad():
        values[node] = node.target(*args, **kwargs)
    return values[node]


CREATION_FOLD_LIMIT = 64 * 1024
"""Subgraphs that read no parameter (``arange``, ``full``) fold when their result is at most this many bytes."""


def _input_bytes(node: fx.Node, values: dict[fx.Node, object]) -> int:
    """What a fold may store: the bytes of the parameters the subgraph reads (so folding never grows the
    model), or :data:`CREATION_FOLD_LIMIT` for subgraphs that read none."""
    total = 0
    for current in _ancestors(node):
        if current.op == "get_attr":
            value = values[current]
            total += value.nbytes if isinstance(value, torch.Tensor) else 0
    return total or CREATION_FOLD_LIMIT


def _ancestors(node: fx.Node, *, through: Callable[[fx.Node], bool] = lambda _: True) -> Iterator[fx.Node]:
    """``node`` and the nodes it reads, each once, depth first; the walk continues past a node only where
    ``through(node)``."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        if through(current):
            stack.extend(current.all_input_nodes)


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """``node``'s value when it depends on parameters and constants only (no input, no impure op), evaluated
    now; None otherwise. For passes that need to know what a mask or a scale *is* (fuse-attention)."""
    values: dict[fx.Node, object] = {}

    def computed_from_constants(current: fx.Node) -> bool:
        return current.op == "call_function" and _foldable_op(current) and _static_tensor(current.meta.get("val"))

    for current in _ancestors(node, through=computed_from_constants):
        if current.op == "get_attr":
            values[current] = get_attr(gm, current.target)
        elif not computed_from_constants(current):
            return None
    value = _evaluate(node, values)
    return value if isinstance(value, torch.Tensor) else None
