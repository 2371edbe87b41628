"""``prune-channels(target=mlp|heads|hidden, ratio=0.25, importance=l2, scope=local)``: remove whole channels,
attention heads or hidden dims, so the model is physically smaller and faster — not masked.

The channel groups come from the graph (:mod:`passforge.passes.prune.groups`): for ``mlp``, one group per
MLP (``gate`` and ``up`` rows, ``down`` columns); for ``heads``, one per attention layer whose unit is a GQA
group (a kv head and the query heads reading it: ``q`` rows, ``k``/``v`` rows, ``o`` columns, and the head
counts in the views and expands between them); for ``hidden``, the residual stream (every layer's norms,
the embedding's columns, the rows of each linear writing into it and the columns of each reading it). Each
unit gets a score (:mod:`passforge.passes.prune.importance`: ``l1``, ``l2``, ``wanda``, ``taylor``); the
lowest-scoring ``ratio`` of the units goes, per group (``scope=local``) or ranked across the target's groups
after dividing each group's scores by its mean (``scope=global``: layers that matter less lose more), or in
per-group amounts chosen by measuring what each costs (``schedule=sensitivity``, optionally capped by a
perplexity ``budget``: :mod:`passforge.passes.prune.schedule`). Kept
counts round to a ``multiple`` (8 channels for ``mlp``/``hidden`` by default, so GEMMs keep aligned
shapes; 1 for heads) and never drop below one multiple. Before → after (``mlp``, ratio 0.25 of 512)::

    %g = aten.linear(%x, %gate_w)        # gate_w (512, 256)      %g = aten.linear(%x, %gate_w)   # (384, 256)
    %u = aten.linear(%x, %up_w)          # up_w   (512, 256)  →   %u = aten.linear(%x, %up_w)     # (384, 256)
    %d = aten.linear(silu(%g) * %u, %down_w)  # (256, 512)        %d = aten.linear(silu(%g) * %u, %down_w)  # (256, 384)

and for ``heads`` (8 query heads over 4 kv heads, one kv group removed) the view sizes follow::

    view(%q, [1, 16, 8, 32])               →  view(%q, [1, 16, 6, 32])
    expand(%k, [1, 4, 2, 16, 32])          →  expand(%k, [1, 3, 2, 16, 32])

Pruning ``heads`` removes kv heads, which changes the shape of a KV cache. The prefill and decode steps of a
model carry their caches ``(L, B, nkv, S, hs)`` as outputs and inputs, every layer's heads in one stacked
tensor, so the cache keeps the widest layer's heads (all of them shrink alike with one count per layer; a layer
that keeps fewer reads the first heads of its slot and returns the slot zero-padded: ``resize_caches``). The
pass rewrites the cache's shape and declares what each layer's slot of each resized input and output keeps
(``PassResult.interface``; ``ir/INVARIANTS.md``, rule 9), from which the manager derives the new example
cache and the verifier compares the returned caches with the kept heads of the old ones::

    %k_cache: [2, 1, 4, 64, 16]                        %k_cache: [2, 1, 2, 64, 16]
    %k_0 = select(%k_cache, 0, 0)                  →   %k_0 = select(%k_cache, 0, 0)    # [1, 2, 64, 16]
    return (%logits, stack([%k_0', %k_1']), ...)       return (%logits, stack([%k_0', %k_1']), ...)

``hidden`` changes
what RMSNorm averages over (the kept channels); recover the accuracy with ``distill``. The prefill and
decode graphs of a model reuse the forward graph's choice (``ctx.memo``), so all three keep the same
channels. A pruned group is marked (``node.meta["passforge.pruned"]``) and not pruned again: a second run
changes nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from passforge.ir.graph import get_attr, high_pad, narrowed_slot, propagate_meta, set_tensor_attr
from passforge.passes.base import Context, InterfaceChange, Pass, PassResult, PreconditionError, ResizedState
from passforge.passes.prune import importance as imp
from passforge.passes.prune.groups import CacheEdge, Group, Piece, Slice, find_groups, unit_elements
from passforge.passes.prune.schedule import sensitivity_counts
from passforge.passes.quantize.calibrate import memo_get, memo_put
from passforge.passes.quantize.insert import name_matches
from passforge.passes.registry import register

aten = torch.ops.aten
PRUNED_META = "passforge.pruned"
DEFAULT_MULTIPLE = {"mlp": 8, "hidden": 8, "heads": 1}


@register
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important ``ratio`` of MLP channels, attention heads (GQA groups) or hidden dims,
    shrinking every weight and shape that depends on them."""

    name: ClassVar[str] = "prune-channels"
    lossy: ClassVar[bool] = True
    target: Literal["mlp", "heads", "hidden"] = "mlp"
    ratio: float = 0.25
    importance: Literal["l1", "l2", "wanda", "taylor"] = "l2"
    scope: Literal["local", "global"] = "local"
    multiple: int = 0  # 0: 8 for mlp and hidden, 1 for heads
    skip: str = ""  # ';'-separated globs of group names (their first producer weight) to leave whole
    calib_windows: int = 8
    schedule: Literal["uniform", "sensitivity"] = "uniform"
    budget: float = 0.0  # sensitivity: stop once the predicted perplexity increase passes this (0: no cap)

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"prune-channels: ratio must be in [0, 1), got {self.ratio}")
        if self.multiple < 0:
            raise ValueError(f"prune-channels: multiple must be >= 0, got {self.multiple}")
        if self.calib_windows < 1:
            raise ValueError(f"prune-channels: calib_windows must be >= 1, got {self.calib_windows}")
        if self.budget < 0:
            raise ValueError(f"prune-channels: budget must be >= 0, got {self.budget}")
        if self.schedule == "sensitivity" and self.target == "hidden":
            raise ValueError("prune-channels: schedule=sensitivity scans mlp and heads groups; the hidden size is "
                             "one group (nothing to distribute)")

    @property
    def needs_calibration(self) -> bool:
        return self.importance in ("wanda", "taylor") or self.schedule == "sensitivity"

    @property
    def unit_multiple(self) -> int:
        return self.multiple or DEFAULT_MULTIPLE[self.target]

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        groups, notes = self.groups(gm, kv_caches=ctx.role != "forward")
        if not groups:
            return PassResult(gm, modified=False, stats={"pruned_groups": 0}, notes=notes)
        keep = {g.name: memo_get(ctx.memo, f"{self.spec}:keep", [g.name]) for g in groups}
        todo = [g for g in groups if keep[g.name] is None]
        if todo:
            if ctx.role != "forward":  # a step graph must prune what the forward graph pruned: its own windows
                raise PreconditionError(  # are one token (decode) and its choice could differ
                    f"{self.spec}: the forward graph chose no channels for {len(todo)} of this {ctx.role} graph's "
                    f"groups (first: {todo[0].name}); run the pipeline on the forward graph first, sharing ctx.memo"
                )
            chosen, chosen_notes = self._choose(gm, ctx, todo)
            notes.extend(chosen_notes)
            for g in todo:
                keep[g.name] = chosen[g.name]
                memo_put(ctx.memo, f"{self.spec}:keep", g.name, chosen[g.name])
        before = sum(g.units for g in groups)
        for g in groups:
            shrink(gm, g, keep[g.name])
        interface = resize_caches(gm, groups, keep)
        _refresh_meta(gm)
        after = sum(len(keep[g.name]) for g in groups)
        notes.append(f"{self.target}: kept {after} of {before} units ({1 - after / before:.1%} removed)")
        if interface is not None:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            resized = [f"input {placeholders[i].name} {tuple(placeholders[i].meta['val'].shape)}"
                       for i in sorted(interface.inputs)] + [f"output {i}" for i in sorted(interface.outputs)]
            notes.append(f"KV caches resized: {', '.join(resized)}")
        return PassResult(gm, modified=True, stats={"pruned_groups": len(groups), "units_removed": before - after},
                          notes=notes, interface=interface)

    def groups(self, gm: fx.GraphModule, *, kv_caches: bool = False) -> tuple[list[Group], list[str]]:
        """This target's prunable groups not yet pruned; notes name the ones left alone and why. Raises
        :class:`PreconditionError` when the graph has groups of this kind but none can be pruned. ``kv_caches``:
        the graph is a generation step, whose stacked caches are layer boundaries (``find_groups``)."""
        skips = [p for p in self.skip.split(";") if p]
        every = find_groups(gm, allow_reduce=self.target == "hidden", kv_caches=kv_caches)
        found = [g for g in every if g.kind == self.target]
        notes, groups = [], []
        fused = {linear for g in found for linear in g.fused}
        found = [g for g in found if g.seed not in fused]  # a fused projection is pruned through its pieces
        done = [g for g in found if g.seed.meta.get(PRUNED_META)]  # pruned by an earlier run
        found = [g for g in found if g not in done]
        for g in found:
            if g.blocked:
                if not _is_output_head(g):
                    notes.append(f"{g.name}: not pruned: {g.blocked}")
            elif any(name_matches(g.name, p) for p in skips):
                notes.append(f"{g.name}: skipped by name")
            else:
                groups.append(g)
        if not groups and not done:
            blocked = [g for g in every if g.blocked and g.kind == self.target and not _is_output_head(g)]
            reasons = "; ".join(f"{g.name}: {g.blocked}" for g in blocked[:3])
            raise PreconditionError(
                f"{self.spec}: found no {self.target} group this pass can prune"
                + (f" (channels that could not be followed: {reasons})" if reasons else "")
            )
        return groups, notes

    def _choose(
        self, gm: fx.GraphModule, ctx: Context, groups: list[Group]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Kept unit indices (sorted) for each group, and notes on how the counts were chosen."""
        scores = self._scores(gm, ctx, groups)
        notes: list[str] = []
        if self.schedule == "sensitivity":
            counts, notes = sensitivity_counts(
                gm, ctx, groups, scores, ratio=self.ratio, multiple=self.unit_multiple, budget=self.budget,
                spec=self.spec, windows=self.calib_windows,
            )
        else:
            counts = kept_counts(groups, scores, self.ratio, self.unit_multiple, self.scope)
        return {g.name: scores[g.name].cpu().topk(counts[g.name]).indices.sort().values for g in groups}, notes

    def _scores(self, gm: fx.GraphModule, ctx: Context, groups: list[Group]) -> dict[str, torch.Tensor]:
        if self.importance in ("l1", "l2"):
            p = 1 if self.importance == "l1" else 2
            return {g.name: imp.magnitude_scores(gm, g, p) for g in groups}
        if self.importance == "wanda":
            norms = imp.calibrate_input_norms(gm, ctx, groups, self.spec, self.calib_windows)
            return {g.name: imp.wanda_scores(gm, g, norms) for g in groups}
        with torch.enable_grad():
            return imp.taylor_scores(gm, ctx, groups, self.spec, self.calib_windows)


def _is_output_head(group: Group) -> bool:
    """The LM head: its rows are the vocabulary, returned as the logits — never a channel to prune."""
    return any(user.op == "output" for user in group.seed.users)


def kept_counts(
    groups: list[Group], scores: dict[str, torch.Tensor], ratio: float, multiple: int, scope: str
) -> dict[str, int]:
    """How many units each group keeps: ``(1 - ratio)`` of its own (``local``), or as many of its units as
    rank above the global cut of mean-normalised scores (``global``); rounded to ``multiple``, at least one
    multiple (a group smaller than that stays whole)."""
    if ratio == 0:
        return {g.name: g.units for g in groups}
    if scope == "local":
        return {g.name: _round(g.units * (1 - ratio), multiple, g.units) for g in groups}
    normalised = [scores[g.name].cpu() / scores[g.name].cpu().mean().clamp(min=1e-12) for g in groups]
    owner = torch.cat([torch.full((len(n),), i) for i, n in enumerate(normalised)])
    removed = owner[torch.cat(normalised).argsort()[:round(ratio * len(owner))]]  # exactly that many, ties too
    return {g.name: _round(g.units - int((removed == i).sum()), multiple, g.units) for i, g in enumerate(groups)}


def _round(count: float, multiple: int, units: int) -> int:
    if units <= multiple:
        return units
    return min(units, max(multiple, round(count / multiple) * multiple))


def shrink(gm: fx.GraphModule, group: Group, keep: torch.Tensor) -> None:
    """Keep units ``keep`` of every tensor in ``group`` and rewrite its shape constants; mark it pruned.
    The pieces of a fused weight (q, k, v at their offsets) shrink together, each by its own unit."""
    by_tensor: dict[tuple[str, int], list[Slice]] = {}
    for s in dict.fromkeys(group.slices):  # a tied weight is both a producer and a consumer: shrink it once
        by_tensor.setdefault((s.name, s.dim), []).append(s)
    for (name, dim), slices in by_tensor.items():
        tensor = get_attr(gm, name)
        kept = keep.to(tensor.device)
        index = torch.cat([s.elements(kept) for s in sorted(slices, key=lambda s: s.offset)])
        set_tensor_attr(gm, name, tensor.index_select(dim, index).contiguous())
    for arg in group.shapes:
        sizes = list(arg.node.args[1])
        if isinstance(sizes[arg.position], int) and sizes[arg.position] != -1:
            sizes[arg.position] = len(keep) * arg.unit
            arg.node.args = (arg.node.args[0], sizes, *arg.node.args[2:])
    _rewrite_pieces(group.pieces, len(keep))
    for node in {group.seed, *group.fused}:  # a later walk seeds the same group at the same node
        node.meta[PRUNED_META] = True


def _rewrite_pieces(pieces: list[Piece], kept: int) -> None:
    """New bounds for the slices and splits that cut a fused output, in their order along it."""
    start = {}
    for piece in sorted(pieces, key=lambda p: p.offset):
        source = piece.node.args[0]
        key = source.args[0] if piece.node.target is operator.getitem else source
        start.setdefault(key, 0)
        new = kept * piece.unit
        if piece.node.target is aten.slice.Tensor:
            piece.node.args = (source, piece.node.args[1], start[key], start[key] + new, *piece.node.args[4:])
        start[key] += new
    for split in {p.node.args[0] for p in pieces if p.node.target is operator.getitem}:
        sizes = [kept * p.unit for p in sorted((p for p in pieces if p.node.args[0] is split), key=lambda p: p.offset)]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if len(set(sizes)) == 1 and split.target is aten.split.Tensor:
            split.args = (split.args[0], sizes[0], dim)
        else:
            split.target = aten.split_with_sizes.default
            split.args = (split.args[0], sizes, dim)
            split.kwargs = {}


def resize_caches(gm: fx.GraphModule, groups: list[Group], keep: dict[str, torch.Tensor]) -> InterfaceChange | None:
    """Resize each KV cache the pruned groups reach (an input placeholder or a returned stack) to the widest
    layer's kept heads, and declare what each resized input and output keeps per layer (the manager derives
    the new example caches from it); None when the groups reach no cache. A layer that keeps fewer heads
    than the widest reads the first ones of its slot (``slice`` after its ``select``) and returns its slot
    zero-padded (``constant_pad_nd`` before the stack); a layer not pruned now keeps the heads it reads (all
    of its slot, or the first ones an earlier run left it), and its slice and padding follow the new width."""
    edges: dict[fx.Node, dict[int, tuple[Group, CacheEdge]]] = {}
    for g in groups:
        for edge in g.caches:
            edges.setdefault(edge.node, {})[edge.layer] = (g, edge)
    if not edges:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    change = InterfaceChange()
    for node, layers in edges.items():
        (dim,) = {edge.dim for _, edge in layers.values()}
        shape = list(node.meta["val"].shape)  # the cache's shape before this run
        slots = _slots(node)  # layer -> the value that reads (select) or returns (stack part) its slot
        kept = tuple(unit_elements(keep[layers[i][0].name], layers[i][1].unit) if i in layers
                     else torch.arange(_slot_width(slots[i], dim, shape)) for i in range(shape[0]))
        width = max(len(k) for k in kept)
        if node.op == "placeholder":
            shape[dim] = width
            node.meta["val"] = node.meta["val"].new_empty(shape)
            change.inputs[placeholders.index(node)] = ResizedState(dim, kept)
            for i, select in slots.items():
                _narrow_read(gm, select, dim - 1, len(kept[i]), width)
        else:
            node.args = ([_pad_part(gm, node, part, dim - 1, len(kept[i]), width, len(shape) - 1)
                          for i, part in slots.items()], *node.args[1:])
            for old in slots.values():
                if old.target is aten.constant_pad_nd.default and not old.users:
                    gm.graph.erase_node(old)
            returned = node
            while returned not in outputs:  # the stack, or the padding after it
                returned = next(iter(returned.users))
            change.outputs[outputs.index(returned)] = ResizedState(dim, kept)
    return change


def _slots(cache: fx.Node) -> dict[int, fx.Node]:
    """Layer -> its ``select`` of a cache input, or its part of a returned stack, in layer order."""
    if cache.op == "placeholder":
        layers = cache.meta["val"].shape[0]
        return dict(sorted((int(s.args[2]) % layers, s) for s in cache.users))
    return dict(enumerate(cache.args[0]))


def _slot_width(slot: fx.Node, dim: int, shape: list[int]) -> int:
    """How many heads of its slot a layer not pruned now uses: all, or the first ones an earlier run's
    ``slice`` (input) or padding (output) shows."""
    if slot.target is aten.select.int and (narrow := narrowed_slot(slot)) is not None:
        return int(narrow.args[3])
    if slot.target is aten.constant_pad_nd.default:
        return int(slot.args[0].meta["val"].shape[dim - 1])
    return shape[dim]


def _narrow_read(gm: fx.GraphModule, select: fx.Node, dim: int, kept: int, width: int) -> None:
    """The layer reads the first ``kept`` of its slot's ``width`` heads: a slice after the select (updated,
    inserted, or removed when it keeps them all)."""
    narrow = narrowed_slot(select)
    if narrow is not None and kept == width:
        narrow.replace_all_uses_with(select)
        gm.graph.erase_node(narrow)
    elif narrow is not None:
        narrow.args = (select, dim, 0, kept)
    elif kept < width:
        with gm.graph.inserting_after(select):
            narrow = gm.graph.call_function(aten.slice.Tensor, (select, dim, 0, kept))
        select.replace_all_uses_with(narrow, delete_user_cb=lambda user: user is not narrow)


def _pad_part(gm: fx.GraphModule, stack: fx.Node, part: fx.Node, dim: int, kept: int, width: int, rank: int
              ) -> fx.Node:
    """The layer's returned slot padded with zeros from ``kept`` to ``width`` heads (an earlier run's padding
    updated, or dropped when it keeps them all)."""
    if part.target is aten.constant_pad_nd.default:  # erased by the caller once the stack no longer reads it
        part = part.args[0]
    if kept == width:
        return part
    with gm.graph.inserting_before(stack):
        return gm.graph.call_function(aten.constant_pad_nd.default, (part, high_pad(rank, dim, width - kept), 0.0))


def _refresh_meta(gm: fx.GraphModule) -> None:
    """Shapes changed: recompute every node's ``meta["val"]``."""
    gm.recompile()
    for node, value in propagate_meta(gm).items():
        if node.op != "placeholder":
            node.meta["val"] = value
