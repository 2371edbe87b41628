"""``sparsify``: the requested zeros in every targeted weight and nowhere else; wanda and sparsegpt beat the
simpler methods on the layer objective; compressed storage round-trips; negatives and idempotence."""

from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import capture
from passforge.ir.graph import copy_graph_module, get_attr, op_counts, param_stats
from passforge.models.llama import Llama
from passforge.passes.base import Context, PreconditionError
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.prune.sparse_format import (
    SPARSIFIED_META,
    compressed_bytes,
    load_compressed,
    pack,
    packed_nbytes,
    save_compressed,
    unpack,
)
from passforge.passes.prune.sparsify import (
    Sparsify,
    is_2_4_sparse,
    magnitude_prune,
    sparsegpt_prune,
    to_semi_structured,
    views_as_reshapes,
    wanda_prune,
)
from tests.conftest import SMALL, TiedEmbeddingHead, held_out_ppl

LINEARS = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.fixture(scope="module")
def small() -> tuple[Llama, torch.Tensor, torch.fx.GraphModule]:
    """conftest's ``small_llama``, ``tokens`` and ``llama_graph``, captured once for this module (capture is
    most of these tests' time): passes run through ``PassManager``, which never changes the graph it is given,
    or on a ``copy_graph_module`` of it."""
    torch.manual_seed(0)
    model = Llama(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, tokens, capture(model, (tokens,))


def _calib_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (8 * 16,), generator=torch.Generator().manual_seed(2))


def _run(gm, sparsify: Sparsify, tokens, **ctx):
    ctx = Context(example_inputs=(tokens,), **({"calib_tokens": _calib_tokens()} | ctx))
    return PassManager([sparsify], hooks=[VerifyHook()]).run(gm, ctx)


def _pruned_weights(gm) -> dict[str, torch.Tensor]:
    return {n.args[1].target: get_attr(gm, n.args[1].target) for n in gm.graph.nodes if n.meta.get(SPARSIFIED_META)}


# --- structure -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_requested_zeros_in_every_targeted_weight_and_nowhere_else(small, method):
    """Same graph (op counts), the 14 weights but lm_head pruned. Unstructured 50%: wanda compares within each
    output row, so every row is exactly half zero; magnitude over the whole layer and sparsegpt over each
    block of 128 columns (one block here), so each layer is exactly half zero. 2:4: two zeros in every group
    of 4 of every pruned weight."""
    small_llama, tokens, llama_graph = small
    result = _run(llama_graph, Sparsify(method=method), tokens)
    gm, record = result.graph, result.records[0]
    assert record.stats == {"sparsified": LINEARS - 1}
    assert op_counts(gm) == op_counts(llama_graph)
    weights = _pruned_weights(gm)
    assert len(weights) == LINEARS - 1 and "lm_head.weight" not in weights
    for name, w in weights.items():
        zeros = w == 0
        assert int(zeros.sum()) == w.numel() // 2, name
        if method == "wanda":
            assert (zeros.sum(dim=1) == w.shape[1] // 2).all(), name
    assert torch.equal(get_attr(gm, "lm_head.weight"), small_llama.lm_head.weight)
    assert "50.0% of the 14 pruned weights' entries are zero" in record.notes[-2]
    assert "no speed-up is claimed" in record.notes[-1]

    gm = _run(llama_graph, Sparsify(pattern="2:4", method=method), tokens).graph
    weights = _pruned_weights(gm)
    assert len(weights) == LINEARS - 1
    assert all(is_2_4_sparse(w) for w in weights.values())
    assert op_counts(gm) == op_counts(llama_graph)
    assert torch.equal(get_attr(gm, "lm_head.weight"), small_llama.lm_head.weight)


def test_2_4_check():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_2_4_sparse(w)
    assert not is_2_4_sparse(torch.tensor([[1.0, 0.0, 2.0, 3.0]]))  # one zero in the group
    assert not is_2_4_sparse(torch.zeros(2, 6))  # 6 columns: no whole groups of 4


# --- numerics ------------------------------------------------------------------------------------------------


def _correlated_inputs(tokens: int = 1024, features: int = 64, outliers: tuple[int, ...] = ()) -> torch.Tensor:
    """Inputs close to a rank-16 subspace plus noise (real activations are strongly correlated); the
    ``outliers`` channels 20x larger (as LLMs' few large-magnitude features are)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, features, generator=g)
    x = torch.randn(tokens, 16, generator=g) @ basis + 0.1 * torch.randn(tokens, features, generator=g)
    x[:, list(outliers)] *= 20
    return x


def _layer_error(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> float:
    """||X W^T - X Ŵ^T||^2 / ||X W^T||^2: what pruning changes in the layer's output."""
    return float((x @ (w - pruned).T).pow(2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_keeps_the_weights_of_outlier_channels(pattern):
    """Three input channels 20x larger: magnitude prunes about half their weights like any other's, wanda
    keeps nearly all (measured 98.6% unstructured, 99.3% 2:4; the rest are tiny weights) and its layer error
    is far lower (measured 0.058x unstructured, 0.050x 2:4; allow 0.2x)."""
    outliers = [3, 17, 40]
    x = _correlated_inputs(outliers=tuple(outliers))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    wanda = wanda_prune(w, x.norm(dim=0), 0.5, pattern)
    magnitude = magnitude_prune(w, 0.5, pattern)
    assert (wanda[:, outliers] != 0).float().mean() > 0.95
    assert (magnitude[:, outliers] != 0).float().mean() < 0.6
    assert _layer_error(x, w, wanda) < 0.2 * _layer_error(x, w, magnitude)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_on_correlated_inputs(pattern):
    """SparseGPT compensates each pruned weight on the columns not yet pruned, which pays where inputs are
    correlated: at the same sparsity its layer error must be far below wanda's (256 inputs, two blocks of
    128; measured 0.034x unstructured, 0.068x 2:4; allow 0.25x). Each block's mask is chosen at its start,
    so each block is exactly half zero."""
    x = _correlated_inputs(features=256)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    sparsegpt = sparsegpt_prune(w, x.T @ x / x.shape[0], 0.5, pattern, blocksize=128)
    wanda = wanda_prune(w, x.norm(dim=0), 0.5, pattern)
    for block in (sparsegpt[:, :128], sparsegpt[:, 128:]):
        assert int((block == 0).sum()) == block.numel() // 2
    if pattern == "2:4":
        assert is_2_4_sparse(sparsegpt)
    assert _layer_error(x, w, sparsegpt) < 0.25 * _layer_error(x, w, wanda)


def test_sparsegpt_gives_dead_inputs_zero_weight():
    x = _correlated_inputs()
    x[:, 5] = 0  # an input channel that is never non-zero
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    pruned = sparsegpt_prune(w, x.T @ x / x.shape[0], 0.5)
    assert torch.isfinite(pruned).all() and not pruned[:, 5].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16), (3, 7), (5,)])
