from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import CaptureError, capture
from passforge.ir.graph import PASS_META, op_counts, param_stats


def test_captured_graph_is_aten_with_meta_and_get_attr_params(small_llama, tokens, llama_graph):
    gm = llama_graph
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node.name
            assert node.meta[PASS_META] == "capture"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1  # parameters are get_attr nodes, not inputs
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "layers.0.attention.q_proj.weight" in attrs
    assert op_counts(gm)["aten.linear.default"] == 2 * 7 + 1  # q,k,v,o + gate,up,down per layer + lm_head
    stored = [*small_llama.parameters(), *small_llama.buffers()]  # RoPE tables are buffers the graph reads
    assert param_stats(gm)[0] == sum(t.numel() for t in stored)
    torch.testing.assert_close(gm(tokens), small_llama(tokens), rtol=0, atol=0)


def test_capture_shares_tensors_and_leaves_the_model_unchanged(small_llama, tokens):
    before = {k: v.clone() for k, v in small_llama.state_dict().items()}
    small_llama.train()
    gm = capture(small_llama, (tokens,))
    assert small_llama.training  # mode restored
    assert gm.get_parameter("layers.0.attention.q_proj.weight") is small_llama.layers[0].attention.q_proj.weight
    for key, value in small_llama.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_bundled_lm_captures():
    bundled = pytest.importorskip("passforge.models.bundled")
    try:
        model = bundled.load_tiny_lm()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tokens = torch.randint(0, 256, (1, 32))
    gm = capture(model, (tokens,))
    torch.testing.assert_close(gm(tokens), model(tokens), rtol=0, atol=0)


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a value: torch.export cannot trace this
            return x * 2
        return x


def test_data_dependent_control_flow_gets_an_actionable_error():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "data-dependent control flow" in message
    assert "test_capture.py" in message and "x.sum() > 0" in message  # where, in the user's code
    assert "torch.where" in message  # what to try


def test_wrong_example_inputs_name_the_problem(small_llama):
    with pytest.raises(CaptureError) as info:
        capture(small_llama, (torch.randn(1, 16),))  # float tokens: embedding needs int64 ids
    assert "capture of Llama failed" in str(info.value)
    assert "try:" in str(info.value)


def test_non_module_is_rejected():
    with pytest.raises(CaptureError, match=r"expected a torch\.nn\.Module"):
        capture(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


def test_dynamic_sequence_length(small_llama):
    tokens = torch.randint(0, 256, (1, 16))
    gm = capture(small_llama, (tokens,), dynamic_shapes=({1: torch.export.Dim("T", min=2, max=64)},))
    longer = torch.randint(0, 256, (1, 40))
    torch.testing.assert_close(gm(longer), small_llama(longer), rtol=1e-5, atol=1e-5)


class _StepCounter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step.add_(1)  # state written in place: folding or re-running the graph would be wrong
        return x + self.step


def test_in_place_state_updates_are_refused_and_the_model_is_untouched():
    model = _StepCounter()
    with pytest.raises(CaptureError, match=r"(?s)writes into step in place.*return the new state"):
        capture(model, (torch.randn(3),))
    assert model.step.item() == 0
