"""capture_hf on tiny random Hugging Face checkpoints: the graph is faithful to eager, before and after cleanup.

Each architecture is saved to a local safetensors folder and loaded back through passforge's own loader, so the
test exercises the same path a user's checkpoint takes (never the hub, never pickled weights).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import fx

from passforge.ir.capture import CaptureError
from passforge.ir.graph import count_calls
from passforge.models.hf import capture_hf
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from tests.conftest import Tripwire

transformers = pytest.importorskip("transformers")

# Both graphs run the same ATen kernels on the same weights, so fp32 results agree far inside this.
TOL = {"rtol": 1e-5, "atol": 1e-5}
SEQ_LEN = 16
SDPA = torch.ops.aten.scaled_dot_product_attention.default

_SHARED = {"vocab_size": 256, "bos_token_id": 0, "eos_token_id": 0}
_LLAMA_LIKE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    **_SHARED,
}
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, _LLAMA_LIKE),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, _LLAMA_LIKE),
    # GPT-2 has no grouped-query attention, so no kv-head count; dropout defaults to 0.1 (eval mode matters).
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 128, **_SHARED},
    ),
}
ATTN = ("eager", "sdpa")

def save_tiny(folder: Path, arch: str) -> Path:
    """Save a seeded random ``arch`` checkpoint (safetensors) the way a user's folder would look."""
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model_cls(config_cls(**kwargs)).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=[(a, i) for a in ARCHS for i in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def captured(request, tmp_path_factory) -> tuple[str, str, fx.GraphModule, torch.nn.Module, tuple[torch.Tensor]]:
    """One capture per (architecture, attention) shared by the tests below: capture dominates the runtime."""
    arch, attn = request.param
    folder = save_tiny(tmp_path_factory.mktemp(f"{arch}-{attn}"), arch)
    gm, eager, example = capture_hf(folder, seq_len=SEQ_LEN, attn_implementation=attn)
    return arch, attn, gm, eager, example


def _eager_logits(eager: torch.nn.Module, example: tuple[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return eager(*example)


def test_graph_shape(captured):
    arch, attn, gm, _, example = captured
    nodes = list(gm.graph.nodes)
    assert all("val" in node.meta for node in nodes if node.op != "output")
    # Parameters are get_attr nodes, never extra placeholders: the only input is input_ids.
    assert [node.meta["val"].shape for node in nodes if node.op == "placeholder"] == [example[0].shape]
    read = {node.target for node in nodes if node.op == "get_attr"}
    params = {name for name, _ in gm.named_parameters()}
    assert params and params <= read
    # The folder's attention implementation is what got captured.
    has_sdpa = any(node.target is SDPA for node in nodes)
    assert has_sdpa == (attn == "sdpa"), f"{arch}: attn_implementation={attn} but SDPA in graph is {has_sdpa}"


def test_reference_is_in_eval_mode(captured):
    _, _, _, eager, _ = captured
    assert not any(module.training for module in eager.modules())


def test_graph_matches_eager(captured):
    _, _, gm, eager, example = captured
    with torch.inference_mode():
        actual = gm(*example)
    torch.testing.assert_close(actual, _eager_logits(eager, example), **TOL)


def test_cleanup_keeps_outputs(captured):
    _, _, gm, eager, example = captured
    result = PassManager.parse("cleanup", hooks=[VerifyHook()]).run(gm, Context(example_inputs=example))
    assert [record.status for record in result.records] == ["ok"]
    with torch.inference_mode():
        actual = result.graph(*example)
    torch.testing.assert_close(actual, _eager_logits(eager, example), **TOL)


def test_fuse_attention_matches_every_layer(captured):
    """HF's eager (explicit matmul/softmax with an arange-built additive mask) and SDPA attention, GQA through
    repeat_kv: every layer becomes one passforge::attention call with the constant mask read as causal."""
    arch, _, gm, eager, example = captured
    result = PassManager.parse("fuse-attention", hooks=[VerifyHook()]).run(gm, Context(example_inputs=example))
    graph, record = result.graph, result.records[-1]
    layers = ARCHS[arch][2].get("num_hidden_layers", ARCHS[arch][2].get("n_layer"))
    assert record.stats["fused"] == layers and record.stats["tag:mask→causal"] == layers
    assert count_calls(graph, torch.ops.passforge.attention.default) == layers
    assert count_calls(graph, SDPA) == count_calls(graph, torch.ops.aten.softmax.int) == 0
    with torch.inference_mode():
        actual = graph(*example)
    torch.testing.assert_close(actual, _eager_logits(eager, example), **TOL)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(CaptureError, match=r"config\.json"):
        capture_hf(tmp_path)


def test_pickled_bin_weights_are_refused_unread(tmp_path):
    # config.json must exist, otherwise the missing config is reported before the weights are looked at.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Tripwire(marker)))
    with pytest.raises(CaptureError, match="safetensors"):
        capture_hf(tmp_path)
    assert not marker.exists()
