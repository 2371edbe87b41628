"""lower-quant on w8a8-static (calibrated per-tensor activation Q/DQ + folded int8 weight →
``passforge::int8_static_linear``): structure, numerics, counts and negatives."""

from __future__ import annotations

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers the ops counted below
from passforge.ir.capture import capture
from passforge.ir.graph import count_calls, op_counts
from passforge.ir.serialize import load_graph, save_graph
from passforge.kernels.ops import onednn_int8_exact
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.quantize import lower
from passforge.passes.quantize.lower import KERNEL_META

aten, qd, passforge_ops = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.passforge
LINEARS = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head (left in float by quantize's default skip)
STATIC = "quantize(scheme=w8a8-static,calib_windows=4),fold-quant"


def _run(gm, spec, inputs):
    calib_tokens = torch.randint(0, 256, (16 * 64,), generator=torch.Generator().manual_seed(2))
    ctx = Context(example_inputs=inputs, calib_tokens=calib_tokens)
    return PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx)


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


@pytest.fixture
def uncached_timings():
    """The speed guard caches timings per process: clear them around a test that fakes the clock."""
    lower._timings.cache_clear()
    yield
    lower._timings.cache_clear()


class _SharedInput(torch.nn.Module):
    """Token ids → an embedding read by two linears (one activation Q/DQ pair for both; one bias passed by
    keyword), then a third linear on their combination."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 64)
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64, bias=False)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, T, 64)
        y = aten.linear.default(x, self.a.weight, bias=self.a.bias)
        return self.c(torch.relu(y) + self.b(x))


def test_static_lowers_to_the_int8_static_kernel_and_survives_save(llama_graph, tokens, tmp_path, static_cpu_path):
    """Structure; numerics against the graph before (the kernel computes the same int8 activations with the same
    fp32 ops, then sums exactly in int32: only the fp32 dequantized GEMM's rounding differs, about 1e-7 of the
    logits' scale (measured 3e-7); bound 1e-5); save/load; a second run changes nothing."""
    folded = _run(llama_graph, STATIC, (tokens,)).graph
    before = folded(tokens)
    result = _run(folded, "lower-quant(guard=false)", (tokens,))
    gm, record = result.graph, result.records[0]
    assert record.stats == {"lowered": LINEARS - 1, "kept": 0, "float": 0}
    assert count_calls(gm, passforge_ops.int8_static_linear.default) == LINEARS - 1
    for gone in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default):
        assert count_calls(gm, gone) == 0
    assert count_calls(gm, aten.linear.default) == 1  # the float lm_head
    kernels = _nodes(gm, passforge_ops.int8_static_linear.default)
    constants = {tuple(n.args[1:3]) for n in _nodes(folded, qd.quantize_per_tensor.default)}
    assert {tuple(n.args[1:3]) for n in kernels} == constants  # the calibrated (scale, zero point), unchanged
    assert {n.meta[KERNEL_META]["backend"] for n in kernels} == {static_cpu_path}  # oneDNN's u8 linear, or _int_mm
    out = gm(tokens)
    torch.testing.assert_close(out, before, rtol=0, atol=1e-5 * before.abs().max().item())

    again = _run(gm, "lower-quant(guard=false)", (tokens,)).records[0]
    assert again.modified is False and again.stats == {"lowered": 0, "kept": 0, "float": 0}
    save_graph(gm, tmp_path / "static.pt2", (tokens,))  # re-exported: the op's fake impl carries it
    torch.testing.assert_close(load_graph(tmp_path / "static.pt2")(tokens), out, rtol=0, atol=0)


