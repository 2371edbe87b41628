import pytest
import torch

from passforge.models.llama import (
    PRESETS,
    DecodeStep,
    Llama,
    LlamaConfig,
    PrefillStep,
    RMSNorm,
    build,
    example_decode_inputs,
    example_prefill_inputs,
)

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return build("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def test_config_validation_and_head_dim():
    assert PRESETS["tiny"].head_dim == 32
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8, max_seq_len=8)


def test_tiny_param_count(model):
    assert 2.4e6 < model.num_params() < 2.6e6


@pytest.mark.parametrize(("preset", "lo", "hi"), [("llama-100m", 95e6, 105e6), ("llama-7b", 6.6e9, 6.8e9)])
def test_large_presets_on_meta_device(preset, lo, hi):
    with torch.device("meta"):
        m = Llama(PRESETS[preset])
    assert lo < m.num_params() < hi
    assert all(p.is_meta for p in m.parameters())
    assert build(preset, device="meta", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_build_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="llama-7b"):
        build("nope")


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build("tiny", seed=0), build("tiny", seed=0), build("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_rope_buffers_are_not_persisted(model):
    assert not any("rope" in k for k in model.state_dict())


def test_rmsnorm_keeps_input_dtype():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert RMSNorm(16).to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_forward_shape_and_length_check(model, tokens):
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 24, 256) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_prefill_matches_forward_and_pads_cache(model, tokens):
    cfg = model.config
    with torch.no_grad():
        logits, k, v = model.prefill(tokens)
        torch.testing.assert_close(logits, model(tokens), **TOL)
    shape = (cfg.n_layers, 2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    assert k.shape == v.shape == shape
    assert k[:, :, :, 24:].abs().sum() == 0 and v[:, :, :, 24:].abs().sum() == 0
    assert k[:, :, :, :24].abs().sum() > 0


@pytest.mark.parametrize("prompt_len", [0, 5])
def test_decode_matches_forward_on_growing_sequence(model, tokens, prompt_len):
    with torch.no_grad():
        if prompt_len:
            _, k, v = model.prefill(tokens[:, :prompt_len])
        else:
            k, v = model.new_kv_cache(batch=2)
        for t in range(prompt_len, tokens.shape[1]):
            step_logits, k, v = model.decode(tokens[:, t : t + 1], torch.tensor([t]), k, v)
            ref = model(tokens[:, : t + 1])[:, -1:]
            torch.testing.assert_close(step_logits, ref, **TOL)


def test_decode_does_not_mutate_inputs(model):
    token, pos, k, v = example_decode_inputs(model, batch=1)
    k_before, v_before = k.clone(), v.clone()
    with torch.no_grad():
        _, k2, v2 = model.decode(token, pos, k, v)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    assert k2[:, :, :, 0].abs().sum() > 0 and v2[:, :, :, 0].abs().sum() > 0


def _export(module, args, **kw):
    return torch.export.export(module, args, strict=False, **kw)


def test_export_forward(model):
    args = example_prefill_inputs(model.config, batch=2, seq=16)
    ep = _export(model, args)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), model(*args), **TOL)


def test_export_prefill_with_dynamic_seq_len(model):
    args = example_prefill_inputs(model.config, batch=1, seq=16)
    T = torch.export.Dim("T", min=2, max=model.config.max_seq_len)
    ep = _export(PrefillStep(model), args, dynamic_shapes={"tokens": {1: T}})
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for got, want in zip(ep.module()(tokens), model.prefill(tokens), strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_export_decode_is_functional(model):
    args = example_decode_inputs(model, batch=1)
    ep = _export(DecodeStep(model), args)
    assert not ep.graph_signature.user_inputs_to_mutate
    assert not ep.graph_signature.buffers_to_mutate
    token = torch.tensor([[7]])
    with torch.no_grad():
        _, k, v = model.prefill(torch.tensor([[1, 2, 3]]))
        inputs = (token, torch.tensor([3]), k, v)
        for got, want in zip(ep.module()(*inputs), model.decode(*inputs), strict=True):
            torch.testing.assert_close(got, want, **TOL)
