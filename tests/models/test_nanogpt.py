import pytest
import torch

from passforge.models.nanogpt import PRESETS, GPTConfig, build


def test_forward_shape_and_bias_buffer_not_persisted():
    model = build("tiny").eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(idx).shape == (2, 16, 256)
    assert "h.0.attn.bias" not in model.state_dict()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, PRESETS["tiny"].block_size + 1, dtype=torch.long))


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="tiny"):
        build("nope")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=10, n_head=4)


def test_attention_is_causal():
    model = build("tiny").eval()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])


def test_export_keeps_explicit_attention_pattern():
    model = build("tiny").eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (idx,), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("masked_fill" in t for t in targets)
    assert any("softmax" in t for t in targets)
    assert not any("scaled_dot_product" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(idx), model(idx))
