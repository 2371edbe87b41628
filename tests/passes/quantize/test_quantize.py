"""quantize → fold-quant → lower-quant: structure, numerics, counts and negatives."""

from __future__ import annotations

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops used in the counts below
from passforge.ir.capture import capture
from passforge.ir.graph import count_calls, param_stats
from passforge.ir.serialize import load_graph, save_graph
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassFailure, PassManager
from passforge.passes.quantize.lower import KERNEL_META

aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
LINEARS = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head


def _run(gm, spec, tokens, **kw):
    return PassManager.parse(spec, hooks=[VerifyHook()], **kw).run(gm, Context(example_inputs=(tokens,)))


def test_w8_structure_and_bound(small_llama, llama_graph, tokens):
    """Bound: per-channel symmetric int8 rounds each weight by at most half a step (max|w_row| / 254), about
    0.4% of the row's range; through two random blocks that moves the logits by well under 5% of their
    scale (measured ~1%)."""
    result = _run(llama_graph, "quantize", tokens)
    gm = result.graph
    assert result.records[0].stats == {"quantized": LINEARS - 1, "skipped": 1}  # lm_head* skipped by default
    assert count_calls(gm, qd.quantize_per_channel.default) == LINEARS - 1
    assert count_calls(gm, qd.dequantize_per_channel.default) == LINEARS - 1
    ref = small_llama(tokens)
    out = gm(tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * ref.abs().max().item())
    assert not torch.equal(out, ref)
    assert _run(gm, "quantize", tokens).records[0].modified is False  # idempotent


def test_fold_stores_int8_and_int4_and_changes_nothing(llama_graph, tokens):
    """int8 stores 1 byte per weight, int4 half a byte; scales (f32) and zero points (i64 per row for w8, i32
    per group for w4) add 4-8 bytes per row or 8 per group of 32 (0.25 B/weight): so at least 70% (w8) and
    75% (w4, g32) of the quantized weights' fp32 bytes must be gone."""
    weights = [n for n in llama_graph.graph.nodes if n.op == "get_attr" and n.target.endswith("proj.weight")]
    fp32_bytes = sum(llama_graph.get_parameter(n.target).numel() * 4 for n in weights)
    for spec, stored_dtype, saved in (("quantize", torch.int8, 0.70),
                                      ("quantize(scheme=w4,group_size=32)", torch.uint8, 0.75)):
        quantized = _run(llama_graph, spec, tokens).graph
        result = _run(quantized, "fold-quant", tokens)  # lossless: verified bit-exact (rtol=atol=0)
        gm = result.graph
        assert result.records[0].stats == {"folded": LINEARS - 1}
        assert count_calls(gm, qd.quantize_per_channel.default) == 0
        assert count_calls(gm, qd.quantize_per_channel_group.default) == 0
        stored = [t for name, t in gm.named_buffers() if name.endswith(("_int8", "_int4"))]
        assert len(stored) == LINEARS - 1 and {t.dtype for t in stored} == {stored_dtype}
        assert param_stats(llama_graph)[1] - param_stats(gm)[1] > saved * fp32_bytes
        assert not any(name.endswith("q_proj.weight") for name, _ in gm.named_parameters())
        assert _run(gm, "fold-quant", tokens).records[0].modified is False


def test_w4_packs_two_values_per_byte(llama_graph, tokens):
    gm = _run(llama_graph, "quantize(scheme=w4,group_size=32),fold-quant", tokens).graph
    packed = gm.get_buffer("layers_0_attention_q_proj_weight_int4")
    assert packed.shape == (64, 32)  # (N, K/2) for a 64x64 weight
    assert count_calls(gm, torch.ops.passforge.unpack_int4.default) == LINEARS - 1


