"""Observers and ``quantize(scheme=w8a8-static)``: ranges, structure, numerics, memo reuse, negatives."""

from __future__ import annotations

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops used in the counts below
from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.models.llama import DecodeStep, PrefillStep, example_decode_inputs
from passforge.passes.base import Context, PassError, PreconditionError
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassFailure, PassManager
from passforge.passes.quantize.observers import RangeObserver, int8_affine_qparams

qd = torch.ops.quantized_decomposed
LINEARS = 2 * 7 + 1
# Distinct linear inputs per layer: attention norm (q, k, v), attention output (o), ffn norm (gate, up),
# gate*up (down).
INPUTS = 2 * 4


def _calibrated(method: str, batches: list[torch.Tensor], **kw) -> tuple[float, float]:
    obs = RangeObserver(method, "test", **kw)
    for b in batches:
        obs.update(b)
    if obs.needs_histogram:
        obs.start_histogram()
        for b in batches:
            obs.update(b)
    return obs.range()


def _heavy_tailed() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, generator=g) for _ in range(4)]
    batches[2][7] = 60.0  # one outlier among 16k values
    return batches


def test_minmax_and_moving_average():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])]
    assert _calibrated("minmax", batches) == (-3.0, 2.0)
    # first window (-1, 2), then 10% of the way to (-3, 1)
    lo, hi = _calibrated("moving-average", batches)
    assert lo == pytest.approx(-1.2) and hi == pytest.approx(1.9)
    assert _calibrated("minmax", [torch.tensor([1.0, 2.0])]) == (0.0, 2.0)  # zero stays representable


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_clipping_observers_clip_a_lone_outlier(method):
    """One value at 60 among 16k N(0, 1) values: min/max would make the step 60/127; percentile and entropy
    must clip it (range well under 60) but keep the bulk (more than 3 sigma)."""
    lo, hi = _calibrated(method, _heavy_tailed())
    assert 3 < hi < 30, (lo, hi)
    assert -30 < lo < -3, (lo, hi)


def test_entropy_threshold_is_cut_to_the_range_seen():
    """ReLU-like data (nothing below 0): TensorRT's threshold is symmetric, but our int8 activations are
    asymmetric, so the low end stays at 0 and no levels go unused."""
    batches = [b.clamp(min=0) for b in _heavy_tailed()]
    lo, hi = _calibrated("entropy", batches)
    assert lo == 0.0 and 2 < hi < 30, (lo, hi)


def test_memo_finds_a_name_through_one_wrapper_only():
    from passforge.passes.quantize.calibrate import memo_get, memo_put

    memo: dict[str, object] = {}
    memo_put(memo, "k", "layers.0.wq.weight", 1)
    memo_put(memo, "k", "norm.weight", 2)
    assert memo_get(memo, "k", ["model.layers.0.wq.weight"]) == 1
    assert memo_get(memo, "k", ["model.layers.0.norm.weight"]) is None  # not the final norm's entry


def _quantization_mse(values: torch.Tensor, lo: float, hi: float) -> float:
    scale, zero_point = int8_affine_qparams(lo, hi)
    q = torch.clamp(torch.round(values / scale) + zero_point, -128, 127)
    return float(((q - zero_point) * scale - values).pow(2).mean())


@pytest.mark.parametrize("data", ["outlier", "laplace"])
def test_mse_observer_minimises_the_real_quantization_error(data):
    """The mse range's actual int8 error on the data is no worse than min/max's or the percentile's (1%
    slack: the search works on a 2048-bin histogram). (A lone outlier is *kept*: its squared clipping error
    outweighs the finer step for 16k values — which is what minimising MSE means.)"""
    if data == "outlier":
        batches = _heavy_tailed()
    else:
        laplace = torch.distributions.Laplace(0.0, 1.0)
        torch.manual_seed(0)
        batches = [laplace.sample((4096,)) for _ in range(4)]
    values = torch.cat(batches)
    mse = _quantization_mse(values, *_calibrated("mse", batches))
    assert mse <= 1.01 * _quantization_mse(values, *_calibrated("minmax", batches))
    assert mse <= 1.01 * _quantization_mse(values, *_calibrated("percentile", batches))


def test_percentile_100_keeps_the_extremes():
    _, hi = _calibrated("percentile", _heavy_tailed(), percentile=100.0)
    assert hi == pytest.approx(60.0, rel=1e-3)


