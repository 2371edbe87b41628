"""Coupled channel groups: which weight rows, weight columns, per-channel tensors and shape constants must
shrink together when one channel of a graph is removed.

Removing output row ``j`` of ``gate_proj`` only makes sense if ``up_proj``'s row ``j`` and ``down_proj``'s
column ``j`` go too (``down(silu(gate(x)) * up(x))``); removing a query head in a GQA layer means removing its
whole group (the kv head and every query head reading it), the head count in four ``view``/``expand`` shapes
and ``o_proj``'s columns; removing a hidden channel touches every layer through the residual stream. Rather
than a table of module names, :func:`find_groups` follows one channel through the ATen graph: starting from a
linear's (or the embedding's) output dimension it walks, in both directions, through every op whose relation
between input and output dims it knows — pointwise ops with broadcasting, views that split or merge dims,
transposes, expands, concatenations and slices along other dims, attention (heads are the third-last dim of
q, k and v), linears (the input's last dim is the weight's columns, the output's the weight's rows) — until
every value carrying the channel is accounted for. The walk records *units*: the smallest block of elements
that must be kept or removed together in each tensor. After ``view(q, [B, T, H, hd])`` one unit of a GQA
group is ``rep`` query heads; in ``q_proj``'s weight it is ``rep * hd`` rows; in ``k_proj``'s ``hd`` rows;
every member of a group has the same number of units. RoPE slices and concatenates along ``head_dim`` inside
a unit (its paired dims are never split: heads are pruned whole, ``head_dim`` never).

A KV cache is where the layers of a generation step meet: prefill returns ``stack([k_0, ..., k_L])`` (padded to
the cache length), and decode reads layer ``i`` as ``select(k_cache, 0, i)`` and returns the stack of its
updates. In such a step graph (``find_groups(kv_caches=True)``) the walk does not couple the layers there:
the stack's part ``i`` and the ``select`` of slot ``i`` are *cache edges* (:class:`CacheEdge`), recorded on the
group and not walked through, so each layer stays its own group — when the input is read only as its layers,
each once, and the stack only returned (padded at most); anything else, and every input and output of a
forward graph (the caller's), still blocks. Pruning then shrinks the cache's heads dim, which every layer
shares: ``prune-channels`` sizes the cache for the widest layer and rewrites its shape (an input's, an
output's), a narrower layer reading and returning the first heads of its slot.

A group is *blocked*, with the reason, when the channel reaches something whose meaning would change: a
graph input or output other than a step graph's KV cache (the logits), an op the walk does not know, a view
whose split does not align with the units, a reduction over the channel (allowed only for the hidden size,
where RMSNorm's mean over fewer channels is the accepted cost), or a parameter read outside the group.

The kinds: ``mlp`` (only linears and pointwise ops between the producers and consumers), ``heads`` (reaches
attention) and ``hidden`` (the residual stream: reaches the embedding or a norm's reduction).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from passforge.ir.graph import high_padding, narrowed_slot

aten = torch.ops.aten
Kind = Literal["mlp", "heads", "hidden"]

_POINTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self, aten.masked_fill.Scalar,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.neg.default, aten.tanh.default,
    aten.sigmoid.default, aten.rsqrt.default, aten.sqrt.default, aten.pow.Tensor_Scalar, aten.exp.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten._to_copy.default, aten.to.dtype, aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.div.Scalar,
    aten.erf.default, aten.abs.default, aten.square.default, aten.reciprocal.default, aten.copy.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}


@dataclass(frozen=True)
class Slice:
    """``tensor`` (a ``get_attr`` name) shrinks along ``dim``; ``unit`` consecutive elements per unit. A piece
    of a fused projection (q, k and v in one weight) starts ``offset`` elements in."""

    name: str
    dim: int
    unit: int
    offset: int = 0

    def elements(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of the elements that units ``units`` (unit numbers, 1-D) own."""
        return unit_elements(units, self.unit, self.offset)


