"""torch.compile(backend="passforge"): found by name, same outputs as eager for lossless pipelines, the passes
really ran on dynamo's graphs (op counts), and the cases a backend meets — dynamic shapes, graph breaks,
inputs written in place, training graphs, calibration on the first calls, the on-disk cache and its key."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.ir.graph import count_calls
from passforge.kernels.attention import attention_cpu
from passforge.models.llama import Llama
from passforge.passes.spec import parse_pipeline
from passforge.runtime import backend
from passforge.runtime.backend import BackendError, cache_key, compiled_graphs, passforge_backend
from tests.conftest import SMALL

ATTENTION = torch.ops.passforge.attention.default
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _compile(model: nn.Module, **options: object) -> tuple[nn.Module, list[object]]:
    """The compiled model and the graphs compiled before it (held, so a test reads only its own)."""
    return torch.compile(model, backend="passforge", options=options or None), compiled_graphs()


def _new(before: list[object]) -> list[backend.CompiledGraph]:
    return [g for g in compiled_graphs() if all(g is not old for old in before)]


class TinyLM(nn.Module):
    """Token ids → logits through an embedding and an MLP: the smallest model calibration can feed tokens to."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.embed(ids))))


@pytest.fixture
def tiny_lm() -> TinyLM:
    return TinyLM().eval()


def _ids(length: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (1, length))


def test_the_backend_is_found_by_name_through_its_entry_point() -> None:
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("passforge") is passforge_backend


def test_lossless_pipeline_matches_eager_and_the_passes_ran(small_llama: Llama, tokens: torch.Tensor) -> None:
    compiled, before = _compile(small_llama, pipeline="cleanup,fuse-attention")
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), small_llama(tokens), rtol=1e-5, atol=1e-5)
    (graph,) = _new(before)
    assert [r.status for r in graph.result.records] == ["ok", "ok"]
    assert count_calls(graph.graph, ATTENTION) == SMALL.n_layers
    assert count_calls(graph.graph, aten.scaled_dot_product_attention.default) == 0
    # passforge's runtime runs it on CPU as its Executor does: the op's implementation called directly
    assert count_calls(graph.runnable, ATTENTION) == 0 and count_calls(graph.runnable, attention_cpu) == SMALL.n_layers
    names = {n.target for n in graph.graph.graph.find_nodes(op="get_attr")}
    assert "weights.layers.0.attention.q_proj.weight" in names  # frozen weights keep their module names


def test_lossy_pipeline_stays_within_its_bound(tiny_lm: TinyLM) -> None:
    # int8 per-channel weights on a random model: |err| / max|logit| ≈ 1e-2 (w8 rel err in docs/benchmarks.md
    # is 3e-2 on the 100M preset); 5e-2 fails on a broken scale (≈ 1) and passes rounding
    compiled, before = _compile(tiny_lm, pipeline="quantize(scheme=w8)")
    ids = _ids()
    with torch.no_grad():
        want, got = tiny_lm(ids), compiled(ids)
    assert 0 < float((got - want).abs().max() / want.abs().max()) < 5e-2
    (graph,) = _new(before)
    assert count_calls(graph.graph, aten.linear.default) == count_calls(graph.captured, aten.linear.default)
    assert graph.result.records[0].stats  # it quantized something
    assert any("quantize" in str(n.target) for n in graph.graph.graph.nodes)


def test_dynamic_shapes_compile_once_for_all_lengths(small_llama: Llama) -> None:
    compiled = torch.compile(small_llama, backend="passforge", dynamic=True, options={"pipeline": "fuse-attention"})
    before = compiled_graphs()
    with torch.no_grad():
        for length in (16, 9):
            ids = torch.randint(0, SMALL.vocab_size, (1, length))
            torch.testing.assert_close(compiled(ids), small_llama(ids), rtol=1e-5, atol=1e-5)
    (graph,) = _new(before)
    seq = graph.captured.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1]
    assert not isinstance(seq, int)  # the sequence dim stayed symbolic


class TwoHalves(nn.Module):
    """A print between two linears: dynamo breaks the graph there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        print("graph break", end="")
        return self.b(torch.relu(y))


def test_graph_breaks_compile_each_graph() -> None:
    model = TwoHalves().eval()
    compiled, before = _compile(model, pipeline="cleanup")
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert len(_new(before)) == 2


class WritesCache(nn.Module):
    """Writes into its cache argument in place, as an HF static cache does, and reads it back."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(0, pos, self.proj(x))
        return cache.sum(0)