def test_bad_calibration_values_are_errors_naming_the_layer():
    with pytest.raises(PassError, match=r"layers\.3\.wq.*NaN"):
        RangeObserver("minmax", "layers.3.wq").update(torch.tensor([1.0, float("nan")]))
    obs = RangeObserver("minmax", "layers.3.wq")
    obs.update(torch.zeros(8))
    with pytest.raises(PassError, match=r"layers\.3\.wq.*zero range"):
        obs.range()
    with pytest.raises(PassError, match="never reached"):
        RangeObserver("minmax", "layers.3.wq").range()


def test_int8_affine_qparams_cover_the_range():
    scale, zero_point = int8_affine_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255)
    assert (-128 - zero_point) * scale == pytest.approx(-1.0, abs=scale)
    assert (127 - zero_point) * scale == pytest.approx(3.0, abs=scale)


def _calib_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (16 * 64,), generator=torch.Generator().manual_seed(2))


def _run(gm, spec, inputs, **ctx_kw):
    ctx = Context(example_inputs=inputs, calib_tokens=_calib_tokens(), **ctx_kw)
    return PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx)


def test_w8a8_static_structure_numerics_and_idempotence(small_llama, llama_graph, tokens):
    """Bound: per-tensor int8 activations on min/max ranges plus int8 weights; on this random 2-layer model
    the logits move by a few % of their scale (measured ~3%): allow 10%."""
    result = _run(llama_graph, "quantize(scheme=w8a8-static,calib_windows=4)", (tokens,))
    gm = result.graph
    assert result.records[0].stats == {"quantized": LINEARS - 1, "skipped": 1, "activation_ranges": INPUTS}
    assert count_calls(gm, qd.quantize_per_tensor.default) == INPUTS  # one per input, shared by q/k/v
    assert count_calls(gm, qd.dequantize_per_tensor.default) == INPUTS
    assert count_calls(gm, qd.quantize_per_channel.default) == LINEARS - 1
    assert count_calls(gm, qd.choose_qparams_per_token_asymmetric.default) == 0
    ref = small_llama(tokens)
    out = gm(tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.10 * ref.abs().max().item())
    assert not torch.equal(out, ref)
    assert "4 calibration windows" in result.records[0].notes[0]
    assert _run(gm, "quantize(scheme=w8a8-static,calib_windows=4)", (tokens,)).records[0].modified is False


def test_w8a8_static_ranges_are_reused_by_the_prefill_and_decode_graphs(small_llama, tokens):
    """The forward graph's ranges go to ``ctx.memo``; the prefill and decode graphs (wrapped: their weights
    are ``model.layers...``) take the same constants instead of calibrating on their own inputs."""
    spec = "quantize(scheme=w8a8-static,calib_windows=4)"
    memo: dict[str, object] = {}
    forward = _run(capture(small_llama, (tokens,)), spec, (tokens,), memo=memo).graph
    decode_in = example_decode_inputs(small_llama)
    prefill_in = (tokens,)
    prefill = _run(capture(PrefillStep(small_llama), prefill_in), spec, prefill_in, memo=memo, role="prefill")
    decode = _run(capture(DecodeStep(small_llama), decode_in), spec, decode_in, memo=memo, role="decode")

    def constants(gm):
        return sorted(n.args[1:3] for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default)

    assert len(constants(forward)) == INPUTS
    assert constants(prefill.graph) == constants(forward)
    assert constants(decode.graph) == constants(forward)
    assert prefill.records[0].notes == []  # nothing calibrated: all ranges came from the memo
    assert decode.records[0].notes == []


@pytest.mark.parametrize("observer", ["moving-average", "percentile", "mse", "entropy"])
def test_every_observer_runs_in_the_pass(llama_graph, tokens, observer):
    spec = f"quantize(scheme=w8a8-static,observer={observer},calib_windows=2)"
    gm = _run(llama_graph, spec, (tokens,)).graph
    assert count_calls(gm, qd.quantize_per_tensor.default) == INPUTS


def test_static_scheme_needs_calibration_tokens(llama_graph, tokens):
    manager = PassManager.parse("quantize(scheme=w8a8-static)")
    with pytest.raises(PassFailure, match=r"needs calibration data.*--calib-data") as info:
        manager.run(llama_graph, Context(example_inputs=(tokens,)))
    assert isinstance(info.value.__cause__, PreconditionError)
    too_few = Context(example_inputs=(tokens,), calib_tokens=torch.arange(5))
    with pytest.raises(PassFailure, match="fewer than one window of 16"):
        manager.run(llama_graph, too_few)


def test_static_scheme_refuses_graphs_without_token_inputs():
    linear = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    gm = capture(linear, (x,))
    with pytest.raises(PassFailure, match="int64 token tensor"):
        _run(gm, "quantize(scheme=w8a8-static)", (x,))