def unit_elements(units: torch.Tensor, unit: int, offset: int = 0) -> torch.Tensor:
    """Indices of the elements that units ``units`` (unit numbers, 1-D) own along a dim of ``unit`` elements
    per unit, starting ``offset`` elements in."""
    return (offset + units[:, None] * unit + torch.arange(unit, device=units.device)).flatten()


@dataclass(frozen=True)
class Piece:
    """A ``slice`` of, or a ``split``'s ``getitem`` from, a fused projection's output: ``offset`` and ``length``
    elements of its last dim, ``unit`` elements per unit; its bounds are rewritten after shrinking."""

    node: fx.Node
    offset: int
    length: int
    unit: int


@dataclass(frozen=True)
class ShapeArg:
    """Size argument ``position`` of a view/expand node: becomes ``kept units * unit``."""

    node: fx.Node
    position: int
    unit: int


@dataclass(frozen=True)
class CacheEdge:
    """Layer ``layer``'s slot of a KV cache: the cache's ``dim`` carries the channel, ``unit`` elements per
    unit. ``node`` is the cache input (a placeholder read through ``select(node, 0, layer)``) or the returned
    cache (the ``stack`` whose part ``layer`` this group's value is)."""

    node: fx.Node
    layer: int
    dim: int
    unit: int


@dataclass
class Group:
    """One set of coupled channels: ``units`` units; the weights producing them (``producers``: linear rows,
    embedding columns), reading them (``consumers``: linear columns), other per-channel tensors (``params``:
    biases, norm scales), and the shape constants to rewrite. ``blocked`` says why it cannot be pruned."""

    seed: fx.Node
    units: int = 0
    kind: Kind = "mlp"
    producers: list[Slice] = field(default_factory=list)
    consumers: list[Slice] = field(default_factory=list)
    params: list[Slice] = field(default_factory=list)
    shapes: list[ShapeArg] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    values: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # value -> (dim, unit)
    fused: set[fx.Node] = field(default_factory=set)  # fused projections this group owns pieces of
    caches: list[CacheEdge] = field(default_factory=list)  # the KV cache slots this layer reads and returns
    blocked: str | None = None

    @property
    def name(self) -> str:
        """The first producer's tensor: how reports and the memo name the group."""
        return self.producers[0].name if self.producers else self.seed.name

    @property
    def slices(self) -> list[Slice]:
        return [*self.producers, *self.consumers, *self.params]


class _Blocked(Exception):
    pass


class _Regroup(Exception):
    """The walk met a structure (a split into heads, GQA) whose units are ``factor`` times coarser: restart."""

    def __init__(self, factor: int) -> None:
        super().__init__(factor)
        self.factor = factor


def find_groups(gm: fx.GraphModule, *, allow_reduce: bool = False, kv_caches: bool = False) -> list[Group]:
    """Every channel group seeded at a linear's output (and the embedding's), each node in at most one.
    ``allow_reduce``: let a reduction over the channel (a norm's mean) pass, as the hidden size needs.
    ``kv_caches``: the graph is a generation step (prefill, decode), whose stacked KV caches are layer
    boundaries (:class:`CacheEdge`); elsewhere a graph's inputs and outputs are the caller's and block."""
    groups: list[Group] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in claimed or not (node.target in (aten.linear.default, aten.embedding.default) or _piece_of(node)):
            continue
        group = _walk(node, allow_reduce=allow_reduce, kv_caches=kv_caches)
        claimed.update(group.values)
        groups.append(group)
    return groups


def _walk(seed: fx.Node, *, allow_reduce: bool, kv_caches: bool) -> Group:
    dim = _ndim(seed) - 1
    unit = 1
    while True:
        group = Group(seed)
        try:
            _Walker(group, allow_reduce, kv_caches).run(seed, dim, unit)
            group.units = _size(seed, dim) // unit
            _check_units(group)
        except _Regroup as exc:
            unit *= exc.factor
            continue
        except _Blocked as exc:
            group.blocked = str(exc)
        break
    group.kind = _classify(group)
    if group.caches and group.kind != "heads" and not group.blocked:
        group.blocked = f"the channel reaches KV cache '{group.caches[0].node.name}' outside attention's heads"
    return group


