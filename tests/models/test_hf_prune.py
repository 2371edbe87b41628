"""Structured pruning of Hugging Face graphs: the channel groups are found in their ATen graphs, and a pruned
model is written back as a Hugging Face folder that ``from_pretrained`` reloads with the same logits — or
refused, saying why, when the architecture cannot express it."""

from __future__ import annotations

import json

import pytest
import torch

import passforge
from passforge.models.hf_save import MARKER, HFSaveError
from passforge.passes.prune.groups import find_groups
from tests.models.test_hf_e2e import PROMPT_LEN, SEQ_LEN, _hf_greedy, save_tiny, save_word_tokenizer

transformers = pytest.importorskip("transformers")

# (kind, units) of the groups of each tiny checkpoint: mlp 128 channels; heads 2 kv groups (GQA 4 over 2), 4 heads
# for GPT-2 (no GQA); Phi-3 and GPT-2 fuse q, k and v (and Phi-3 gate and up) in one projection cut by slices/splits.
EXPECTED = {
    "llama": {("mlp", 128), ("heads", 2), ("hidden", 64)},
    "qwen2": {("mlp", 128), ("heads", 2), ("hidden", 64)},
    "phi3": {("mlp", 128), ("heads", 2), ("hidden", 64)},
    "gpt2": {("mlp", 128), ("heads", 4), ("hidden", 64)},
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_groups_in_hugging_face_graphs(arch, tmp_path):
    save_tiny(tmp_path, arch)
    from passforge.ir.capture import capture
    from passforge.models.registry import resolve

    source = resolve(tmp_path, seq_len=SEQ_LEN)
    gm = capture(source.module, source.example_inputs)
    groups = find_groups(gm, allow_reduce=True)
    assert {(g.kind, g.units) for g in groups if not g.blocked} == EXPECTED[arch]
    counts = {kind: sum(not g.blocked and g.kind == kind for g in groups) for kind in ("mlp", "heads", "hidden")}
    assert counts == {"mlp": 2, "heads": 2, "hidden": 1}  # one MLP and one attention per layer


def test_fused_projections_prune_through_their_pieces(tmp_path):
    """Phi-3's qkv_proj (sliced) and gate_up_proj (split): one kv group and a quarter of the MLP go, the slice
    bounds and split sizes follow, and each piece is scored on its own rows: with 32 channels silenced in
    both halves of gate_up (and down's columns), l2 removes exactly those and the logits do not move."""
    model = save_tiny(tmp_path / "in", "phi3")
    with torch.no_grad():
        for layer in model.model.layers:
            for half in (0, 128):
                layer.mlp.gate_up_proj.weight[half + 40:half + 72] = 0
            layer.mlp.down_proj.weight[:, 40:72] = 0
    model.save_pretrained(tmp_path / "in", safe_serialization=True)
    dense = passforge.optimize(tmp_path / "in", pipeline="cleanup", seq_len=SEQ_LEN, profile=False,
                               generation=False)
    mlp = passforge.optimize(tmp_path / "in", pipeline="prune-channels", seq_len=SEQ_LEN, profile=False,
                             generation=False)
    torch.testing.assert_close(mlp.graph(*mlp.example_inputs), dense.graph(*dense.example_inputs),
                               rtol=1e-5, atol=1e-5)
    opt = passforge.optimize(tmp_path / "in", pipeline="prune-channels,prune-channels(target=heads,ratio=0.5)",
                             seq_len=SEQ_LEN, profile=False, generation=False)
    weights = dict(opt.graph.named_parameters())
    assert weights["model.model.layers.0.self_attn.qkv_proj.weight"].shape == ((2 + 1 + 1) * 16, 64)
    assert weights["model.model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)
    splits = [n.args[1] for n in opt.graph.graph.nodes if n.target is torch.ops.aten.split.Tensor]
    assert splits == [96, 96]
    assert torch.isfinite(opt.graph(*opt.example_inputs)).all()
    out = opt.save_hf(tmp_path / "out")
    torch.testing.assert_close(_logits(out, opt.example_inputs[0]), opt.graph(*opt.example_inputs),
                               rtol=1e-5, atol=1e-5)


def _logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("arch", "pipeline", "sizes"), [
    ("llama", "prune-channels,prune-channels(target=heads,ratio=0.5)",
     {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    ("gpt2", "prune-channels", {"n_inner": 96, "n_embd": 64}),
])
def test_pruned_folder_reloads_with_the_same_logits(arch, pipeline, sizes, tmp_path):
    save_tiny(tmp_path / "in", arch)
    if arch == "llama":
        save_word_tokenizer(tmp_path / "in")
    opt = passforge.optimize(tmp_path / "in", pipeline=pipeline, seq_len=SEQ_LEN, profile=False, generation=False)
    out = opt.save_hf(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in sizes} == sizes
    assert json.loads((out / MARKER).read_text())["pipeline"] == pipeline
    assert (out / "tokenizer.json").is_file() == (arch == "llama")
    ids = opt.example_inputs[0]
    torch.testing.assert_close(_logits(out, ids), opt.graph(ids), rtol=1e-5, atol=1e-5)
    opt.save_hf(out)  # a folder it wrote may be replaced


def test_what_hugging_face_cannot_express_is_refused(tmp_path):
    save_tiny(tmp_path / "in", "llama")
    per_layer = passforge.optimize(tmp_path / "in", pipeline="prune-channels(scope=global,multiple=1)",
                                   seq_len=SEQ_LEN, profile=False, generation=False)
    with pytest.raises(HFSaveError, match="different intermediate_size"):
        per_layer.save_hf(tmp_path / "out")
    quantized = passforge.optimize(tmp_path / "in", pipeline="quantize(scheme=w8),fold-quant", seq_len=SEQ_LEN,
                                   profile=False, generation=False)
    with pytest.raises(HFSaveError):
        quantized.save_hf(tmp_path / "out")
    with pytest.raises(HFSaveError, match="input model's folder"):
        per_layer.save_hf(tmp_path / "in" / "pruned")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(HFSaveError, match="not a folder passforge wrote"):
        per_layer.save_hf(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def _greedy_through(graph: torch.fx.GraphModule, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens from a causal forward graph of static length SEQ_LEN: the sequence is right-padded, and
    the logits at its last real position depend on nothing after it."""
    tokens = prompt
    for _ in range(new_tokens):
        padded = torch.nn.functional.pad(tokens, (0, SEQ_LEN - tokens.shape[1]))
        with torch.inference_mode():
            logits = graph(padded)
        tokens = torch.cat([tokens, logits[:, tokens.shape[1] - 1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "mistral", "gpt2"])
def test_heads_pruned_with_their_kv_cache_generate_what_the_pruned_model_computes(arch, tmp_path):
    """Pruning kv heads with generation on: the prefill and decode graphs prune their stacked caches too
    (Phi-3 and GPT-2 through their fused qkv pieces), and generate() gives the greedy tokens of the pruned
    forward graph and — where a config can express the pruned model (not GPT-2's heads) — the tokens Hugging
    Face's own generate gives on the folder save_hf writes, its cache built from the rewritten config."""
    save_tiny(tmp_path / "in", arch)
    opt = passforge.optimize(tmp_path / "in", pipeline="prune-channels(target=heads,ratio=0.5)", seq_len=SEQ_LEN,
                             profile=False)
    assert [r["status"] for g in ("prefill", "decode") for r in opt.report["generation"][g]] == ["ok", "ok"]
    prompt = opt.example_inputs[0][:, :PROMPT_LEN]
    tokens, _ = opt.generate(prompt, SEQ_LEN - PROMPT_LEN)
    torch.testing.assert_close(tokens, _greedy_through(opt.graph, prompt, SEQ_LEN - PROMPT_LEN), rtol=0, atol=0)
    if arch == "gpt2":
        return
    pruned = transformers.AutoModelForCausalLM.from_pretrained(opt.save_hf(tmp_path / "out"),
                                                               local_files_only=True).eval()
    assert pruned.config.num_key_value_heads == 1
    torch.testing.assert_close(tokens, _hf_greedy(pruned, prompt)[:, :tokens.shape[1]], rtol=0, atol=0)


def test_per_layer_head_counts_generate_through_one_padded_cache(tmp_path):
    """Global scope gives the two layers different kv head counts (Phi-3: through the fused qkv slices): the
    step graphs share one cache of the widest layer's heads, and generate() gives the pruned forward graph's
    greedy tokens."""
    save_tiny(tmp_path / "in", "phi3")
    opt = passforge.optimize(tmp_path / "in", pipeline="prune-channels(target=heads,ratio=0.25,scope=global)",
                             seq_len=SEQ_LEN, profile=False)
    assert [r["status"] for g in ("prefill", "decode") for r in opt.report["generation"][g]] == ["ok", "ok"]
    sizes = {p.shape[0] for name, p in opt.graph.named_parameters() if name.endswith("qkv_proj.weight")}
    assert len(sizes) == 2  # the layers keep different head counts
    prompt = opt.example_inputs[0][:, :PROMPT_LEN]
    tokens, _ = opt.generate(prompt, SEQ_LEN - PROMPT_LEN)
    torch.testing.assert_close(tokens, _greedy_through(opt.graph, prompt, SEQ_LEN - PROMPT_LEN), rtol=0, atol=0)