def test_pack_unpack_round_trips_exactly(dtype, shape):
    w = magnitude_prune(torch.randn(shape).reshape(1, -1), 0.5).reshape(shape).to(dtype)
    values, bitmask = pack(w)
    assert values.dtype == dtype and bitmask.dtype == torch.uint8 and bitmask.numel() == (w.numel() + 7) // 8
    assert torch.equal(unpack(values, bitmask, w.shape), w)
    assert packed_nbytes(w) == values.numel() * values.element_size() + bitmask.numel()
    assert packed_nbytes(w) < w.numel() * w.element_size()  # 50% zeros: 0.5 + 1/32 (fp32), + 1/16 (bf16)


def test_compressed_checkpoint_is_smaller_and_loads_back(small, tmp_path):
    _, tokens, llama_graph = small
    gm = _run(llama_graph, Sparsify(method="magnitude"), tokens).graph
    path = tmp_path / "model.safetensors"
    save_compressed(gm, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # written atomically, no leftovers
    loaded = load_compressed(path)
    for name, tensor in gm.named_parameters():
        assert torch.equal(loaded[name], tensor), name
    dense_bytes = param_stats(gm)[1]
    assert compressed_bytes(gm) < 0.8 * dense_bytes  # the embedding and lm_head stay dense
    assert path.stat().st_size < 0.8 * dense_bytes


def test_tied_weights_are_stored_once(tmp_path):
    """The graph reads the shared embedding / head weight under two names: one tensor in the file, both names
    loaded back (as one tensor)."""
    from safetensors import safe_open

    gm = capture(TiedEmbeddingHead().eval(), (torch.randint(0, 32, (1, 8)),))
    save_compressed(gm, tmp_path / "tied.safetensors")
    with safe_open(str(tmp_path / "tied.safetensors"), framework="pt") as handle:
        assert len(list(handle.keys())) == 1
    loaded = load_compressed(tmp_path / "tied.safetensors")
    assert loaded["emb.weight"] is loaded["head.weight"]
    assert torch.equal(loaded["head.weight"], gm.get_parameter("head.weight"))


def test_damaged_compressed_checkpoints_are_refused_with_the_name(small, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, tokens, llama_graph = small
    gm = _run(llama_graph, Sparsify(method="magnitude"), tokens).graph
    save_compressed(gm, tmp_path / "ok.safetensors")
    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    stored = load_file(tmp_path / "ok.safetensors")
    name = next(k for k in stored if k.endswith(".bitmask")).removesuffix(".bitmask")
    cases = {
        "missing": ({k: v for k, v in stored.items() if k != f"{name}.bitmask"}, metadata),
        "short": ({**stored, f"{name}.bitmask": stored[f"{name}.bitmask"][:-1].clone()}, metadata),
        "float": ({**stored, f"{name}.bitmask": stored[f"{name}.bitmask"].float()}, metadata),
        "alias": (stored, {**metadata, "aliases": '{"x": "nowhere"}'}),
    }
    for label, (tensors, meta) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=r"damaged|alias"):
            load_compressed(path)


# --- counts and negatives ------------------------------------------------------------------------------------


def test_second_run_changes_nothing(small):
    _, tokens, llama_graph = small
    out = _run(llama_graph, Sparsify(method="sparsegpt"), tokens).graph
    again = _run(out, Sparsify(method="sparsegpt"), tokens)
    assert again.records[0].modified is False and again.records[0].stats == {"sparsified": 0}
    for name, w in _pruned_weights(out).items():
        assert torch.equal(get_attr(again.graph, name), w)


class SharedAndComputedWeights(torch.nn.Module):
    """One weight read by two linears, one computed (``2 * v``) and one plain: only the plain one is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Parameter(torch.randn(16, 16))
        self.v = torch.nn.Parameter(torch.randn(16, 16))
        self.plain = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.functional.linear
        return linear(x, self.shared) + linear(x.relu(), self.shared) + linear(x, 2 * self.v) + self.plain(x)


def test_shared_computed_and_tied_weights_are_not_touched():
    model = SharedAndComputedWeights().eval()
    x = torch.randn(2, 16)
    prune_all = PassManager([Sparsify(method="magnitude", skip="")])
    result = prune_all.run(capture(model, (x,)), Context(example_inputs=(x,)))
    gm = result.graph
    assert result.records[0].stats == {"sparsified": 1}
    assert list(_pruned_weights(gm)) == ["plain.weight"]
    assert torch.equal(get_attr(gm, "shared"), model.shared) and torch.equal(get_attr(gm, "v"), model.v)

    tied = TiedEmbeddingHead().eval()  # the head's weight is the embedding's
    ids = torch.randint(0, 32, (1, 8))
    result = prune_all.run(capture(tied, (ids,)), Context(example_inputs=(ids,)))
    assert result.records[0].modified is False


def test_skip_empty_prunes_the_head_too(small):
    _, tokens, llama_graph = small
    gm = _run(llama_graph, Sparsify(method="magnitude", skip=""), tokens).graph
    assert "lm_head.weight" in _pruned_weights(gm) and len(_pruned_weights(gm)) == LINEARS


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        Sparsify(ratio=1.5)
    with pytest.raises(ValueError, match="pattern=2:4 zeroes exactly half"):
        Sparsify(pattern="2:4", ratio=0.3)
    with pytest.raises(ValueError, match="blocksize"):
        Sparsify(method="sparsegpt", blocksize=6)
    pipeline = PassManager.parse("sparsify(pattern=2:4,method=sparsegpt,skip='')")
    assert pipeline.spec == "sparsify(pattern=2:4,method=sparsegpt,skip='')"


def test_calibrated_methods_without_calibration_data_say_what_to_do(small):
    _, tokens, llama_graph = small
    assert not Sparsify(method="magnitude").needs_calibration
    assert Sparsify(method="wanda").needs_calibration and Sparsify(method="sparsegpt").needs_calibration
    with pytest.raises(PreconditionError, match=r"needs calibration data.*--calib-data"):
        Sparsify(method="wanda").run(copy_graph_module(llama_graph), Context(example_inputs=(tokens,)))
    assert Sparsify(method="magnitude").run(copy_graph_module(llama_graph), Context(example_inputs=(tokens,))).modified


def test_decode_graph_reuses_the_forward_graphs_weights(small):
    """The decode step's weights are the forward graph's, through the wrapper's ``model.`` prefix, without
    calibrating again (it gets no calibration data here)."""
    from passforge.models.llama import DecodeStep, example_decode_inputs

    small_llama, tokens, llama_graph = small
    memo: dict[str, object] = {}
    forward = _run(llama_graph, Sparsify(), tokens, memo=memo).graph
    decode_in = example_decode_inputs(small_llama)
    decode = PassManager([Sparsify()]).run(
        capture(DecodeStep(small_llama), decode_in), Context(example_inputs=decode_in, memo=memo, role="decode")
    )
    assert decode.records[0].stats == {"sparsified": LINEARS - 1}
    for name, w in _pruned_weights(forward).items():
        assert torch.equal(get_attr(decode.graph, f"model.{name}"), w)


# --- lowering ------------------------------------------------------------------------------------------------


def test_semi_structured_lowering_on_cpu_is_a_no_op_with_a_reason(small):
    _, tokens, llama_graph = small
    swapped, note = to_semi_structured(_run(llama_graph, Sparsify(method="magnitude"), tokens).graph)
    assert swapped == 0 and "run sparsify(pattern=2:4) first" in note  # unstructured: nothing to lower
    gm = _run(llama_graph, Sparsify(pattern="2:4", method="magnitude"), tokens).graph
    before = dict(_pruned_weights(gm))
    swapped, note = to_semi_structured(gm)
    assert swapped == 0 and "needs fp16/bf16 on CUDA" in note
    assert all(get_attr(gm, name) is w for name, w in before.items())
    assert op_counts(gm)["aten.view.default"] > 0  # nothing swapped: the graph is left as it was


def test_views_become_reshapes_for_layouts_the_trace_did_not_see(small):
    """After the swap a linear's output may be transposed in memory; reshape takes those, view does not. Every
    view goes, the output is bit-identical, a second call finds nothing, and a graph traced on a contiguous
    input then takes a transposed one that its view refused."""
    _, tokens, llama_graph = small
    gm = copy_graph_module(llama_graph)
    views = op_counts(gm)["aten.view.default"]
    assert views_as_reshapes(gm) == views > 0
    assert op_counts(gm)["aten.view.default"] == 0 and op_counts(gm)["aten.reshape.default"] >= views
    assert torch.equal(gm(tokens), llama_graph(tokens))
    assert views_as_reshapes(gm) == 0

    class Flatten(torch.nn.Module):
        def forward(self, x):
            return x.view(-1) * 2

    flat = capture(Flatten(), (torch.randn(4, 6),))
    transposed = torch.randn(6, 4).t()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        flat(transposed)
    assert views_as_reshapes(flat) == 1
    assert torch.equal(flat(transposed), transposed.reshape(-1) * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need CUDA")
def test_semi_structured_lowering_on_cuda_computes_the_same(small_llama, tokens):
    """bf16 on CUDA: the 2:4 weights become SparseSemiStructuredTensor (where the GPU and shapes allow) and the
    logits match the dense 2:4 graph's within 4 bf16 ulp of their scale (the sparse kernel accumulates in fp32
    like the dense one; the two round their bf16 outputs differently, and that compounds through the layers)."""
    from passforge.ir.graph import to_device
    from passforge.passes.base import BF16_ULP

    device = torch.device("cuda")
    gm = to_device(capture(small_llama, (tokens,)), device)
    tokens = tokens.to(device)
    spec = "cast(dtype=bf16),sparsify(pattern=2:4,method=magnitude)"
    gm = PassManager.parse(spec).run(gm, Context(example_inputs=(tokens,), device=device)).graph
    with torch.inference_mode():
        expected = gm(tokens).float()
    swapped, note = to_semi_structured(gm)
    if swapped == 0:
        pytest.skip(note)
    lowered = [w for w in _pruned_weights(gm).values() if isinstance(w, torch.sparse.SparseSemiStructuredTensor)]
    assert len(lowered) == swapped
    with torch.inference_mode():
        actual = gm(tokens).float()
    torch.testing.assert_close(actual, expected, rtol=0, atol=4 * BF16_ULP * expected.abs().max().item())


# --- the bundled trained LM ----------------------------------------------------------------------------------


def test_held_out_perplexity_on_the_bundled_lm(bundled_lm_and_text):
    """50% unstructured wanda on the trained LM (lm_head dense; 16 windows of its calibration text): held-out
    perplexity within +15% of dense (measured 5.319 vs 5.094, +4.4%; magnitude +5.5%, sparsegpt +2.4%: see
    docs/pruning.md)."""
    from passforge.models.bundled import calib_text
    from passforge.models.tokenizer import encode

    model, ids = bundled_lm_and_text
    example = (ids[:128][None],)
    calib = torch.tensor(encode(calib_text()))  # training text, never the held-out text measured
    out = PassManager([Sparsify()]).run(capture(model, example), Context(example_inputs=example, calib_tokens=calib))
    dense, wanda = held_out_ppl(model, ids), held_out_ppl(out.graph, ids)
    assert wanda / dense - 1 < 0.15, (dense, wanda)
