"""Run a decode graph with its KV cache updated in place (the cache is donated to the step).

passforge's IR is functional: a decode step takes the caches and returns new ones, so every step copies each
layer's cache (``index_copy``) and stacks the copies into the returned cache — for the ~100M preset that is
~130 MB of memory traffic per token, more than its int4 weights. The generator owns its caches (prefill made
them), so the runtime may write the new token's k/v into them instead. :func:`donate_kv_cache` derives that
form of a graph, for running only (the saved graph stays functional)::

    %k_i = aten.select(%k_cache, 0, i)                    %k_i = aten.select(%k_cache, 0, i)
    %u_i = aten.index_copy(%k_i, 2, %pos, %k_new_i)  →    %u_i = aten.index_copy_(%k_i, 2, %pos, %k_new_i)
    ... attention(%q_i, %u_i, ...) ...                    ... attention(%q_i, %u_i, ...) ...
    return (%logits, aten.stack([%u_0, ..., %u_L]))       return (%logits, %k_cache)

Applied only when each returned cache is exactly the stack of per-layer ``index_copy`` updates of one cache
input, layer i into slice i, and nothing else reads the old cache: then the in-place graph returns the same
values, and the caller's cache tensors hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.ir.graph import add_buffer, copy_graph_module, fake_mode_of, high_padding, narrowed_slot
from passforge.passes.attention import LOCAL_WINDOW, decode_step_mask

aten = torch.ops.aten
ATTENTION = torch.ops.passforge.attention.default


def donate_kv_cache(gm: fx.GraphModule) -> tuple[fx.GraphModule, str | None]:
    """``(in-place copy of gm, None)``, or ``(gm, why not)`` when its caches are not updated that way."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = output.args[0]
    if not isinstance(outputs, (tuple, list)):
        return gm, "the graph returns one value, not (logits, k_cache, v_cache)"
    plans = {}
    for index, value in enumerate(outputs):
        if isinstance(value, fx.Node) and value.target is aten.stack.default:
            reason = _check_stack(value)
            if reason:
                return gm, f"output {index}: {reason}"
            plans[index] = value
    if not plans:
        return gm, "no returned cache is a stack of per-layer index_copy updates"
    donated = copy_graph_module(gm)
    nodes = dict(zip(gm.graph.nodes, donated.graph.nodes))
    donated_output = nodes[output]
    new_outputs = list(donated_output.args[0])
    for index, stack in plans.items():
        stack = nodes[stack]
        for part in stack.args[0]:
            update, select = _layer_update(part)
            update.target = aten.index_copy_.default  # into the slot (a view), or its first heads' view
        new_outputs[index] = select.args[0]  # the cache placeholder
    donated_output.args = (type(outputs)(new_outputs),)
    donated.graph.eliminate_dead_code()
    donated.recompile()
    return donated, None


@dataclass(frozen=True)
class RingCache:
    """A bounded decode cache of ``sinks + window`` slots: position p lives in slot p below ``sinks``, else in
    slot ``sinks + (p − sinks) mod window``, so the slots always hold the sinks and the last ``window``
    positions — exactly what sliding-window attention with sinks can see. Keys are cached after RoPE, so
    attention over the slots (in any order) equals attention over those positions."""

    sinks: int
    window: int

    @property
    def slots(self) -> int:
        return self.sinks + self.window

    def slot(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)

    def from_full(self, cache: torch.Tensor, length: int) -> torch.Tensor:
        """A prefill cache (L, B, nkv, S, hs) holding positions 0..length-1 → the ring (L, B, nkv, slots, hs)."""
        ring = cache.new_zeros((*cache.shape[:3], self.slots, cache.shape[4]))
        positions = torch.arange(length, device=cache.device)
        kept = positions[(positions < self.sinks) | (positions > length - 1 - self.window)]
        return ring.index_copy_(3, self.slot(kept), cache.index_select(3, kept))