def test_lowering_replaces_dequantize_linear_and_survives_save(llama_graph, tokens, tmp_path):
    folded = _run(llama_graph, "quantize,fold-quant", tokens).graph
    result = _run(folded, "lower-quant(guard=false)", tokens)  # verified against the graph before it
    gm = result.graph
    assert result.records[0].stats == {"lowered": LINEARS - 1, "kept": 0, "float": 0}
    assert count_calls(gm, torch.ops.passforge.int8_weight_linear.default) == LINEARS - 1
    assert count_calls(gm, qd.dequantize_per_channel.default) == 0
    assert count_calls(gm, aten.linear.default) == 1  # the float lm_head
    assert _run(gm, "lower-quant(guard=false)", tokens).records[0].modified is False
    save_graph(gm, tmp_path / "q.pt2", (tokens,))
    torch.testing.assert_close(load_graph(tmp_path / "q.pt2")(tokens), gm(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("prefer", ["size", "speed"])
def test_speed_guard_records_its_choice_per_layer(llama_graph, tokens, prefer):
    folded = _run(llama_graph, "quantize,fold-quant", tokens).graph
    result = _run(folded, f"lower-quant(prefer={prefer})", tokens)
    record, gm = result.records[0], result.graph
    stats = record.stats
    assert stats["lowered"] + stats["kept"] + stats["float"] == LINEARS - 1
    assert count_calls(gm, torch.ops.passforge.int8_weight_linear.default) == stats["lowered"]
    assert count_calls(gm, qd.dequantize_per_channel.default) == stats["kept"]
    assert len([n for n, _ in gm.named_buffers() if n.endswith("_dequantized")]) == stats["float"]
    if prefer == "size":
        assert stats["float"] == 0  # never trades the size win away unless asked
    decisions = [n.meta[KERNEL_META] for n in gm.graph.nodes if KERNEL_META in n.meta]
    assert len(decisions) == LINEARS - 1
    expected = {"int8_weight_linear", "dequantize+linear"} | ({"float weight"} if prefer == "speed" else set())
    for decision in decisions:  # which form wins is the machine's business; the record must say why
        assert set(decision["timings_ms"]) == expected
        assert decision["kernel"] == min(decision["timings_ms"], key=decision["timings_ms"].get)
    assert record.notes and all("ms" in note for note in record.notes)  # one note per distinct shape


def test_w8a8_quantizes_activations_per_token_and_lowers_to_the_int8_gemm(small_llama, llama_graph, tokens):
    """Bound for the fake-quant graph: as w8 plus per-token int8 activations (a step of 1/255 of each token's
    range) — within 5% of the logits' scale (measured ~1%)."""
    quantized = _run(llama_graph, "quantize(scheme=w8a8)", tokens).graph
    assert count_calls(quantized, qd.choose_qparams_per_token_asymmetric.default) == LINEARS - 1
    assert count_calls(quantized, qd.quantize_per_token.default) == LINEARS - 1
    ref = small_llama(tokens)
    torch.testing.assert_close(quantized(tokens), ref, rtol=0, atol=0.05 * ref.abs().max().item())
    result = _run(quantized, "fold-quant,lower-quant(guard=false)", tokens)
    gm = result.graph
    assert result.records[1].stats == {"lowered": LINEARS - 1, "kept": 0, "float": 0}
    assert count_calls(gm, torch.ops.passforge.int8_dynamic_linear.default) == LINEARS - 1
    assert count_calls(gm, qd.quantize_per_token.default) == 0  # the kernel quantizes x itself
    assert count_calls(gm, torch.ops.passforge.int8_weight_linear.default) == 0


def test_skip_globs_and_bad_options(llama_graph, tokens):
    result = _run(llama_graph, "quantize(skip='lm_head*;layers.1.*')", tokens)
    assert result.records[0].stats == {"quantized": 7, "skipped": 8}
    with pytest.raises(PassFailure, match="not a multiple of group_size=48"):
        _run(llama_graph, "quantize(scheme=w4,group_size=48)", tokens)


def test_nan_weights_are_an_error_naming_the_layer(small_llama, tokens):
    with torch.no_grad():
        small_llama.layers[1].feed_forward.up_proj.weight[3, 5] = float("nan")
    gm = capture(small_llama, (tokens,))
    with pytest.raises(PassFailure, match=r"layers\.1\.feed_forward\.up_proj\.weight.*NaN/Inf"):
        _run(gm, "quantize", tokens)


def test_decode_graph_can_take_its_own_scheme(small_llama):
    from passforge.models.llama import DecodeStep, example_decode_inputs

    inputs = example_decode_inputs(small_llama)
    gm = capture(DecodeStep(small_llama), inputs)
    spec = "quantize(scheme=w8a8,decode_scheme=w8)"
    for role, dynamic in (("decode", 0), ("prefill", LINEARS - 1)):
        ctx = Context(example_inputs=inputs, role=role)
        out = PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx).graph
        assert count_calls(out, qd.quantize_per_token.default) == dynamic
        assert count_calls(out, qd.quantize_per_channel.default) == LINEARS - 1


def test_cleanup_after_quantize_keeps_the_quantization(llama_graph, tokens):
    after_cleanup = _run(llama_graph, "quantize,cleanup", tokens).graph
    assert count_calls(after_cleanup, qd.quantize_per_channel.default) == LINEARS - 1  # Q/DQ: a folding barrier
    assert _run(after_cleanup, "fold-quant", tokens).records[0].stats == {"folded": LINEARS - 1}


class _BiasedTied(torch.nn.Module):
    """Biased linears (bias passed by keyword in one of them) and two linears sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten.linear.default(x, self.a.weight, bias=self.a.bias)
        return self.b(torch.relu(y))


@pytest.mark.parametrize("scheme", ["w8", "w8a8"])
def test_biases_and_shared_weights(scheme):
    x = torch.randn(2, 24, 32)
    model = _BiasedTied()
    gm = capture(model, (x,))
    spec = f"quantize(scheme={scheme},skip=''),fold-quant,lower-quant(guard=false)"
    result = PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, Context(example_inputs=(x,)))
    out = result.graph
    assert result.records[0].stats == {"quantized": 2, "skipped": 0}
    assert result.records[1].stats == {"folded": 1}  # the shared weight is quantized and stored once
    assert len([n for n, _ in out.named_buffers() if n.endswith("_int8")]) == 1
    kernel = torch.ops.passforge.int8_dynamic_linear if scheme == "w8a8" else torch.ops.passforge.int8_weight_linear
    assert count_calls(out, kernel.default) == 2
    ref = model(x)
    torch.testing.assert_close(out(x), ref, rtol=0, atol=0.05 * ref.abs().max().item())  # biases kept
