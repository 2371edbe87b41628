"""Hugging Face folders end to end: ``optimize(folder)`` → logits and greedy tokens against the Hugging Face eager
model → save → load.

Each architecture is a tiny random checkpoint saved with ``save_pretrained(safe_serialization=True)``, so the test
takes the path a user's folder takes. A lossless pipeline must reproduce HF's logits (fp32, same ATen kernels) and
``model.generate(do_sample=False)``'s tokens through passforge's own prefill/decode graphs (``models.hf_kv``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import passforge
from passforge.ir.capture import CaptureError
from passforge.ir.graph import count_calls, example_inputs_of
from passforge.models.hf import model_kind
from passforge.passes.attention import decode_step_mask
from passforge.passes.base import BF16_ULP, Context
from passforge.passes.manager import PassManager
from passforge.runtime.executor import InputError
from passforge.runtime.kv_cache import donate_kv_cache, ring_kv_cache
from passforge.tools.cli import EXIT_FAILURE, EXIT_OK, main

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32, the same kernels on the same weights
SEQ_LEN, PROMPT_LEN, NEW_TOKENS, MAX_POS = 16, 8, 8, 64
ATTENTION = torch.ops.passforge.attention.default

# No eos: HF's generate would stop at it, passforge's always makes max_new_tokens.
_SHARED = {"vocab_size": 256, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
_LLAMA_LIKE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": MAX_POS, **_SHARED,
}
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),  # q/k/v projections with bias
    # a window shorter than prompt + new tokens, so both the forward graph and the decode steps must apply it
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_LLAMA_LIKE, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "partial_rotary_factor": 0.5}),  # fused qkv, half RoPE
    # learned positions, no GQA, Conv1D projections; a wider init than 0.02 so greedy tokens are not one repeated id
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": MAX_POS,
              "initializer_range": 0.2, **_SHARED}),
}


def save_tiny(folder: Path, arch: str) -> torch.nn.Module:
    """Save a seeded random ``arch`` checkpoint (safetensors); return the eager model (eval) as the reference."""
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the 256 ids (built offline with ``tokenizers``), as a folder would ship one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "def", "main", "(", ")", *(f"w{i}" for i in range(5, 256))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module", params=list(ARCHS))
def optimized(request, tmp_path_factory) -> tuple[str, torch.nn.Module, passforge.Optimized]:
    """One optimize per architecture ("cleanup": lossless, verified), shared by the tests below."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    eager = save_tiny(folder, arch)
    if arch == "llama":
        save_word_tokenizer(folder)
    return arch, eager, passforge.optimize(folder, pipeline="cleanup", seq_len=SEQ_LEN, profile=False)


def _hf_greedy(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                              do_sample=False)


def test_logits_match_eager(optimized):
    _, eager, opt = optimized
    tokens = opt.example_inputs[0]
    assert tokens.shape == (1, SEQ_LEN)
    with torch.inference_mode():
        expected = eager(input_ids=tokens).logits
    torch.testing.assert_close(opt(tokens), expected, **TOL)


def test_greedy_generate_matches_hf_generate(optimized):
    arch, eager, opt = optimized
    prompt = opt.example_inputs[0][:, :PROMPT_LEN]
    tokens, stats = opt.generate(prompt, NEW_TOKENS)
    expected = _hf_greedy(eager, prompt)
    assert stats.new_tokens == NEW_TOKENS
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert len(set(tokens[0, PROMPT_LEN:].tolist())) > 1, f"{arch}: a degenerate continuation proves little"


def test_compiled_decode_step_matches_hf_generate(optimized):
    """The decode step compiled by inductor (``generate(compiled_decode=True)``) on every architecture: the
    per-layer cache inputs also cover mistral's ring cache and GPT-2's learned positions; fp32, so greedy
    tokens equal HF's (no fallback warning: the step really compiled)."""
    _, eager, opt = optimized
    prompt = opt.example_inputs[0][:, :PROMPT_LEN]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="generate.compiled_decode=True.")
        tokens, _ = opt.generate(prompt, NEW_TOKENS, compiled_decode=True)
    torch.testing.assert_close(tokens, _hf_greedy(eager, prompt), rtol=0, atol=0)


