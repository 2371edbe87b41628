"""The one-token decode step compiled by inductor, its KV cache still written in place.

Run op by op, a decode step of the ~100M preset is some 600 ATen calls and 65 custom-op calls per token, each
with its Python and dispatcher cost around a few µs of work: a large share of the step on a small CPU. inductor
turns the step into a handful of generated C++ kernels around the GEMMs (``runtime.inductor``). What stands
in its way is the cache: the donated step (``runtime.kv_cache.donate_kv_cache``) writes each layer's slice of
one stacked cache input in place, and functionalizing writes into views of an input makes inductor rebuild
the whole stacked cache after every layer's write (slower than not compiling at all). So the compiled
step takes each layer's cache as an input of its own and writes it in place, which inductor keeps in
place::

    decode(token, pos, k_cache, v_cache)                       decode(token, pos, k_0, …, k_L, v_0, …, v_L)
    %k_i = aten.select(%k_cache, 0, i)                  →       (%k_i is the placeholder k_i)
    aten.index_copy_(%k_i, 2, %pos, %k_new_i)                   aten.index_copy_(%k_i, 2, %pos, %k_new_i)
    return (%logits, %k_cache, %v_cache)                        return (%logits,)

and the caller's stacked caches are passed as their per-layer views (``unbind``), so the writes land in them:
the step keeps the donated step's interface, ``(token, pos, k_cache, v_cache) -> (logits, k_cache, v_cache)``.
inductor computes chains of elementwise ops without rounding between them, so bf16 results differ from the
op-by-op step's by about that rounding (docs/compile.md); fp32 agrees to float rounding.
"""

from __future__ import annotations

import torch
from torch import fx

from passforge.ir.graph import copy_graph_module, narrowed_slot
from passforge.runtime.inductor import inductor_compile

aten = torch.ops.aten


def per_layer_cache_graph(donated: fx.GraphModule) -> tuple[fx.GraphModule | None, str | None]:
    """``(graph over per-layer cache inputs, None)`` for a donated decode step (module docstring), else
    ``(None, why not)``. Inputs: the step's non-cache inputs in order, then every cache's layers in order;
    outputs: the step's outputs other than the caches."""
    placeholders = [n for n in donated.graph.nodes if n.op == "placeholder"]
    output = next(n for n in donated.graph.nodes if n.op == "output")
    outputs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    caches = [value for value in outputs if isinstance(value, fx.Node) and value.op == "placeholder"]
    if not caches:
        return None, "the step returns no cache input (it is not a donated decode step)"
    for cache in caches:
        reason = _layer_slices(cache)
        if reason:
            return None, f"cache input '{cache.name}': {reason}"
    gm = copy_graph_module(donated)
    nodes = dict(zip(donated.graph.nodes, gm.graph.nodes))
    graph = gm.graph
    anchor = nodes[placeholders[-1]]
    for cache in caches:
        val = cache.meta["val"]
        for select in sorted(_selects(cache), key=lambda s: s.args[2]):
            with graph.inserting_after(anchor):
                layer = graph.placeholder(f"{cache.name}_{select.args[2]}")
            read = nodes[select]
            layer.meta["val"] = val[select.args[2]]
            narrow = narrowed_slot(read)
            if narrow is not None:  # a layer that keeps fewer heads: its input is the view of its first heads,
                layer.meta[NARROWED] = (narrow.args[1], narrow.args[3])  # written in place, not a copy of
                layer.meta["val"] = layer.meta["val"].narrow(narrow.args[1], 0, narrow.args[3])  # its slot
                narrow.replace_all_uses_with(layer)
                graph.erase_node(narrow)
            read.replace_all_uses_with(layer)
            graph.erase_node(read)
            anchor = layer
    kept = tuple(nodes[value] if isinstance(value, fx.Node) else value for value in outputs if value not in caches)
    nodes[output].args = (kept,)
    for cache in caches:
        graph.erase_node(nodes[cache])
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs, not the captured pytree signature
    gm.recompile()
    return gm, None


def _layer_slices(cache: fx.Node) -> str | None:
    """None when ``cache`` is read only by ``select(cache, 0, i)`` for each of its layers i once (and
    returned)."""
    layers = cache.meta["val"].shape[0]
    selects = _selects(cache)
    if not all(s.target is aten.select.int and s.args[0] is cache and s.args[1] == 0 for s in selects):
        return "read by something other than one layer's slice"
    if sorted(s.args[2] for s in selects) != list(range(layers)):
        return f"its {layers} layers are not each read once"
    return None


def _selects(cache: fx.Node) -> list[fx.Node]:
    return [user for user in cache.users if user.op != "output"]


NARROWED = "passforge.narrowed"  # a per-layer cache input's (dim, heads): the caller passes that view of the slot


class NotCompilable(ValueError):
    """The step's caches are not read as per-layer slices; the message says how (``per_layer_cache_graph``)."""


class CompiledDecodeStep:
    """``step(token, pos, k_cache, v_cache) -> (logits, k_cache, v_cache)``, compiled when constructed (from the
    placeholders' shapes: a decode step's are static), so compiling is never part of a timed step and a graph
    inductor cannot build fails here, where the caller can fall back.

    The caches are updated in place (the returned ones are the caller's tensors) and keep their stacked
    layout, so a generator switches between this and the donated step freely. Compiling allocates one
    scratch copy of the caches' sizes for the example inputs, freed when it returns."""

    def __init__(self, donated: fx.GraphModule) -> None:
        graph, reason = per_layer_cache_graph(donated)
        if graph is None:
            raise NotCompilable(reason)
        output = next(n for n in donated.graph.nodes if n.op == "output").args[0]
        inputs = [n for n in donated.graph.nodes if n.op == "placeholder"]
        returned = [isinstance(v, fx.Node) and v.op == "placeholder" for v in output]
        self._returns_caches = returned
        self._cache_positions = [inputs.index(v) for v, cache in zip(output, returned) if cache]
        self._other_positions = [i for i in range(len(inputs)) if i not in self._cache_positions]
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        self._narrowed = [n.meta.get(NARROWED) for n in placeholders[len(self._other_positions):]]
        examples = [_example(n.meta["val"]) for n in placeholders]
        with torch.inference_mode():  # as it runs (the runtime's weights may be inference tensors)
            self._compiled = inductor_compile(graph, examples)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        caches = [inputs[i] for i in self._cache_positions]
        others = [inputs[i] for i in self._other_positions]
        layers = [layer if narrowed is None else layer.narrow(narrowed[0], 0, narrowed[1])
                  for layer, narrowed in zip((layer for cache in caches for layer in cache.unbind(0)), self._narrowed)]
        results = iter(self._compiled(*others, *layers))
        caches_out = iter(caches)
        return tuple(next(caches_out) if cache else next(results) for cache in self._returns_caches)


def _example(val: torch.Tensor) -> torch.Tensor:
    """A real tensor shaped and strided like a placeholder's fake value (a narrowed slot is a view), zeros: a
    position or token id must be valid."""
    return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device).zero_()
