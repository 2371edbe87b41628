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

import torch
from torch import fx

from passforge.ir.graph import copy_graph_module

aten = torch.ops.aten


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
        for update in stack.args[0]:
            update.target = aten.index_copy_.default
        new_outputs[index] = stack.args[0][0].args[0].args[0]  # the cache placeholder
    donated_output.args = (type(outputs)(new_outputs),)
    donated.graph.eliminate_dead_code()
    donated.recompile()
    return donated, None


def _check_stack(stack: fx.Node) -> str | None:
    """None when ``stack`` is ``stack([index_copy(select(cache, 0, i), dim, pos, new_i) for i], 0)`` over one
    placeholder whose only readers are those selects, each read only by its index_copy."""
    updates = stack.args[0]
    dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if dim != 0:
        return f"stacked along dim {dim}, not 0"
    cache = None
    for i, update in enumerate(updates):
        if not (isinstance(update, fx.Node) and update.target is aten.index_copy.default):
            return f"layer {i}'s cache is not an index_copy update"
        select = update.args[0]
        if not (select.target is aten.select.int and select.args[1:] == (0, i)):
            return f"layer {i}'s update does not write slice {i} of a cache input"
        if cache is None:
            cache = select.args[0]
        if select.args[0] is not cache or cache.op != "placeholder":
            return f"layer {i}'s update reads {select.args[0].name}, not the cache input {cache.name}"
        if len(select.users) != 1:
            return f"the old cache of layer {i} is also read elsewhere ({len(select.users)} readers)"
    if cache is None or set(cache.users) != {u.args[0] for u in updates}:
        return "the cache input is read by more than the per-layer updates"
    if len(updates) != cache.meta["val"].shape[0]:
        return f"{len(updates)} layers updated, the cache has {cache.meta['val'].shape[0]}"
    return None