def test_static_lowering_of_a_small_graph_quantizes_x_in_each_kernel():
    """Golden op list: no Q/DQ pair is left (each kernel quantizes its x itself); the two readers of one pair get
    its constants; biases (by keyword or by position) survive."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    folded = _run(capture(_SharedInput(), (ids,)), "quantize(scheme=w8a8-static,skip='',calib_windows=4),fold-quant",
                  (ids,)).graph
    assert count_calls(folded, qd.quantize_per_tensor.default) == 2  # embedding (read by a, b), relu(y) + b(x)
    gm = _run(folded, "lower-quant(guard=false)", (ids,)).graph
    assert op_counts(gm) == {"passforge.int8_static_linear.default": 3, "aten.embedding.default": 1,
                             "aten.relu.default": 1, "aten.add.Tensor": 1}
    kernels = _nodes(gm, passforge_ops.int8_static_linear.default)
    embedding = next(iter(_nodes(gm, aten.embedding.default)))
    readers = [n for n in kernels if n.args[0] is embedding]
    assert len(readers) == 2 and readers[0].args[1:3] == readers[1].args[1:3]
    assert [n.args[5] is not None for n in kernels] == [True, False, True]  # a (keyword bias), b, c
    torch.testing.assert_close(gm(ids), folded(ids), rtol=0, atol=1e-5 * folded(ids).abs().max().item())


def test_static_bf16_lowering_stays_within_the_pass_bound(llama_graph, tokens):
    """bf16: the graph rounds every dequantized activation and weight to bf16 and sums in a bf16 GEMM, the kernel
    does neither; an upstream last-bit change can also flip an activation's rounding. The pass's bound (2% + 4
    units of bf16 of the logits' scale, checked by VerifyHook) holds with room (measured 1.5%)."""
    folded = _run(llama_graph, f"cast(dtype=bf16),{STATIC}", (tokens,)).graph
    before = folded(tokens).float()
    gm = _run(folded, "lower-quant(guard=false)", (tokens,)).graph
    assert count_calls(gm, passforge_ops.int8_static_linear.default) == LINEARS - 1
    torch.testing.assert_close(gm(tokens).float(), before, rtol=0, atol=0.03 * before.abs().max().item())


def _break_first_activation_pair(gm, how: str) -> int:
    """Change the first activation Q/DQ pair (layer 0's attention norm, read by q, k and v); returns its readers."""
    dq = next(iter(_nodes(gm, qd.dequantize_per_tensor.default)))
    if how == "other qparams":  # dequantized with another scale than the one it was quantized with
        dq.update_arg(1, dq.args[1] * 2)
    else:  # a narrower range in both: still int8, but not the -128..127 the kernel's quantizer clamps to
        dq.update_arg(3, -127)
        dq.args[0].update_arg(3, -127)
    gm.recompile()
    return len(dq.users)


@pytest.mark.parametrize("how", ["other qparams", "narrow range"])
def test_near_miss_activation_pairs_keep_their_fake_quant(llama_graph, tokens, how):
    """A pair the kernel would not reproduce is not lowered to it; its linears still get the weight-only kernel
    (their weights are plain symmetric int8), and the pair stays in the graph."""
    folded = _run(llama_graph, STATIC, (tokens,)).graph
    readers = _break_first_activation_pair(folded, how)
    assert readers == 3
    result = _run(folded, "lower-quant(guard=false)", (tokens,))
    gm = result.graph
    assert result.records[0].stats == {"lowered": LINEARS - 1, "kept": 0, "float": 0}
    assert count_calls(gm, passforge_ops.int8_static_linear.default) == LINEARS - 1 - readers
    assert count_calls(gm, passforge_ops.int8_weight_linear.default) == readers
    assert count_calls(gm, qd.quantize_per_tensor.default) == count_calls(gm, qd.dequantize_per_tensor.default) == 1
    assert _run(gm, "lower-quant(guard=false)", (tokens,)).records[0].modified is False


def test_speed_guard_times_the_static_kernel_per_shape(llama_graph, tokens):
    folded = _run(llama_graph, STATIC, (tokens,)).graph
    result = _run(folded, "lower-quant", (tokens,))
    record, gm = result.records[0], result.graph
    stats = record.stats
    assert stats["lowered"] + stats["kept"] == LINEARS - 1 and stats["float"] == 0
    assert count_calls(gm, passforge_ops.int8_static_linear.default) == stats["lowered"]
    decisions = [n.meta[KERNEL_META] for n in gm.graph.nodes if KERNEL_META in n.meta]
    assert len(decisions) == LINEARS - 1
    for decision in decisions:  # which form wins is the machine's business; the record must say why
        assert set(decision["timings_ms"]) == {"int8_static_linear", "dequantize+linear"}
        assert decision["kernel"] == min(decision["timings_ms"], key=decision["timings_ms"].get)
    # one note per (x, weight, readers of x's Q/DQ): q and o share shapes but not readers
    assert len(record.notes) == 5
    assert sum("x read by 3" in note for note in record.notes) == 2  # q; k and v
    implementation = "onednn.qlinear_pointwise" if onednn_int8_exact() else "aten._int_mm"
    assert all(f"int8_static_linear [{implementation}]" in note for note in record.notes)


def test_as_is_pays_a_share_of_the_activation_fake_quant(llama_graph, tokens, monkeypatch, uncached_timings):
    """The graph quantizes x once for all its readers, each lowered linear quantizes x itself: "as is" is
    charged 1/readers of the Q/DQ. With the kernel at 1.0 ms, the linear at 0.2 ms and the Q/DQ at 1.5 ms
    (faked clock), keeping the graph wins where 3 (q, k, v) or 2 (gate, up) linears share x, and the kernel
    wins for o and down (1.7 ms as is)."""
    monkeypatch.setattr(lower, "interleaved_latency_ms", lambda fns, **kw: [1.0, 0.2, 1.5][:len(fns)])
    folded = _run(llama_graph, STATIC, (tokens,)).graph
    result = _run(folded, "lower-quant", (tokens,))
    assert result.records[0].stats == {"lowered": 4, "kept": 10, "float": 0}
    as_is = sorted({n.meta[KERNEL_META]["timings_ms"]["dequantize+linear"]
                    for n in result.graph.graph.nodes if KERNEL_META in n.meta})
    assert as_is == pytest.approx([0.2 + 1.5 / 3, 0.2 + 1.5 / 2, 0.2 + 1.5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels are candidates on CUDA")
def test_triton_static_kernel_is_the_candidate_on_cuda(small_llama, tokens):
    from passforge.ir.graph import to_device

    device = torch.device("cuda")
    gm = to_device(capture(small_llama, (tokens,)), device)
    calib_tokens = torch.randint(0, 256, (16 * 64,), generator=torch.Generator().manual_seed(2))
    ctx = Context(example_inputs=(tokens.to(device),), calib_tokens=calib_tokens, device=device)
    result = PassManager.parse(f"cast(dtype=bf16),{STATIC},lower-quant", hooks=[VerifyHook()]).run(gm, ctx)
    decisions = [n.meta[KERNEL_META] for n in result.graph.graph.nodes if KERNEL_META in n.meta]
    assert len(decisions) == LINEARS - 1 and {d["backend"] for d in decisions} == {"triton"}
    assert all("int8_static_linear [triton]" in note for note in result.records[-1].notes)
