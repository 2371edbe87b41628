"""Straight-through gradients: the forward is the fake-quantized one, gradients reach the float weights."""

from __future__ import annotations

import warnings

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops
from passforge.ir.graph import count_calls
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.passes.quantize.ste import straight_through

aten = torch.ops.aten
LINEARS = 2 * 7 + 1


def _trainable_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Parameters as fresh leaf tensors that want gradients (never the captured, shared ones)."""
    for name, p in list(gm.named_parameters()):
        owner = gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm
        setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(p.detach().clone(), requires_grad=True))
    return gm


@pytest.mark.parametrize("scheme", ["w8", "w4", "w8a8", "fp8"])
def test_straight_through_keeps_the_forward_and_passes_gradients(llama_graph, tokens, scheme):
    """Forward: x + (dq - x) rounds once more than dq (≤ 1 ulp of x's magnitude per value), so the logits
    agree to float rounding (1e-5 relative). Backward: every quantized weight gets a finite, non-zero
    gradient, where the plain fake-quant graph gives none."""
    spec = f"quantize(scheme={scheme},group_size=32)"
    quantized = PassManager.parse(spec).run(llama_graph, Context(example_inputs=(tokens,))).graph
    trainable = _trainable_copy(straight_through(quantized))
    dequantizes = LINEARS - 1 if scheme in ("w8", "w4") else 2 * (LINEARS - 1)  # w8a8, fp8: activations too
    assert count_calls(trainable, aten.detach.default) == dequantizes
    assert count_calls(trainable, aten.sub.Tensor) - count_calls(quantized, aten.sub.Tensor) == dequantizes
    torch.testing.assert_close(trainable(tokens), quantized(tokens), rtol=1e-5, atol=1e-5)
    trainable(tokens).float().logsumexp(-1).mean().backward()
    grad = trainable.get_parameter("layers.0.attention.q_proj.weight").grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    plain = _trainable_copy(quantized)
    with warnings.catch_warnings():  # torch warns that its Q/DQ ops have no autograd kernel: the point here
        warnings.simplefilter("ignore", UserWarning)
        loss = plain(tokens).float().logsumexp(-1).mean()
        if scheme == "fp8":  # passforge's fp8 ops have no autograd formula at all: backward refuses
            with pytest.raises(RuntimeError, match="no autograd"):
                loss.backward()
        else:
            loss.backward()
    assert plain.get_parameter("layers.0.attention.q_proj.weight").grad is None


def test_the_inference_graph_is_not_changed(llama_graph, tokens):
    quantized = PassManager.parse("quantize").run(llama_graph, Context(example_inputs=(tokens,))).graph
    before = str(quantized.graph)
    straight_through(quantized)
    assert str(quantized.graph) == before
    assert straight_through(llama_graph).meta["passforge.straight_through"] == 0  # nothing to rewrite
