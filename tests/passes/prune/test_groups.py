"""Channel-group analysis: which tensors and shapes shrink together, and where a channel cannot be followed."""

from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import capture
from passforge.models.llama import DecodeStep, Llama, LlamaConfig
from passforge.passes.prune.groups import find_groups
from tests.conftest import SMALL


def _short(name: str) -> str:
    return name.split(".")[-2]


def _by_kind(gm, **kw):
    kinds: dict[str, list] = {}
    for g in find_groups(gm, **kw):
        kinds.setdefault(g.kind, []).append(g)
    return kinds


def test_llama_groups_mlp_heads_and_blocked_head(llama_graph):
    kinds = _by_kind(llama_graph)
    mlp = [g for g in kinds["mlp"] if not g.blocked]
    assert len(mlp) == SMALL.n_layers
    for g in mlp:
        assert g.units == SMALL.ffn_dim
        assert [(_short(s.name), s.dim, s.unit) for s in g.slices] == [
            ("gate_proj", 0, 1), ("up_proj", 0, 1), ("down_proj", 1, 1)]
    heads = kinds["heads"]
    assert len(heads) == SMALL.n_layers and not any(g.blocked for g in heads)
    hd, rep = SMALL.head_dim, SMALL.n_heads // SMALL.n_kv_heads
    for g in heads:  # one unit = one kv head with its `rep` query heads
        assert g.units == SMALL.n_kv_heads
        assert sorted((_short(s.name), s.dim, s.unit) for s in g.slices) == [
            ("k_proj", 0, hd), ("o_proj", 1, rep * hd), ("q_proj", 0, rep * hd), ("v_proj", 0, hd)]
        # q, k, v views; two GQA expands and their merges; the output view
        assert sorted(a.node.target.__name__ for a in g.shapes) == sorted(
            ["view.default"] * 4 + ["expand.default"] * 2 + ["_unsafe_view.default"] * 2)
    head = [g for g in kinds["mlp"] if g.blocked]
    assert [g.name for g in head] == ["lm_head.weight"] and "graph's outputs" in head[0].blocked


def test_hidden_group_needs_reductions_allowed(llama_graph):
    hidden = _by_kind(llama_graph)["hidden"]
    assert hidden[0].blocked and "reduces over the channel" in hidden[0].blocked
    g = _by_kind(llama_graph, allow_reduce=True)["hidden"][0]
    assert not g.blocked and g.units == SMALL.dim
    names = {_short(s.name) for s in g.slices}
    assert {"tok_embeddings", "lm_head", "attention_norm", "ffn_norm", "q_proj", "o_proj", "down_proj"} <= names
    assert {s.name for s in g.params} == {
        *(f"layers.{i}.{n}.weight" for i in range(SMALL.n_layers) for n in ("attention_norm", "ffn_norm")),
        "norm.weight"}


def test_multi_head_attention_units_are_single_heads():
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=32)
    gm = capture(Llama(cfg).eval(), (torch.zeros(1, 8, dtype=torch.long),))
    (g,) = _by_kind(gm)["heads"]
    assert g.units == 4 and {s.unit for s in g.slices} == {cfg.head_dim}


def test_decode_graph_layers_meet_only_at_cache_edges(small_llama):
    """Read as a generation step, each layer's heads group reads slot i of both cache inputs and returns its
    update as part i of both returned stacks: four cache edges on the heads dim (2), unit one kv head; the
    layers stay separate groups. Read as a forward graph (the torch.compile backend's view: its inputs are
    the caller's), the same caches block the heads groups."""
    inputs = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *small_llama.new_kv_cache(1))
    gm = capture(DecodeStep(small_llama), inputs)
    kinds = _by_kind(gm, kv_caches=True)
    assert len(kinds["heads"]) == SMALL.n_layers and not any(g.blocked for g in kinds["heads"])
    for layer, g in enumerate(kinds["heads"]):
        edges = {(e.node.op, e.node.name, e.layer, e.dim, e.unit) for e in g.caches}
        assert edges == {("placeholder", "k_cache", layer, 2, 1), ("placeholder", "v_cache", layer, 2, 1),
                         ("call_function", "stack", layer, 2, 1), ("call_function", "stack_1", layer, 2, 1)}
        assert g.units == SMALL.n_kv_heads
    assert sum(not g.blocked for g in kinds["mlp"]) == SMALL.n_layers
    forward_view = _by_kind(gm)
    assert all(g.blocked and "graph input" in g.blocked and not g.caches for g in forward_view["heads"])