def test_inputs_written_in_place_are_updated_in_the_callers_tensors() -> None:
    model = WritesCache().eval()
    compiled, before = _compile(model, pipeline="cleanup")
    mine, theirs = torch.zeros(4, 8), torch.zeros(4, 8)
    with torch.no_grad():
        for pos in range(3):
            x = torch.randn(1, 8)
            torch.testing.assert_close(compiled(x, mine, torch.tensor([pos])), model(x, theirs, torch.tensor([pos])))
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    (graph,) = _new(before)
    assert count_calls(graph.graph, aten.index_copy.default) == 1  # the optimized graph is functional
    assert count_calls(graph.runnable, aten.index_copy_.default) == 1  # and runs writing in place, no clone
    assert count_calls(graph.runnable, aten.clone.default) == 0


def test_training_graphs_skip_the_pipeline_with_a_warning_and_train_as_eager(small_llama: Llama) -> None:
    ids = torch.randint(0, SMALL.vocab_size, (1, 8))
    twin = Llama(SMALL)
    twin.load_state_dict(small_llama.state_dict())
    compiled, _ = _compile(small_llama.train(), pipeline="cleanup,fuse-attention")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(ids).square().mean().backward()
    assert any("training graph" in str(w.message) and "fuse-attention" in str(w.message) for w in caught)
    twin.train()(ids).square().mean().backward()
    for (name, got), want in zip(small_llama.named_parameters(), twin.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_calibration_runs_on_the_first_calls_then_the_graph_is_quantized(tiny_lm: TinyLM) -> None:
    compiled, before = _compile(tiny_lm, pipeline="quantize(scheme=w8a8-static)", calibration_calls=3)
    errors = []
    with torch.no_grad():
        for _ in range(5):
            ids = _ids()
            want = tiny_lm(ids)
            errors.append(float((compiled(ids) - want).abs().max() / want.abs().max()))
    assert errors[:2] == [0.0, 0.0]  # calls 1-2 run the captured graph while their inputs are recorded
    assert all(0 < e < 0.1 for e in errors[2:])  # then static int8 activations: a few 1e-2 on random weights
    (graph,) = _new(before)
    assert "over 3 calibration windows" in " ".join(graph.result.records[0].notes)


def test_calibration_data_option_calibrates_at_the_first_call(tiny_lm: TinyLM) -> None:
    data = torch.randint(0, 64, (4 * 16,)).tolist()
    compiled, before = _compile(tiny_lm, pipeline="quantize(scheme=w8a8-static,calib_windows=4)", calib_data=data)
    with torch.no_grad():
        compiled(_ids())
    (graph,) = _new(before)
    assert "over 4 calibration windows" in " ".join(graph.result.records[0].notes)


def test_cache_dir_reuses_the_optimized_graph(tiny_lm: TinyLM, tmp_path: Path) -> None:
    outputs, ids = [], _ids()
    for _ in range(2):
        torch._dynamo.reset()
        compiled, before = _compile(tiny_lm, pipeline="cleanup,quantize(scheme=w8)", cache_dir=str(tmp_path))
        with torch.no_grad():
            outputs.append(compiled(ids))
        (graph,) = _new(before)
        outputs.append(graph.cache_hit)
    assert outputs[1] is False and outputs[3] is True
    assert len(list(tmp_path.glob("*.pt2"))) == 1
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)


