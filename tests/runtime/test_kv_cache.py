"""donate_kv_cache: the decode graph with its cache written in place returns what the functional graph returns,
in the caller's cache tensors; graphs whose caches are not plain per-layer updates are left alone, with why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