def test_a_narrowed_layer_still_meets_the_cache_at_its_edges(tokens):
    """After heads pruning left layer 0 narrower than the cache (2 of 4 kv heads; layer 1 skipped), layer 0
    reads its slot through a slice and returns it padded: the walk sees both as cache edges of slot 0 (no
    coupling, no block), so later passes (another heads or MLP pruning) still find every group."""
    import dataclasses

    import passforge

    model = Llama(dataclasses.replace(SMALL, n_heads=8, n_kv_heads=4)).eval()
    opt = passforge.optimize(model, (tokens,), pipeline="prune-channels(target=heads,ratio=0.5,skip=layers.1.*)",
                             profile=False)
    kinds = _by_kind(opt.decode, kv_caches=True)
    assert not any(g.blocked for g in kinds["heads"]) and len(kinds["heads"]) == SMALL.n_layers
    assert sum(not g.blocked for g in kinds["mlp"]) == SMALL.n_layers  # and the LM head, blocked at the logits
    edges = {(e.node.name, e.layer) for g in kinds["heads"] for e in g.caches}
    assert edges == {(c, layer) for c in ("k_cache", "v_cache", "stack", "stack_1") for layer in range(2)}


class _NotACache(torch.nn.Module):
    """Near misses for cache edges in a step graph: an input read as ``x[0]`` and also whole (not only by its
    layers), and per-layer values stacked and then summed (not returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.a(x[0]), self.b(x[1])]).sum(0) + x.mean()


def test_only_whole_layer_reads_and_returned_stacks_are_cache_edges():
    gm = capture(_NotACache(), (torch.randn(2, 3, 8),))
    groups = find_groups(gm, kv_caches=True)
    assert not any(g.caches for g in groups)
    assert all(g.blocked for g in groups)


class _Cumsum(torch.nn.Module):
    """Near miss: a channel that reaches an op the walk does not know (cumsum along it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)
        self.c = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).cumsum(-1)) + self.c(x)


class _BiasAndScale(torch.nn.Module):
    """A per-channel parameter multiplies the channel between producer and consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.scale = torch.nn.Parameter(torch.ones(16))
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)) * self.scale)


def test_unknown_op_blocks_with_its_name():
    gm = capture(_Cumsum().eval(), (torch.randn(2, 8),))
    first = find_groups(gm)[0]
    assert first.name == "a.weight" and "cumsum" in first.blocked


def test_per_channel_parameters_and_biases_join_the_group():
    gm = capture(_BiasAndScale().eval(), (torch.randn(2, 8),))
    g = find_groups(gm)[0]
    assert not g.blocked and g.units == 16
    assert sorted(s.name for s in g.params) == ["a.bias", "scale"]
    assert [s.name for s in g.consumers] == ["b.weight"]


def test_onnx_import_prunes_like_the_captured_graph(small_llama, tokens, tmp_path):
    """The same LLaMA through torch.onnx and passforge's importer (attention written out as matmul/softmax,
    reshapes with -1): the same groups, and pruning it (l2: the same choice) computes what pruning the
    captured graph computes."""
    pytest.importorskip("onnx_graphsurgeon", reason="ONNX import needs onnx-graphsurgeon")
    import warnings

    from passforge.ir.onnx_import import import_onnx
    from passforge.passes.base import Context
    from passforge.passes.hooks import VerifyHook
    from passforge.passes.manager import PassManager
    from passforge.passes.prune.channels import PruneChannels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_llama, (tokens,), tmp_path / "llama.onnx", dynamo=True)
    imported = import_onnx(tmp_path / "llama.onnx", (tokens,), dynamic=False)
    kinds = {(g.kind, g.units) for g in find_groups(imported, allow_reduce=True) if not g.blocked}
    assert kinds == {("mlp", SMALL.ffn_dim), ("heads", SMALL.n_kv_heads), ("hidden", SMALL.dim)}
    passes = [PruneChannels(), PruneChannels(target="heads", ratio=0.5)]
    pruned = [PassManager(passes, hooks=[VerifyHook()]).run(gm, Context(example_inputs=(tokens,))).graph
              for gm in (imported, capture(small_llama, (tokens,)))]
    torch.testing.assert_close(pruned[0](tokens), pruned[1](tokens), rtol=1e-4, atol=1e-4)


class _TypeAsDonor(torch.nn.Module):
    """``softmax(x.float()).type_as(h)``: ``h`` only donates its dtype (attention's fp32 softmax, cast back)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + torch.softmax(x.float(), dim=-1).type_as(h)


def test_type_as_dtype_donor_does_not_carry_the_channel():
    """Found by the fuzzer (passforge.tools.fuzz): the walk reached ``type_as`` through its dtype donor and
    raised KeyError: None; the donor's channels do not reach the result, so the group stops there."""
    gm = capture(_TypeAsDonor().eval(), (torch.randn(2, 8),))
    assert any(n.target is torch.ops.aten.type_as.default for n in gm.graph.nodes)
    first = find_groups(gm)[0]
    assert first.name == "a.weight" and not first.blocked and first.units == 8
    assert [s.name for s in first.consumers] == ["b.weight"]