def test_cache_key_changes_with_pipeline_weights_and_pass_code(
    tiny_lm: TinyLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from passforge.ir.capture import capture

    ids = _ids()
    graph = capture(tiny_lm, (ids,))
    passes = parse_pipeline("cleanup")
    key = cache_key(graph, passes)
    assert cache_key(graph, passes) == key
    assert cache_key(graph, parse_pipeline("cleanup,cast(dtype=bf16)")) != key
    assert cache_key(graph, parse_pipeline("cleanup(fold=false)")) != key
    heavier = TinyLM().eval()
    heavier.load_state_dict({k: v + 1e-3 for k, v in tiny_lm.state_dict().items()})
    assert cache_key(capture(heavier, (ids,)), passes) != key
    source = tmp_path / "pass.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(backend, "_source_files", lambda cls: {str(source)})
    edited = cache_key(graph, passes)
    source.write_text("x = 2\n")
    assert cache_key(graph, passes) != edited


def test_bad_options_are_clear_errors() -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(BackendError, match=r"unknown option.*pipelne.*the options are"):
        passforge_backend(gm, [torch.randn(1, 2)], options={"pipelne": "cleanup"})
    with pytest.raises(BackendError, match="pipeline"):
        passforge_backend(gm, [torch.randn(1, 2)], options={"pipeline": "no-such-pass"})
    with pytest.raises(BackendError, match="on_error"):
        passforge_backend(gm, [torch.randn(1, 2)], options={"on_error": "ignore"})


@pytest.mark.parametrize(
    ("pipeline", "int_mm"),
    [("cleanup,quantize(scheme=w8)", 0), ("cleanup,quantize(scheme=w8a8),fold-quant,lower-quant(guard=false)", 2)],
)
def test_inductor_generates_code_for_the_optimized_graph(pipeline: str, int_mm: int) -> None:
    """Fake-quant graphs lower through inductor's Q/DQ lowerings; passforge's int8-activation ops reach it as
    the ATen ops they run on CPU (``INDUCTOR_DECOMPOSITIONS``), so its post-grad graph holds ``_int_mm`` calls
    and no passforge op for it to call as an extern."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    compiled, before = _compile(model, pipeline=pipeline, inductor=True)
    x = torch.randn(4, 16)
    seen: list[str] = []

    def record(graph: torch.fx.Graph) -> None:
        seen.extend(str(n.target) for n in graph.nodes if n.op == "call_function")

    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False):
        want, got = model(x), compiled(x)
    assert 0 < float((got - want).abs().max() / want.abs().max()) < 5e-2
    (graph,) = _new(before)
    assert not isinstance(graph.runnable, torch.fx.GraphModule)  # inductor's compiled callable runs it
    assert seen.count("aten._int_mm.default") == int_mm
    assert not [target for target in seen if target.startswith("passforge.")]


def test_hf_generate_with_a_static_cache_gives_eager_greedy_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    compile_config = transformers.CompileConfig(
        backend="passforge", mode=None, options={"pipeline": "cleanup,fuse-attention"}
    )
    compile_config._compile_all_devices = True  # HF compiles only on accelerators unless told otherwise
    model.generation_config.compile_config = compile_config
    before = compiled_graphs()
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    graphs = _new(before)
    assert graphs and all(count_calls(g.graph, ATTENTION) == 2 for g in graphs)  # decode steps ran fused
    assert all(count_calls(g.runnable, aten.index_copy_.default) == 4 for g in graphs)  # k, v per layer in place


def test_weights_of_two_modules_keep_distinct_names() -> None:
    first, second = nn.Linear(4, 4).eval(), nn.Linear(4, 4).eval()
    compiled = torch.compile(lambda m1, m2, x: m2(m1(x)), backend="passforge")
    before = compiled_graphs()
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(first, second, x), second(first(x)))
    (graph,) = _new(before)
    names = {n.target for n in graph.captured.graph.find_nodes(op="get_attr")}
    assert {"weights.m1.weight", "weights.m2.weight"} <= names


class TiedHead(nn.Module):
    """An LM head sharing the embedding's weight; ``graph_break`` puts the head in a graph of its own."""

    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(64, 32), nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.emb.weight
        self.graph_break = graph_break

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.emb(tokens)))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.lm_head(h)


@pytest.mark.parametrize("graph_break", [False, True])
def test_a_tied_head_is_known_by_its_own_name(graph_break: bool) -> None:
    """In one graph dynamo hands the shared weight over once, as ``emb.weight``: the head's linear reads it as
    ``lm_head.weight`` (the same tensor), as capture names it, so ``quantize``'s default ``skip=lm_head*``
    keeps the head in float here too; the embedding still reads ``emb.weight``. After a graph break the
    head's graph has it as ``lm_head.weight`` already, and keeps it so."""
    model = TiedHead(graph_break).eval()
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    compiled, before = _compile(model, pipeline="quantize(scheme=w8)")
    with torch.no_grad():
        out = compiled(tokens)
    graphs = _new(before)
    assert len(graphs) == 1 + graph_break
    records = [g.result.records[0] for g in graphs]
    assert sum(r.stats["quantized"] for r in records) == 1 and sum(r.stats["skipped"] for r in records) == 1
    reads = {n.target: [u.target for u in n.users] for g in graphs for n in g.captured.graph.find_nodes(op="get_attr")}
    assert reads["weights.lm_head.weight"] == [aten.linear.default]
    assert reads.get("weights.emb.weight", [aten.embedding.default]) == [aten.embedding.default]
    head_weights = [n.args[1] for g in graphs for n in g.graph.graph.nodes if n.target is aten.linear.default
                    and n.args[1].op == "get_attr"]
    assert [w.target for w in head_weights] == ["weights.lm_head.weight"]  # the head stays float, by name
    with torch.no_grad():
        h = torch.relu(model.proj(model.emb(tokens)))
        torch.testing.assert_close(model.lm_head(h), out, rtol=0.05, atol=0.05)  # proj in int8: loose