def test_generation_graphs_follow_passforges_convention(optimized):
    """Prefill and decode take and return what passforge's LLaMA steps do, so the runtime's in-place cache
    (donate_kv_cache) applies; the report lists the pipeline's status on both."""
    arch, eager, opt = optimized
    layers = eager.config.num_hidden_layers
    prefill_in, decode_in = example_inputs_of(opt.prefill), example_inputs_of(opt.decode)
    assert [t.shape for t in prefill_in] == [(1, MAX_POS)]
    token, pos, k_cache, v_cache = decode_in
    assert token.shape == (1, 1) and pos.shape == (1,) and k_cache.shape == v_cache.shape
    assert k_cache.shape[0] == layers and k_cache.shape[3] == MAX_POS == opt.max_seq_len
    assert donate_kv_cache(opt.decode)[1] is None
    assert [r["status"] for graph in opt.report["generation"].values() for r in graph] == ["ok", "ok"]
    if arch == "gpt2":  # Conv1D became nn.Linear, so passes that read aten.linear see GPT-2's projections
        assert count_calls(opt.graph, torch.ops.aten.addmm.default) == 0
        assert count_calls(opt.graph, torch.ops.aten.linear.default) == 4 * layers + 1


def test_lossy_pipeline_on_llama_within_bf16_bound(tmp_path):
    """cleanup, fuse-attention, cast(bf16) on all three graphs. Bound: bf16 keeps 8 significant bits (relative
    step 2**-7); the two layers round weights and activations a dozen times on the way to the logits, so the
    logits may move by 4 steps of their own scale (measured: about 1 step). Attention is one passforge op in every
    graph, and the decode mask keeps the spelling local-attention windows and the ring cache bounds."""
    eager = save_tiny(tmp_path, "llama")
    opt = passforge.optimize(tmp_path, pipeline="cleanup,fuse-attention,cast(dtype=bf16)", seq_len=SEQ_LEN,
                             profile=False)
    tokens = opt.example_inputs[0]
    with torch.inference_mode():
        expected = eager(input_ids=tokens).logits
    bound = 4 * BF16_ULP * float(expected.abs().max())
    assert float((opt(tokens) - expected).abs().max()) <= bound
    layers = eager.config.num_hidden_layers
    assert [count_calls(g, ATTENTION) for g in (opt.graph, opt.prefill, opt.decode)] == [layers] * 3
    assert donate_kv_cache(opt.decode)[1] is None
    # local-attention windows this decode step and the runtime bounds its cache to a ring of sinks + window slots:
    # the same window as the prefill's, not a full-cache decode after a windowed prefill
    windowed = PassManager.parse("local-attention(window=4,sinks=1)").run(opt.decode, Context(role="decode")).graph
    assert [decode_step_mask(n) is not None for n in windowed.graph.nodes if n.target is ATTENTION] == [True] * layers
    _, ring, reason = ring_kv_cache(windowed)
    assert reason is None and ring.slots == 5
    # the prefill and one decode step against HF's logits at the same positions
    padded = torch.zeros(1, MAX_POS, dtype=torch.long)
    padded[:, :PROMPT_LEN] = tokens[:, :PROMPT_LEN]
    logits, k_cache, v_cache = opt.prefill(padded)
    assert float((logits[:, :PROMPT_LEN] - expected[:, :PROMPT_LEN]).abs().max()) <= bound
    step, _, _ = opt.decode(tokens[:, PROMPT_LEN:PROMPT_LEN + 1], torch.tensor([PROMPT_LEN]), k_cache, v_cache)
    assert float((step[:, 0] - expected[:, PROMPT_LEN]).abs().max()) <= bound