class _Walker:
    """Flood fill over (value, dim, unit): each op relates the tracked dim of one operand to the others."""

    def __init__(self, group: Group, allow_reduce: bool, kv_caches: bool = False) -> None:
        self.group = group
        self.allow_reduce = allow_reduce
        self.kv_caches = kv_caches
        self.todo: list[tuple[fx.Node, int, int]] = []
        self.ops_seen: set[fx.Node] = set()

    def run(self, node: fx.Node, dim: int, unit: int) -> None:
        self.visit(node, dim, unit)
        while self.todo:
            value, _, _ = self.todo.pop()
            for op in (value, *value.users):
                self.relate(op)

    def visit(self, node: fx.Node, dim: int, unit: int) -> None:
        seen = self.group.values.get(node)
        if seen is not None:
            if seen != (dim, unit):
                raise _Blocked(f"'{node.name}' carries the channel twice (dims/units {seen} and {(dim, unit)})")
            return
        if node.op == "placeholder":
            raise _Blocked(f"the channel reaches graph input '{node.name}' (pruning would change its shape)")
        self.group.values[node] = (dim, unit)
        self.todo.append((node, dim, unit))

    def relate(self, op: fx.Node) -> None:
        """Visit every operand and the result of ``op`` that carries a channel one of them carries."""
        if op in self.ops_seen and op.op != "output":
            return
        if op.op == "output":
            raise _Blocked(f"the channel reaches the graph's outputs (through '{_tracked_inputs(self, op)}')")
        if op.op == "get_attr":
            dim, unit = self.group.values[op]
            self.group.params.append(Slice(op.target, dim, unit))
            self.ops_seen.add(op)
            return
        if op.op != "call_function":
            raise _Blocked(f"the channel reaches '{op.name}' ({op.op})")
        self.ops_seen.add(op)
        target = op.target
        if target is aten.linear.default:
            self._linear(op)
        elif target is aten.embedding.default:
            self._embedding(op)
        elif target in _POINTWISE or target is aten.type_as.default:
            self._pointwise(op)
        elif target in _VIEWS:
            self._view(op)
        elif target in (aten.transpose.int, aten.permute.default, aten.t.default):
            self._permute(op)
        elif target in (aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor):
            self._index_dim(op)
        elif target is aten.expand.default:
            self._expand(op)
        elif target in (aten.cat.default, aten.stack.default):
            self._concat(op)
        elif target in _REDUCTIONS or target in _SOFTMAX:
            self._reduce(op)
        elif target in (aten.scaled_dot_product_attention.default, _passforge_attention()):
            self._attention(op)
        elif target in (aten.matmul.default, aten.bmm.default):
            self._matmul(op)
        elif target is aten.index_copy.default:
            self._index_copy(op)
        elif target is aten.layer_norm.default:
            self._layer_norm(op)
        elif target in (aten.pad.default, aten.constant_pad_nd.default):
            self._pad(op)
        elif target is operator.getitem and _piece_of(op):
            self._piece(op)
        elif target in (aten.split.Tensor, aten.split_with_sizes.default):
            raise _Blocked(f"'{op.name}' splits a fused projection; its pieces are followed on their own")
        elif target is operator.getitem:
            raise _Blocked(f"the channel reaches '{op.name}' (a tuple element)")
        else:
            raise _Blocked(f"the channel reaches '{op.name}' ({_op_name(op)}), an op the walk does not know")

    # -- op relations ---------------------------------------------------------------------------------------

    def _tracked(self, node: object) -> tuple[int, int] | None:
        return self.group.values.get(node) if isinstance(node, fx.Node) else None

    def _linear(self, op: fx.Node) -> None:
        x, w, b = (*op.args, None)[:3]
        x_nd = _ndim(x)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            raise _Blocked(f"linear '{op.name}' has a computed weight")
        tx, tw, tb, to = (self._tracked(v) for v in (x, w, b, op))
        out_nd = _ndim(op)
        reads = [t[1] for t, d in ((tx, x_nd - 1), (tw, 1)) if t is not None and t[0] == d]
        writes = [t[1] for t, d in ((to, out_nd - 1), (tw, 0), (tb, 0)) if t is not None and t[0] == d]
        if reads:  # the input's features are the weight's columns
            self.visit(x, x_nd - 1, reads[0])
            self.visit(w, 1, reads[0])
            self._record(self.group.consumers, w, 1, reads[0])
        if writes:  # the output's features are the weight's rows (and the bias)
            self.visit(op, out_nd - 1, writes[0])
            self.visit(w, 0, writes[0])
            self._record(self.group.producers, w, 0, writes[0])
            if isinstance(b, fx.Node):
                self.visit(b, 0, writes[0])
        if tx is not None and tx[0] < x_nd - 1:  # a leading (batch, sequence) dim passes through
            self.visit(op, tx[0], tx[1])
        if to is not None and to[0] < out_nd - 1:
            self.visit(x, to[0], to[1])

    def _embedding(self, op: fx.Node) -> None:
        w = op.args[0]
        tw, to = self._tracked(w), self._tracked(op)
        if tw is not None and tw[0] == 0:
            raise _Blocked(f"the channel reaches the vocabulary rows of embedding '{op.name}'")
        unit = (to or tw)[1]
        self.visit(op, _ndim(op) - 1, unit)
        self.visit(w, 1, unit)
        self._record(self.group.producers, w, 1, unit)

    def _record(self, where: list[Slice], w: fx.Node, dim: int, unit: int) -> None:
        if isinstance(w, fx.Node) and w.op == "get_attr":
            where.append(Slice(w.target, dim, unit))
            self.ops_seen.add(w)  # a weight is a producer/consumer, not a per-channel param

    def _pointwise(self, op: fx.Node) -> None:
        operands = [a for a in (op.args if op.target is not aten.type_as.default else op.args[:1])
                    if isinstance(a, fx.Node)]
        entry = next((v for v in (op, *operands) if self._tracked(v) is not None), None)
        if entry is None:  # only type_as's dtype donor carries the channel: it does not reach the result
            return
        dim, unit = self.group.values[entry]
        from_end = dim - _ndim(entry)  # broadcasting aligns trailing dims
        for value in (op, *operands):
            nd = _ndim(value)
            if nd >= -from_end and _size(value, nd + from_end) > 1:
                self.visit(value, nd + from_end, unit)

    def _view(self, op: fx.Node) -> None:
        source = op.args[0]
        in_shape, out_shape = _shape(source), _shape(op)
        if (t := self._tracked(source)) is not None:
            out_dim, out_unit = _map_reshape(in_shape, out_shape, *t, op)
            self.visit(op, out_dim, out_unit)
        else:
            dim, unit = self.group.values[op]
            in_dim, in_unit = _map_reshape(out_shape, in_shape, dim, unit, op)
            self.visit(source, in_dim, in_unit)
        out_dim, out_unit = self.group.values[op]
        self.group.shapes.append(ShapeArg(op, out_dim, out_unit))

    def _permute(self, op: fx.Node) -> None:
        source, nd = op.args[0], _ndim(op)
        if op.target is aten.t.default:
            order = [1, 0] if nd == 2 else [0]
        elif op.target is aten.transpose.int:
            a, b = (d % nd for d in op.args[1:3])
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        else:
            order = [d % nd for d in op.args[1]]
        if (t := self._tracked(source)) is not None:
            self.visit(op, order.index(t[0]), t[1])
        else:
            dim, unit = self.group.values[op]
            self.visit(source, order[dim], unit)

    def _index_dim(self, op: fx.Node) -> None:
        """unsqueeze / squeeze / select / slice along some dim ``d``: other dims shift or stay."""
        source = op.args[0]
        in_nd, out_nd = _ndim(source), _ndim(op)
        d = op.args[1] % (out_nd if op.target is aten.unsqueeze.default else in_nd) if len(op.args) > 1 else 0
        removed = in_nd - out_nd  # 1: squeeze/select, -1: unsqueeze, 0: slice

        def forward(dim: int) -> int:
            if removed == 0:
                return dim
            if removed == 1:
                return dim - (dim > d)
            return dim + (dim >= d)

        if op.target is aten.slice.Tensor and _piece_of(op) and self._tracked(op) is not None:
            self._piece(op)
            return
        if (t := self._tracked(source)) is not None:
            if removed >= 0 and t[0] == d:
                raise _Blocked(f"'{op.name}' ({_op_name(op)}) indexes the channel dim itself")
            self.visit(op, forward(t[0]), t[1])
        else:
            dim, unit = self.group.values[op]
            if removed >= 0 and dim == d:  # a slice of the channel dim: only a narrower layer's cache slot
                if self.kv_caches and _narrowed_slot(op):
                    cache = source.args[0]
                    self.group.caches.append(CacheEdge(cache, int(source.args[2]) % _size(cache, 0), d + 1, unit))
                    return
                raise _Blocked(f"'{op.name}' ({_op_name(op)}) cuts the channel dim")
            back = next(i for i in range(in_nd) if forward(i) == dim and not (removed >= 0 and i == d))
            if self.kv_caches and _cache_input(source):  # layer i of a KV cache: op is select(source, 0, i)
                self.group.caches.append(CacheEdge(source, int(op.args[2]) % _size(source, 0), back, unit))
                return
            self.visit(source, back, unit)

    def _expand(self, op: fx.Node) -> None:
        source = op.args[0]
        shift = _ndim(op) - _ndim(source)
        if (t := self._tracked(source)) is not None:
            self.visit(op, t[0] + shift, t[1])
        else:
            dim, unit = self.group.values[op]
            if dim < shift or _size(source, dim - shift) != _size(op, dim):
                raise _Blocked(f"'{op.name}' (expand) creates the channel dim by broadcasting")
            self.visit(source, dim - shift, unit)
        dim, unit = self.group.values[op]
        self.group.shapes.append(ShapeArg(op, dim, unit))

    def _concat(self, op: fx.Node) -> None:
        parts = list(op.args[0])
        nd_out = _ndim(op)
        stacked = op.target is aten.stack.default
        axis = (op.args[1] if len(op.args) > 1 else 0) % nd_out
        entry = next((p for p in parts if self._tracked(p) is not None), None)
        if entry is not None:
            dim, unit = self.group.values[entry]
            out_dim = dim + (stacked and dim >= axis)
        else:
            out_dim, unit = self.group.values[op]
        if out_dim == axis:
            raise _Blocked(f"'{op.name}' ({_op_name(op)}) joins tensors along the channel dim")
        if self.kv_caches and entry is not None and stacked and axis == 0 and _returned_cache(op, out_dim):
            self.group.caches.append(CacheEdge(op, parts.index(entry), out_dim, unit))  # the other parts are
            return  # the other layers' groups
        self.visit(op, out_dim, unit)
        for part in parts:
            self.visit(part, out_dim - (stacked and out_dim > axis), unit)

    def _reduce(self, op: fx.Node) -> None:
        source = op.args[0]
        nd = _ndim(source)
        t = self._tracked(source)
        if op.target in _SOFTMAX:
            dims, keep = [op.args[1] % nd], True
        else:
            dims = [d % nd for d in (op.args[1] if len(op.args) > 1 and op.args[1] is not None else range(nd))]
            keep = bool(op.args[2]) if len(op.args) > 2 else bool(op.kwargs.get("keepdim", False))
        if t is None:
            dim, unit = self.group.values[op]
            back = dim if keep else [i for i in range(nd) if i not in dims][dim]
            self.visit(source, back, unit)
            return
        if t[0] in dims:
            if self.allow_reduce and op.target in _REDUCTIONS:
                return  # a norm's statistic over the channel: it now averages the kept channels
            raise _Blocked(f"'{op.name}' ({_op_name(op)}) reduces over the channel dim")
        out_dim = t[0] if keep else t[0] - sum(d < t[0] for d in dims)
        self.visit(op, out_dim, t[1])

    def _attention(self, op: fx.Node) -> None:
        """q, k, v and the output share the heads dim (third from last), by unit count (GQA: k and v may have
        fewer heads than q); the mask broadcasts over it."""
        q, k, v = op.args[:3]
        mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask", op.kwargs.get("mask"))
        entry = next(x for x in (op, q, k, v, mask) if self._tracked(x) is not None)
        dim, unit = self.group.values[entry]
        if dim != _ndim(entry) - 3:
            raise _Blocked(f"the channel reaches attention '{op.name}' outside its heads dim")
        units = _size(entry, dim) // unit
        common = math.gcd(units, *(_size(x, _ndim(x) - 3) for x in (op, q, k, v)))
        if common < units:  # GQA: a unit is a kv head with all the query heads reading it
            raise _Regroup(units // common)
        for x in (op, q, k, v):
            self.visit(x, _ndim(x) - 3, _size(x, _ndim(x) - 3) // units)
        if isinstance(mask, fx.Node) and _ndim(mask) >= 3 and _size(mask, _ndim(mask) - 3) > 1:
            self.visit(mask, _ndim(mask) - 3, _size(mask, _ndim(mask) - 3) // units)

    def _matmul(self, op: fx.Node) -> None:
        """Batch dims align (heads in an unfused attention); a contraction or a row/column dim is refused."""
        a, b = op.args[:2]
        entry = next(x for x in (op, a, b) if self._tracked(x) is not None)
        dim, unit = self.group.values[entry]
        from_end = dim - _ndim(entry)
        if from_end >= -2:
            raise _Blocked(f"the channel reaches matmul '{op.name}' in a matrix dim")
        for x in (op, a, b):
            if _ndim(x) >= -from_end and _size(x, _ndim(x) + from_end) > 1:
                self.visit(x, _ndim(x) + from_end, unit)

    def _piece(self, op: fx.Node) -> None:
        """A piece of a fused projection carries the channel: the producing rows are that piece of the fused
        weight (and bias). The fused output itself is not visited — its other pieces are other values."""
        offset, length, linear = _piece_of(op)
        dim, unit = self.group.values[op]
        if dim != _ndim(op) - 1:
            raise _Blocked(f"'{op.name}': the channel is not the fused projection's feature dim")
        w, b = (*linear.args[1:], None)[:2]
        self.group.producers.append(Slice(w.target, 0, unit, offset))
        if isinstance(b, fx.Node) and b.op == "get_attr":
            self.group.params.append(Slice(b.target, 0, unit, offset))
        self.group.pieces.append(Piece(op, offset, length, unit))
        self.group.fused.add(linear)

    def _layer_norm(self, op: fx.Node) -> None:
        """``layer_norm(x, [C], w, b)``: x, the output, ``w`` and ``b`` share the last dim; its statistics
        reduce over the channel (allowed only as a reduction is) and ``[C]`` is a shape constant."""
        x, normalized, w, b = (*op.args, None, None)[:4]
        entry = next(v for v in (op, x, w, b) if self._tracked(v) is not None)
        dim, unit = self.group.values[entry]
        if len(normalized) != 1 or dim != _ndim(entry) - 1:
            raise _Blocked(f"layer_norm '{op.name}' normalizes over more than the channel dim")
        if not self.allow_reduce:
            raise _Blocked(f"'{op.name}' (layer_norm) reduces over the channel dim")
        self.visit(x, _ndim(x) - 1, unit)
        self.visit(op, _ndim(op) - 1, unit)
        for param in (w, b):
            if isinstance(param, fx.Node):
                self.visit(param, 0, unit)
        self.group.shapes.append(ShapeArg(op, 0, unit))

    def _pad(self, op: fx.Node) -> None:
        """Padding along other dims passes the channel through (the cache padded to its length)."""
        source, amounts = op.args[:2]
        dim, unit = self.group.values[op if self._tracked(op) is not None else source]
        from_end = _ndim(op) - dim  # amounts come in (before, after) pairs from the last dim
        if any(amounts[2 * (from_end - 1):2 * from_end]):
            stack = next(iter(op.users)) if len(op.users) == 1 else None
            padded_slot = self.kv_caches and stack is not None and high_padding(op, _ndim(op), dim) is not None
            if padded_slot and stack.target is aten.stack.default and _returned_cache(stack, dim + 1):
                # a narrower layer's slot of a returned KV cache, zero-padded to the cache's width
                self.group.caches.append(CacheEdge(stack, list(stack.args[0]).index(op), dim + 1, unit))
                return
            raise _Blocked(f"'{op.name}' pads the channel dim")
        self.visit(source, dim, unit)
        self.visit(op, dim, unit)

    def _index_copy(self, op: fx.Node) -> None:
        target, axis, _, source = op.args[:4]
        entry = next(x for x in (op, target, source) if self._tracked(x) is not None)
        dim, unit = self.group.values[entry]
        if dim == axis % _ndim(op):
            raise _Blocked(f"'{op.name}' (index_copy) writes along the channel dim")
        for x in (op, target, source):
            self.visit(x, dim, unit)


def _piece_of(node: fx.Node) -> tuple[int, int, fx.Node] | None:
    """``(offset, length, linear)`` when ``node`` is one piece of a linear's output along its last dim: a
    ``slice`` (step 1) or a ``getitem`` of a ``split``/``split_with_sizes`` read straight off the linear."""
    if node.target is aten.slice.Tensor:
        source, dim, start, end = (*node.args, 0, None, None)[:4]
        step = node.args[4] if len(node.args) > 4 else 1
        if not (_is_linear(source) and step == 1 and dim % max(_ndim(source), 1) == _ndim(source) - 1):
            return None
        total = _shape(source)[-1]
        start = max(0, min(total, start + total if start < 0 else start))
        end = total if end is None else max(0, min(total, end + total if end < 0 else end))
        return start, end - start, source
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split, index = node.args
        if split.target not in (aten.split.Tensor, aten.split_with_sizes.default) or not _is_linear(split.args[0]):
            return None
        source = split.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if dim % _ndim(source) != _ndim(source) - 1:
            return None
        total = _shape(source)[-1]
        if split.target is aten.split.Tensor:
            sizes = [min(split.args[1], total - i) for i in range(0, total, split.args[1])]
        else:
            sizes = list(split.args[1])
        return sum(sizes[:index]), sizes[index], source
    return None


def _cache_input(node: fx.Node) -> bool:
    """Whether ``node`` is a KV cache input: a placeholder read only as its layers, ``select(node, 0, i)``, each
    layer once."""
    users = list(node.users)
    if node.op != "placeholder" or not users or not all(u.target is aten.select.int and u.args[1] == 0
                                                          for u in users):
        return False
    layers = sorted(int(u.args[2]) % _size(node, 0) for u in users)
    return layers == list(range(_size(node, 0)))


def _narrowed_slot(op: fx.Node) -> bool:
    """Whether ``op`` is the ``narrowed_slot`` read of layer i's slot ``select(cache, 0, i)`` of a KV cache
    input: the first heads, read by a layer that keeps fewer heads than the cache holds."""
    select = op.args[0]
    return (isinstance(select, fx.Node) and select.target is aten.select.int and select.args[1] == 0
            and narrowed_slot(select) is op and _cache_input(select.args[0]))


def _returned_cache(stack: fx.Node, dim: int) -> bool:
    """Whether ``stack`` (layers along dim 0) is a returned KV cache: it reaches only the graph's outputs,
    through nothing but padding of dims other than ``dim`` (prefill pads the prompt's keys to the cache
    length)."""
    node = stack
    while len(node.users) == 1 and (user := next(iter(node.users))).target in (aten.pad.default,
                                                                              aten.constant_pad_nd.default):
        amounts, from_end = user.args[1], _ndim(user) - dim
        if any(amounts[2 * (from_end - 1):2 * from_end]):
            return False
        node = user
    return bool(node.users) and all(user.op == "output" for user in node.users)


def _is_linear(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.target is aten.linear.default and isinstance(node.args[1], fx.Node)
            and node.args[1].op == "get_attr")


def _tracked_inputs(walker: _Walker, output: fx.Node) -> str:
    return ", ".join(n.name for n in output.all_input_nodes if n in walker.group.values)


def _map_reshape(
    in_shape: list[int], out_shape: list[int], dim: int, unit: int, op: fx.Node
) -> tuple[int, int]:
    """Where dim ``dim`` (units of ``unit`` elements) of ``in_shape`` lands in ``out_shape``, and its unit
    there. Dims are grouped into runs with equal products; within a run the channel must be the outermost
    non-1 dim on both sides and the inner dims must divide (split) or multiply (merge) the unit."""
    try:
        return _follow_reshape(in_shape, out_shape, dim, unit, op)
    except IndexError:
        raise _Blocked(f"'{op.name}' ({_op_name(op)}): cannot follow the channel dim through this reshape") from None


def _follow_reshape(in_shape: list[int], out_shape: list[int], dim: int, unit: int, op: fx.Node) -> tuple[int, int]:
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        run_in, run_out = [i], [j]
        p_in = in_shape[i] if i < len(in_shape) else 1
        p_out = out_shape[j] if j < len(out_shape) else 1
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                run_in.append(i)
                p_in *= in_shape[i]
            else:
                j += 1
                run_out.append(j)
                p_out *= out_shape[j]
        if dim in run_in:
            outer_in = [d for d in run_in if d < dim and in_shape[d] > 1]
            if outer_in:
                raise _Blocked(f"'{op.name}' ({_op_name(op)}) merges the channel dim under an outer dim")
            elements = unit * math.prod(in_shape[d] for d in run_in if d > dim)  # elements per unit
            real = [d for d in run_out if d < len(out_shape) and out_shape[d] > 1]
            if not real:
                raise _Blocked(f"'{op.name}' ({_op_name(op)}): the channel dim disappears")
            inner = math.prod(out_shape[e] for e in real[1:])
            if elements % inner:  # the dim splits into (channel, inner): a unit must span whole inner blocks
                raise _Regroup(inner // math.gcd(elements, inner))
            return real[0], elements // inner
        i += 1
        j += 1
    raise _Blocked(f"'{op.name}' ({_op_name(op)}): cannot follow the channel dim through this reshape")


def _check_units(group: Group) -> None:
    counts = {node.name: _size(node, dim) // unit for node, (dim, unit) in group.values.items()}
    counts.update({f"{p.node.name} (piece)": p.length // p.unit for p in group.pieces})
    for linear in group.fused:
        covered = sum(p.length for p in group.pieces if _piece_of(p.node)[2] is linear)
        if covered != _shape(linear)[-1]:
            raise _Blocked(f"fused projection '{linear.name}' has pieces outside this group")
    if len(set(counts.values())) > 1:
        raise _Blocked(f"members disagree on the number of channels: {counts}")
    if not group.producers:
        raise _Blocked("no weight produces the channel")


def _classify(group: Group) -> Kind:
    targets = {n.target for n in group.values} | {u.target for n in group.values for u in n.users}
    if aten.embedding.default in targets or targets & (_REDUCTIONS | {aten.layer_norm.default}):
        return "hidden"
    attention = {aten.scaled_dot_product_attention.default, _passforge_attention(), aten.matmul.default,
                 aten.bmm.default}  # matmuls batched over the channel: attention written out (an ONNX import)
    if targets & attention:
        return "heads"
    return "mlp"


def _passforge_attention() -> object:
    import passforge.kernels.ops  # noqa: F401 - registers passforge::attention

    return torch.ops.passforge.attention.default


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _shape(node: object) -> list[int]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _Blocked(f"'{node}' has no recorded shape")
    return [int(d) if isinstance(d, int) else -1 for d in val.shape]


def _ndim(node: object) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _size(node: object, dim: int) -> int:
    shape = _shape(node)
    size = shape[dim]
    if size < 0:
        raise _Blocked(f"'{node}' has a symbolic size in dim {dim}")
    return size