class OwnLinear(nn.Module):
    """Near miss: a module that is not an ``nn.Linear`` applying its own parameter ``w`` with ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.w)


def test_only_a_linear_module_renames_the_weight_it_reads() -> None:
    """``blk.w`` keeps its name (no ``blk.weight`` invented), so ``skip=blk.w`` still selects it."""
    model = nn.Sequential()
    model.add_module("blk", OwnLinear())
    model.add_module("head", nn.Linear(8, 8))
    compiled, before = _compile(model.eval(), pipeline="quantize(scheme=w8,skip=blk.w)")
    with torch.no_grad():
        compiled(torch.randn(2, 8))
    (graph,) = _new(before)
    names = {str(n.target) for n in graph.captured.graph.find_nodes(op="get_attr")}
    assert any(n.endswith("blk.w") for n in names) and not any(n.endswith("blk.weight") for n in names)
    assert graph.result.records[0].stats == {"quantized": 1, "skipped": 1}


BIAS = torch.zeros(3)


def test_global_tensors_are_read_at_every_call_not_frozen() -> None:
    global BIAS
    compiled = torch.compile(lambda x: x + BIAS, backend="passforge")
    x = torch.zeros(3)
    with torch.no_grad():
        for value in (0.0, 1.0, 2.0):
            BIAS = torch.full((3,), value)
            torch.testing.assert_close(compiled(x), x + value)


class Counter(nn.Module):
    """Writes into its own buffer and its argument with ``+=``, not a named in-place method."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        total += x.sum()
        return self.proj(x) * self.steps


def test_any_spelling_of_an_in_place_write_reaches_the_callers_tensors() -> None:
    mine, theirs = Counter().eval(), Counter().eval()
    theirs.load_state_dict(mine.state_dict())
    compiled = torch.compile(mine, backend="passforge")
    got_total, want_total = torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 4)
            torch.testing.assert_close(compiled(x, got_total), theirs(x, want_total))
    assert float(mine.steps) == 3.0 and torch.equal(got_total, want_total)


def test_inductor_with_dynamic_shapes_serves_every_length() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()
    compiled = torch.compile(model, backend="passforge", dynamic=True, options={"inductor": True})
    with torch.no_grad():
        for rows in (4, 7):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), model(x))


def test_the_cache_serves_dynamic_graphs_and_keys_on_calibration_data(tiny_lm: TinyLM, tmp_path: Path) -> None:
    spec = "quantize(scheme=w8a8-static,calib_windows=2)"
    hits = []
    for data in (list(range(64)), list(range(64)), list(range(63, -1, -1))):
        torch._dynamo.reset()
        compiled = torch.compile(
            tiny_lm, backend="passforge", dynamic=True, options={"pipeline": spec, "calib_data": data,
                                                                 "cache_dir": str(tmp_path)}
        )
        before = compiled_graphs()
        with torch.no_grad():
            for length in (16, 9):
                ids = _ids(length)
                assert float((compiled(ids) - tiny_lm(ids)).abs().max() / tiny_lm(ids).abs().max()) < 0.1
        (graph,) = _new(before)
        hits.append(graph.cache_hit)
    assert hits == [False, True, False]  # other calibration data: another entry


def test_a_tensor_as_calibration_data_is_refused_with_what_to_pass() -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(BackendError, match=r"tolist\(\)"):
        passforge_backend(gm, [torch.randn(1, 2)], options={"calib_data": torch.arange(8)})
    with pytest.raises(BackendError, match="True or False"):
        passforge_backend(gm, [torch.randn(1, 2)], options={"inductor": "no"})


class BrokenLM(nn.Module):
    """Token ids → embedding → (graph break) → linear: the second graph takes no token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(64, 16), nn.Linear(16, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        torch._dynamo.graph_break()
        return self.head(x)


def test_after_a_graph_break_a_graph_without_tokens_calibrates_on_its_calls() -> None:
    model = BrokenLM().eval()
    spec = "quantize(scheme=w8a8-static,skip='')"
    compiled, before = _compile(model, pipeline=spec, calib_data=list(range(64)) * 2, calibration_calls=2)
    with torch.no_grad():
        for _ in range(3):
            ids = _ids()
            assert float((compiled(ids) - model(ids)).abs().max() / model(ids).abs().max()) < 0.1
    graphs = _new(before)
    assert len(graphs) == 2 and all(g.result is not None for g in graphs)
    assert all(r.status == "ok" for g in graphs for r in g.result.records)
    notes = [" ".join(r.notes) for g in graphs for r in g.result.records]
    assert any("over 2 calibration windows" in n for n in notes), notes  # the head's graph: its 2 calls


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_graph_keeps_freed_memory_unless_the_option_says_no(
    monkeypatch: pytest.MonkeyPatch, tiny_lm: TinyLM, keep: bool
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(backend, "keep_freed_memory", lambda: calls.append(None) or True)
    compiled, _ = _compile(tiny_lm, pipeline="cleanup", keep_freed_memory=keep)
    with torch.no_grad():
        compiled(_ids())
        compiled(_ids())
    assert len(calls) == keep  # once, when the graph is compiled
    with pytest.raises(BackendError, match=r"keep_freed_memory.*True or False"):
        passforge_backend(torch.fx.symbolic_trace(tiny_lm), [_ids()], options={"keep_freed_memory": "no"})
