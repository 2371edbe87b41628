"""donate_kv_cache: the decode graph with its cache written in place returns what the functional graph returns,
in the caller's cache tensors; graphs whose caches are not plain per-layer updates are left alone, with why."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.models import llama
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.kv_cache import donate_kv_cache

aten = torch.ops.aten


@pytest.mark.parametrize("spec", ["cleanup", "cleanup,fuse-attention"])
def test_in_place_decode_matches_the_functional_graph(spec: str) -> None:
    model = llama.build("tiny").eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    _, k_cache, v_cache = model.prefill(tokens)
    step = (tokens[:, -1:], torch.tensor([20]), k_cache, v_cache)
    graph = PassManager.parse(spec).run(capture(llama.DecodeStep(model), step), Context(example_inputs=step)).graph
    donated, reason = donate_kv_cache(graph)
    assert reason is None
    assert count_calls(donated, aten.index_copy_.default) == 2 * model.config.n_layers
    assert count_calls(donated, aten.stack.default) == 0 and count_calls(graph, aten.stack.default) == 2
    k1, v1 = k_cache.clone(), v_cache.clone()
    k2, v2 = k_cache.clone(), v_cache.clone()
    token = tokens[:, -1:]
    for pos in range(20, 26):
        want, k1, v1 = graph(token, torch.tensor([pos]), k1, v1)
        got, k_out, v_out = donated(token, torch.tensor([pos]), k2, v2)
        assert k_out is k2 and v_out is v2  # the caller's tensors, updated
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(k2, k1, rtol=0, atol=0)
        torch.testing.assert_close(v2, v1, rtol=0, atol=0)
        token = want[:, -1].argmax(-1, keepdim=True)


class ReadsOldCache(nn.Module):
    """Returns the updated cache but also reads the old one: writing in place would change the result."""

    def forward(self, pos: torch.Tensor, new: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        old = cache[0]
        updated = old.index_copy(1, pos, new)
        return old.sum() + updated.sum(), torch.stack([updated])


class NotAStack(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


def test_graphs_that_cannot_donate_say_why() -> None:
    inputs = (torch.tensor([1]), torch.ones(2, 1, 3), torch.zeros(1, 2, 4, 3))
    gm = capture(ReadsOldCache(), inputs)
    same, reason = donate_kv_cache(gm)
    assert same is gm and "also read elsewhere" in reason
    gm = capture(NotAStack(), (torch.ones(2),))
    same, reason = donate_kv_cache(gm)
    assert same is gm and "no returned cache" in reason


def test_windowed_decode_on_a_ring_cache_matches_the_windowed_forward() -> None:
    """local-attention windows the decode step through its mask (its query is not at the cache's end); the ring
    cache of sinks + window slots then gives the same logits as the static cache, and both match the windowed
    forward graph run over the whole sequence — past the point where the ring wraps."""
    from passforge.api import optimize
    from passforge.runtime.kv_cache import ring_kv_cache

    opt = optimize("tiny-lm", pipeline="cleanup,fuse-attention,local-attention(window=16,sinks=2)", profile=False)
    ring_decode, ring, reason = ring_kv_cache(opt.decode)
    assert reason is None and ring.slots == 18
    assert ring_decode.graph.find_nodes(op="placeholder")[2].meta["val"].shape[3] == 18
    prefill_len = opt.prefill.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1]
    seq_len = opt.graph.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1]
    n, steps = 20, 30
    tokens = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    padded = torch.zeros(1, prefill_len, dtype=torch.long)
    padded[:, :n] = tokens[:, :n]
    with torch.inference_mode():
        _, k, v = opt.prefill(padded)
        k_ring, v_ring = ring.from_full(k, n), ring.from_full(v, n)
        forward = opt.graph(tokens)  # windowed forward over the whole (teacher-forced) sequence
        for pos in range(n, n + steps):
            token = tokens[:, pos : pos + 1]
            static, k, v = opt.decode(token, torch.tensor([pos]), k, v)
            ringed, k_ring, v_ring = ring_decode(token, torch.tensor([pos]), k_ring, v_ring)
            torch.testing.assert_close(ringed, static, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(static[:, -1], forward[:, pos], rtol=1e-4, atol=1e-4)


def test_ring_needs_a_windowed_decode_step() -> None:
    from passforge.runtime.kv_cache import ring_kv_cache

    model = llama.build("tiny").eval()
    step = llama.example_decode_inputs(model)
    decode = PassManager.parse("fuse-attention").run(capture(llama.DecodeStep(model), step), Context(step)).graph
    same, ring, reason = ring_kv_cache(decode)
    assert same is decode and ring is None and "run local-attention" in reason


def _narrowed_step(kind: str) -> fx.GraphModule:
    """A two-layer decode step whose layers keep 1 of the cache's 2 heads: ``slice`` after the select, the
    update, ``constant_pad_nd`` back to the slot's width, as ``prune-channels(target=heads)`` writes it — or a
    near miss of it (``kind``). Every node's meta["val"] recorded from a real run."""
    aten = torch.ops.aten
    g = fx.Graph()
    pos, new, cache = g.placeholder("pos"), g.placeholder("new"), g.placeholder("cache")
    slice_args, pad, value = {"narrowed": ((1, 0, 1), [0, 0, 0, 0, 0, 1], 0.0),
                              "seq slice": ((2, 0, 4), [0, 0, 0, 2], 0.0),
                              "step 2": ((1, 0, 2, 2), [0, 0, 0, 0, 0, 1], 0.0),
                              "pad value": ((1, 0, 1), [0, 0, 0, 0, 0, 1], 1.0),
                              "pad low side": ((1, 0, 1), [0, 0, 0, 0, 1, 0], 0.0)}[kind]
    parts = []
    for i in range(2):
        narrow = g.call_function(aten.slice.Tensor, (g.call_function(aten.select.int, (cache, 0, i)), *slice_args))
        update = g.call_function(aten.index_copy.default, (narrow, 2, pos, new))
        parts.append(g.call_function(aten.constant_pad_nd.default, (update, pad, value)))
    g.output((g.call_function(aten.stack.default, (parts, 0)),))
    gm = fx.GraphModule(nn.Module(), g)

    class Record(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            node.meta["val"] = value = super().run_node(node)
            return value

    new_shape = (1, 1, 1, 3) if kind != "seq slice" else (1, 2, 1, 3)
    Record(gm).run(torch.tensor([1]), torch.randn(new_shape), torch.zeros(2, 1, 2, 6, 3))
    return gm


@pytest.mark.parametrize("kind", ["narrowed", "seq slice", "step 2", "pad value", "pad low side"])
def test_a_narrowed_layer_is_donated_only_when_in_place_computes_the_same(kind: str) -> None:
    """A layer that keeps fewer heads writes in place through its slice; that equals the functional graph only
    for a step-1 slice of the first heads, padded back with zeros on the high side of that dim alone (and a
    cache whose other heads are zeros, as prefill leaves them). Near misses keep the functional graph."""
    gm = _narrowed_step(kind)
    donated, reason = donate_kv_cache(gm)
    if kind != "narrowed":
        assert donated is gm and "not an index_copy update" in reason
        return
    assert reason is None
    pos, new, cache = torch.tensor([3]), torch.randn(1, 1, 1, 3), torch.zeros(2, 1, 2, 6, 3)
    (expected,) = gm(pos, new, cache.clone())
    (got,) = donated(pos, new, cache)
    assert got is cache and torch.equal(got, expected)