@pytest.mark.parametrize("optimized", ["llama"], indirect=True)  # one architecture is enough for the format
def test_save_load_keeps_outputs_and_tokenizer(optimized, tmp_path):
    _, _, opt = optimized
    tokens = opt.example_inputs[0]
    prompt = tokens[:, :PROMPT_LEN]
    out = opt.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.pt2", "prefill.pt2", "decode.pt2", "manifest.json",
                                              "report.json", "tokenizer"}
    assert json.loads((out / "manifest.json").read_text())["tokenizer"] == "tokenizer"
    again = passforge.load(out)
    torch.testing.assert_close(again(tokens), opt(tokens), rtol=0, atol=0)
    torch.testing.assert_close(again.generate(prompt, NEW_TOKENS)[0], opt.generate(prompt, NEW_TOKENS)[0],
                               rtol=0, atol=0)
    text, _ = opt.generate("def main ( w7 )", 4)
    assert text.startswith("def main ( w7 )") and len(text.split()) == 5 + 4
    assert again.generate("def main ( w7 )", 4)[0] == text


@pytest.mark.parametrize("optimized", ["qwen2"], indirect=True)  # saved without a tokenizer
def test_folder_without_tokenizer_generates_ids_only(optimized):
    _, _, opt = optimized
    assert not opt.has_tokenizer
    with pytest.raises(InputError, match="no tokenizer"):
        opt.generate("def main(", 4)


def test_encoder_through_the_cli(tmp_path, capsys):
    """A BERT folder: input_ids → last_hidden_state, compared by max error and cosine (no KL, no perplexity), no
    generation graphs; the written folder loads back to the same outputs."""
    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=MAX_POS)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    bert.save_pretrained(tmp_path / "bert", safe_serialization=True)
    assert model_kind(tmp_path / "bert") == "encoder"
    out = tmp_path / "out"
    argv = ["optimize", str(tmp_path / "bert"), "--pipeline", "cleanup,cast(dtype=bf16)", "--seq-len", "12",
            "--out", str(out)]
    assert main(argv) == EXIT_OK
    assert "cos" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "generation" not in report and report["baseline"]["cos"] == 1.0
    cast = report["passes"][-1]
    assert cast["kl"] is None and cast["ppl"] is None
    assert 0.999 < cast["cos"] < 1.0 and cast["max_abs_err"] > 0
    again = passforge.load(out)
    assert again.prefill is None
    ids = again.example_inputs[0]
    assert ids.shape == (1, 12)
    with torch.inference_mode():
        expected = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(again(ids), expected, rtol=0, atol=4 * BF16_ULP * float(expected.abs().max()))


def test_pickled_bin_folder_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CaptureError, match=r"no \*\.safetensors weights.*save_pretrained"):
        passforge.optimize(tmp_path)
    assert main(["optimize", str(tmp_path), "--out", str(tmp_path / "out")]) == EXIT_FAILURE
    assert "does not unpickle .bin" in capsys.readouterr().err


def test_folders_naming_their_own_code_are_refused(tmp_path):
    """``auto_map`` in config.json or tokenizer_config.json names Python files in the folder; transformers would
    ask to run them (and a piped "y" answers). passforge refuses before transformers sees the folder."""
    from passforge.models import hf

    config = {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CaptureError, match="custom code"):
        passforge.optimize(tmp_path)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.T", None]}}))
    with pytest.raises(CaptureError, match="custom code"):
        hf.load_tokenizer(tokenizer)


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_length_dependent_rope_is_fixed_below_its_original_length(tmp_path, rope):
    """Phi-3 128k's ``longrope`` and Llama's NTK ``dynamic`` rope swap their frequencies inside forward; below
    the original training length (32 here) they are the original ones, which passforge fixes, capping its
    graphs and cache there: logits and greedy tokens equal HF's."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, eos_token_id=None, bos_token_id=None)  # fmt: skip
    if rope == "longrope":
        scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
        config = transformers.Phi3Config(**sizes, max_position_embeddings=128, original_max_position_embeddings=32,
                                         rope_scaling=scaling)  # fmt: skip
        model_class = transformers.Phi3ForCausalLM
    else:
        config = transformers.LlamaConfig(**sizes, max_position_embeddings=32,
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    opt = passforge.optimize(tmp_path, pipeline="cleanup", profile=False, seq_len=16)
    assert opt.max_seq_len == 32
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(opt(ids), model(ids).logits, rtol=1e-5, atol=1e-5)
        want = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
    got, _ = opt.generate(ids[:, :6], 8)
    assert torch.equal(got, want)
