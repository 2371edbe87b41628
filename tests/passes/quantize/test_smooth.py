"""``smooth-quant``: same function, outliers moved into the weights; negatives and idempotence."""

from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import capture
from passforge.ir.graph import op_counts
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.quantize.smooth import SMOOTHED_META

NORMS = 2 * 2 + 1  # attention and ffn norm per layer, and the final norm (feeding lm_head)
GROUPS = NORMS + 2  # and down_proj's input, silu(gate) * up, per layer (1/s into up_proj's rows)


def _calib_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (8 * 16,), generator=torch.Generator().manual_seed(2))


def _run(gm, spec, tokens):
    ctx = Context(example_inputs=(tokens,), calib_tokens=_calib_tokens())
    return PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx)


def _with_outlier_channel(model: torch.nn.Module) -> torch.nn.Module:
    """Give channel 5 of every norm's output 30x the magnitude (as LLMs' outlier features have)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p[5] *= 30
    return model


def test_same_function_with_flatter_activations(small_llama, tokens):
    """Verified lossless against the graph before it (fp32 reassociation, 1e-4); the norm scales' outlier
    channel shrinks (activations flatter) and the weight columns it feeds grow."""
    model = _with_outlier_channel(small_llama)
    gm = capture(model, (tokens,))
    before_ops = op_counts(gm)
    result = _run(gm, "smooth-quant", tokens)
    out = result.graph
    assert result.records[0].stats == {"smoothed": GROUPS}
    assert op_counts(out) == before_ops  # no node added or removed: only tensors change
    norm_before = model.layers[0].attention_norm.weight
    norm_after = out.get_parameter("layers.0.attention_norm.weight")
    ratio_before = norm_before.abs().max() / norm_before.abs().median()
    assert norm_after.abs().max() / norm_after.abs().median() < ratio_before / 3
    wq_before = model.layers[0].attention.q_proj.weight
    wq_after = out.get_parameter("layers.0.attention.q_proj.weight")
    assert wq_after[:, 5].abs().max() > wq_before[:, 5].abs().max()
    up_before = model.layers[0].feed_forward.up_proj.weight
    up_after = out.get_parameter("layers.0.feed_forward.up_proj.weight")
    down_before = model.layers[0].feed_forward.down_proj.weight
    down_after = out.get_parameter("layers.0.feed_forward.down_proj.weight")
    assert not torch.equal(up_after, up_before) and not torch.equal(down_after, down_before)
    column_factors = down_after / down_before  # down_proj's input column j scaled by s_j: one factor per column
    torch.testing.assert_close(column_factors, column_factors[:1].expand_as(column_factors))
    assert model.layers[0].attention_norm.weight is norm_before  # the user's model is untouched
    torch.testing.assert_close(out(tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_smoothing_helps_static_int8_on_outlier_activations(small_llama, tokens):
    """With a 30x outlier channel, per-tensor int8 activations lose most channels' resolution; smoothing
    first must cut the logits' error against fp32 (measured ~2x)."""
    model = _with_outlier_channel(small_llama)
    ref = model(tokens)
    plain = _run(capture(model, (tokens,)), "quantize(scheme=w8a8-static,calib_windows=8)", tokens).graph
    smoothed = _run(capture(model, (tokens,)), "smooth-quant,quantize(scheme=w8a8-static,calib_windows=8)",
                    tokens).graph
    err_plain = (plain(tokens) - ref).abs().mean()
    err_smoothed = (smoothed(tokens) - ref).abs().mean()
    assert err_smoothed < 0.8 * err_plain, (float(err_smoothed), float(err_plain))


def test_alpha_search_reports_a_choice_per_norm(small_llama, tokens):
    result = _run(capture(_with_outlier_channel(small_llama), (tokens,)), "smooth-quant(search=true)", tokens)
    notes = result.records[0].notes
    assert len(notes) == GROUPS and all("alpha 0." in n for n in notes)


def test_second_run_changes_nothing_and_non_norm_inputs_are_left_alone(small_llama, tokens):
    out = _run(capture(small_llama, (tokens,)), "smooth-quant", tokens).graph
    marked = [n for n in out.graph.nodes if n.meta.get(SMOOTHED_META)]
    assert len(marked) == GROUPS
    assert _run(out, "smooth-quant", tokens).records[0].modified is False


class NormFeedsLinearAndResidual(torch.nn.Module):
    """A norm's output read by a linear *and* added to the residual: scaling it would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.norm = torch.nn.RMSNorm(16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))
        return self.proj(h) + h


def test_a_norm_output_with_other_readers_is_not_smoothed():
    model = NormFeedsLinearAndResidual().eval()
    ids = torch.randint(0, 32, (1, 16))
    result = _run(capture(model, (ids,)), "smooth-quant", ids)
    assert result.records[0].stats == {"smoothed": 0}
    assert result.records[0].modified is False


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        PassManager.parse("smooth-quant(alpha=1.5)")
    with pytest.raises(ValueError, match="calib_windows"):
        PassManager.parse("smooth-quant(calib_windows=0)")
    with pytest.raises(ValueError, match="calib_windows"):
        PassManager.parse("gptq(calib_windows=0)")
    with pytest.raises(ValueError, match="damp"):
        PassManager.parse("gptq(damp=0)")