def ring_kv_cache(gm: fx.GraphModule) -> tuple[fx.GraphModule, RingCache | None, str | None]:
    """A decode graph whose attention is all sliding-window (``local-attention``) → ``(graph over a ring cache,
    its RingCache, None)``; else ``(gm, None, why not)``. The derived graph takes and returns caches of
    ``sinks + window`` slots instead of the static ``max_seq_len``, writes the new token at its slot, and
    attends every filled slot (the ring holds exactly what the window and sinks let it see)::

        %u = aten.index_copy(%k_i, 2, %pos, %k_new)         %u = aten.index_copy(%k_i, 2, %slot, %k_new)
        %m = aten.le(%arange_S, %pos)                 →     %m = aten.le(%arange_slots, %pos)
        %w = aten.logical_and(%m, <window, sinks>)
        passforge.attention(%q, %u, %v, %w)                 passforge.attention(%q, %u, %v, %m)

    Which (window, sinks) comes from ``local-attention``'s mark on the decode step's attention nodes (in memory
    only: a graph loaded from disk keeps its windowed mask over the full cache — correct, not bounded).
    """
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION]
    options = {n.meta.get(LOCAL_WINDOW) for n in calls}
    if len(options) != 1 or None in options:
        return gm, None, "the decode graph's attention is not all sliding-window (run local-attention)"
    window, sinks = next(iter(options))
    ring = RingCache(sinks=sinks, window=window)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 4:
        return gm, None, "not a decode step (token, pos, k_cache, v_cache)"
    pos, caches = placeholders[1], placeholders[2:]
    max_len = caches[0].meta["val"].shape[3]
    if ring.slots >= max_len:
        return gm, None, f"the window and sinks ({ring.slots} slots) cover the whole {max_len}-slot cache"
    steps = [decode_step_mask(n) for n in calls]
    if any(step is None or step[2] is not pos for step in steps):
        return gm, None, "the attention mask is not the decode step's arange(S) <= pos"
    masks = {step[0] for step in steps}
    ring_gm = copy_graph_module(gm)
    nodes = dict(zip(gm.graph.nodes, ring_gm.graph.nodes))
    graph = ring_gm.graph
    pos = nodes[pos]
    updates = [n for n in graph.nodes if n.target is aten.index_copy.default and n.args[2] is pos]
    layers = caches[0].meta["val"].shape[0]
    if len(updates) != 2 * layers:  # every layer's k and v must move to the ring, or none
        return gm, None, f"{len(updates)} cache updates write at pos; a ring needs all {2 * layers} (k and v per layer)"
    with graph.inserting_before(updates[0]):
        below_sinks = graph.call_function(aten.lt.Scalar, (pos, sinks))
        offset = graph.call_function(aten.sub.Tensor, (pos, sinks))
        wrapped = graph.call_function(
            aten.add.Tensor, (graph.call_function(aten.remainder.Scalar, (offset, window)), sinks)
        )
        slot = graph.call_function(aten.where.self, (below_sinks, pos, wrapped))
    for update in updates:
        update.args = (update.args[0], update.args[1], slot, update.args[3])
    for call, (mask, _, _) in zip(calls, steps):  # the ring holds exactly the window: the plain mask again
        call = nodes[call]
        call.args = (*call.args[:3], nodes[mask], *call.args[4:])
    for mask in (nodes[m] for m in masks):
        with graph.inserting_before(mask):
            positions = add_buffer(ring_gm, "_ring_positions", torch.arange(ring.slots).view(1, -1))
        mask.args = (positions, mask.args[1])
    graph.eliminate_dead_code()
    with fake_mode_of(gm):
        for cache in caches:
            val = cache.meta["val"]
            nodes[cache].meta["val"] = torch.empty(
                (*val.shape[:3], ring.slots, val.shape[4]), dtype=val.dtype, device=val.device
            )
    ring_gm.recompile()
    return ring_gm, ring, None


def _check_stack(stack: fx.Node) -> str | None:
    """None when ``stack`` is ``stack([index_copy(select(cache, 0, i), dim, pos, new_i) for i], 0)`` over one
    placeholder whose only readers are those selects, each read only by its update. A layer that keeps fewer
    heads than the cache holds (``prune-channels(target=heads)`` with per-layer counts) updates the first
    heads of its slot and returns the slot zero-padded: ``constant_pad_nd(index_copy(slice(select(...))))``;
    updated in place, the slot's other heads keep what prefill wrote there (zeros), as the padding does."""
    updates = stack.args[0]
    dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if dim != 0:
        return f"stacked along dim {dim}, not 0"
    cache, readers = None, set()
    for i, part in enumerate(updates):
        found = _layer_update(part) if isinstance(part, fx.Node) else None
        if found is None:
            return f"layer {i}'s cache is not an index_copy update"
        update, select = found
        if not (select.target is aten.select.int and select.args[1:] == (0, i)):
            return f"layer {i}'s update does not write slice {i} of a cache input"
        if cache is None:
            cache = select.args[0]
        if select.args[0] is not cache or cache.op != "placeholder":
            return f"layer {i}'s update reads {select.args[0].name}, not the cache input {cache.name}"
        chain = [select] + ([update.args[0]] if update.args[0] is not select else [])
        if any(len(node.users) != 1 for node in chain):
            return f"the old cache of layer {i} is also read elsewhere"
        readers.add(select)
    if cache is None or set(cache.users) != readers:
        return "the cache input is read by more than the per-layer updates"
    if len(updates) != cache.meta["val"].shape[0]:
        return f"{len(updates)} layers updated, the cache has {cache.meta['val'].shape[0]}"
    return None


def _layer_update(part: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(index_copy, select)`` of one layer's returned cache: ``index_copy(select(...))``, or for a layer
    that keeps fewer heads ``constant_pad_nd(index_copy(slice(select(...), 1, 0, w)), zeros up to the slot's
    width along the heads dim only)``; else None. Updated in place, the narrower layer writes the first heads
    of its slot and leaves the rest as they came in: zeros, as prefill, ``RingCache.from_full`` and the
    pruned example caches leave them, which is what the padding returns."""
    update = part.args[0] if part.target is aten.constant_pad_nd.default else part
    if not (isinstance(update, fx.Node) and update.target is aten.index_copy.default):
        return None
    target = update.args[0]
    if part is update:
        return (update, target) if isinstance(target, fx.Node) and target.target is not aten.slice.Tensor else None
    select = target.args[0] if isinstance(target, fx.Node) and target.target is aten.slice.Tensor else None
    val = select.meta.get("val") if isinstance(select, fx.Node) else None
    if narrowed_slot(select) is not target or not isinstance(val, torch.Tensor):  # only the first heads, step 1
        return None
    restored = high_padding(part, val.dim(), 1) == val.shape[1] - target.args[3]  # zeros back to the slot's width
    return (update, select) if restored else None
