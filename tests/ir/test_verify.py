from __future__ import annotations

import pytest
import torch

from passforge.ir.graph import get_attr, set_tensor_attr
from passforge.ir.verify import (
    VerificationError,
    check_lossy_outputs,
    check_meta,
    check_outputs_close,
    check_quant_params,
    first_divergence,
    lint,
)
from passforge.passes.base import Context
from passforge.passes.manager import PassManager


def test_clean_graph_verifies(llama_graph):
    lint(llama_graph)
    check_meta(llama_graph)


def test_wrong_meta_val_is_caught(llama_graph):
    node = next(n for n in llama_graph.graph.nodes if n.target is torch.ops.aten.linear.default)
    val = node.meta["val"]
    node.meta["val"] = val.new_empty([*val.shape[:-1], val.shape[-1] + 1])  # claims one column too many
    with pytest.raises(VerificationError, match=f"node '{node.name}'.*claims"):
        check_meta(llama_graph)


def test_wrong_meta_dtype_is_caught(llama_graph):
    node = next(n for n in llama_graph.graph.nodes if n.target is torch.ops.aten.linear.default)
    node.meta["val"] = node.meta["val"].to(torch.float16)
    with pytest.raises(VerificationError, match="f16"):
        check_meta(llama_graph)


def test_missing_attribute_fails_lint(llama_graph):
    node = next(n for n in llama_graph.graph.nodes if n.op == "get_attr")
    node.target = "no.such.weight"
    with pytest.raises(VerificationError, match=r"no\.such\.weight"):
        lint(llama_graph)


def test_output_comparison():
    a = [torch.ones(3)]
    check_outputs_close(a, [torch.ones(3) + 1e-7], rtol=1e-5, atol=1e-5)
    with pytest.raises(VerificationError, match="output 0 changed"):
        check_outputs_close(a, [torch.ones(3) * 1.1], rtol=1e-5, atol=1e-5)
    with pytest.raises(VerificationError, match="returns 2 outputs"):
        check_outputs_close(a, a + a, rtol=1e-5, atol=1e-5)


def test_lossy_outputs_guard():
    check = check_lossy_outputs
    check([torch.tensor([1.0, float("nan")])], [torch.tensor([1.05, float("nan")])], max_rel_err=0.1)  # NaN before
    with pytest.raises(VerificationError, match="1 new NaN/Inf"):
        check([torch.ones(2)], [torch.tensor([1.0, float("inf")])], max_rel_err=None)
    with pytest.raises(VerificationError, match=r"moved by 50\.0% of its scale; the pass allows at most 10%"):
        check([torch.tensor([2.0, -1.0])], [torch.tensor([1.0, -1.0])], max_rel_err=0.1)
    with pytest.raises(VerificationError, match="passes keep the interface"):
        check([torch.ones(2)], [torch.ones(2, dtype=torch.bfloat16)], max_rel_err=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_unusable_scales_are_named_with_their_layer(llama_graph, tokens, bad):
    quantized = PassManager.parse("quantize(scheme=w8)").run(llama_graph, Context(example_inputs=(tokens,))).graph
    check_quant_params(quantized)  # as quantize made them: usable (a zero row gets scale 1, not 0)
    scale = "layers_1_feed_forward_down_proj_weight_scale"
    broken = get_attr(quantized, scale).clone()
    broken[3] = bad
    set_tensor_attr(quantized, scale, broken)
    layer = r"\(layer 'layers.1.feed_forward.down_proj'\)"
    with pytest.raises(VerificationError, match=r"1 of \d+ values NaN, Inf or <= 0 " + layer):
        check_quant_params(quantized)


def test_first_divergence_names_the_layer_that_went_wrong(llama_graph, tokens):
    """Layer 1's down_proj weight scaled 1000x: every later value moves too, but the first computed value that
    moved is that projection's (weights themselves are not compared: smoothing rescales them)."""
    after = PassManager([]).run(llama_graph).graph
    weight = "layers.1.feed_forward.down_proj.weight"
    set_tensor_attr(after, weight, get_attr(after, weight) * 1000)
    where = first_divergence(llama_graph, after, (tokens,), bound=0.5)
    assert where is not None and "layer 'layers.1.feed_forward.down_proj'" in where, where
    assert "aten.linear" in where and "\n" not in where  # one line: no interpreter traceback in an error message
    assert first_divergence(llama_graph, llama_graph, (tokens,), bound=0.0) is None  # nothing moved
