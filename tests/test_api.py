from __future__ import annotations

import json

import pytest
import torch

import passforge
from passforge.models.llama import Llama, LlamaConfig
from passforge.models.registry import ModelError
from passforge.runtime.executor import InputError

REPORT_FIELDS = {"name", "spec", "status", "time_s", "nodes", "params", "param_bytes", "latency_ms",
                 "peak_mem_bytes", "max_abs_err", "kl", "ppl"}


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 40, encoding="utf-8")
    return path


def _greedy_eager(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def test_optimize_report_save_load_generate(small_llama, tokens, eval_file, tmp_path):
    state = {k: v.clone() for k, v in small_llama.state_dict().items()}
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup,cast(dtype=bf16),cleanup",
                             eval_data=eval_file)
    # The user's model is untouched.
    for key, value in small_llama.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
        assert value.dtype == torch.float32

    report = opt.report
    assert report["pipeline"] == "cleanup,cast,cleanup"
    assert [row["status"] for row in report["passes"]] == ["ok", "ok", "ok"]
    for row in [*report["passes"]]:
        assert row.keys() >= REPORT_FIELDS
        assert all(row[k] is not None for k in REPORT_FIELDS), row
    assert report["baseline"]["kl"] == 0.0 and report["baseline"]["ppl"] > 1
    cast_row = report["passes"][1]
    assert cast_row["param_bytes"] < 0.55 * report["baseline"]["param_bytes"]
    assert 0 < cast_row["kl"] < 1e-3
    assert abs(cast_row["ppl"] / report["baseline"]["ppl"] - 1) < 0.01

    out = opt.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.pt2", "prefill.pt2", "decode.pt2", "manifest.json",
                                              "report.json"}
    assert json.loads((out / "report.json").read_text())["passes"][1]["spec"] == "cast"
    again = passforge.load(out)
    torch.testing.assert_close(again(tokens), opt(tokens), rtol=0, atol=0)
    text_a, _ = opt.generate("def ", 8)
    text_b, _ = again.generate("def ", 8)
    assert text_a == text_b


def test_lossless_pipeline_generates_the_eager_greedy_tokens(small_llama, tokens):
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False)
    prompt = tokens[:, :5]
    generated, stats = opt.generate(prompt, 12)
    torch.testing.assert_close(generated, _greedy_eager(small_llama, prompt, 12), rtol=0, atol=0)
    assert stats.new_tokens == 12 and stats.decode_tokens_per_s > 0


def test_a_prompt_longer_than_the_prefill_graph_goes_through_decode_steps():
    """The prefill graph takes 64 tokens (PREFILL_LEN); a 70-token prompt within a 96-token context fills the
    rest of the cache one decode step per token and continues as eager greedy decoding does."""
    model = Llama(LlamaConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                              max_seq_len=96)).eval()  # fmt: skip
    opt = passforge.optimize(model, (torch.zeros(1, 8, dtype=torch.long),), pipeline="cleanup", profile=False)
    long_prompt = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(6))
    generated, stats = opt.generate(long_prompt, 4)
    torch.testing.assert_close(generated, _greedy_eager(model, long_prompt, 4), rtol=0, atol=0)
    assert stats.prompt_tokens == 70 and stats.new_tokens == 4


def test_calibrated_pipeline_gives_prefill_the_forward_graphs_calibration(small_llama, tokens, tmp_path):
    """smooth-quant, static ranges and GPTQ are computed once, on the forward graph, and reused by the prefill
    and decode graphs (Context.memo): prefill then computes the forward graph's logits (same ops, same
    tensors: 1e-5), and the decode graph calibrated nothing of its own."""
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(torch.randint(0, 256, (16 * 16,), generator=torch.Generator().manual_seed(4))
                                .tolist()), encoding="utf-8")
    spec = "cleanup,smooth-quant,quantize(scheme=w8a8-static,calib_windows=8),gptq(calib_windows=8),fold-quant"
    opt = passforge.optimize(small_llama, (tokens,), pipeline=spec, profile=False, calib_data=calib)
    assert all(r["status"] == "ok" for graph in opt.report["generation"].values() for r in graph)
    prompt = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    forward_logits = opt.graph(prompt[:, :16])
    prefill_logits = opt.prefill(prompt)[0][:, :16]
    torch.testing.assert_close(prefill_logits, forward_logits, rtol=1e-5, atol=1e-5)
    _, stats = opt.generate(tokens[:, :5], 4)
    assert stats.new_tokens == 4


def test_save_refuses_to_write_over_its_input(small_llama, tokens, tmp_path):
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False, generation=False)
    folder = opt.save(tmp_path / "first")
    loaded_from_pt2 = passforge.optimize(folder / "model.pt2", pipeline="cleanup", profile=False)
    with pytest.raises(ModelError, match="contains the input model"):
        loaded_from_pt2.save(folder)
    assert passforge.load(folder)(tokens).shape == (1, 16, 256)  # the old output is intact


def test_wrong_inputs_get_a_clear_error(small_llama, tokens):
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False, generation=False)
    with pytest.raises(InputError, match=r"input 0: expected i64\[1, 16\], got f32\[1, 16\]"):
        opt(tokens.float())


def test_module_without_example_inputs_is_a_usage_error(small_llama):
    with pytest.raises(ModelError, match="needs example_inputs"):
        passforge.optimize(small_llama)


def test_unknown_model_name_lists_the_presets():
    with pytest.raises(ModelError, match=r"unknown model .lama.*tiny-lm"):
        passforge.optimize("lama")


def test_hugging_face_folder_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    opt = passforge.optimize(tmp_path / "hf", pipeline="cleanup", seq_len=16, profile=False)
    tokens = opt.example_inputs[0]
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    torch.testing.assert_close(opt(tokens), expected, rtol=1e-5, atol=1e-5)
    assert opt.report["model"] == "hf:hf"
    opt.save(tmp_path / "out")
    torch.testing.assert_close(passforge.load(tmp_path / "out")(tokens), expected, rtol=1e-5, atol=1e-5)


def test_save_never_deletes_foreign_files(small_llama, tokens, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "important.txt").write_text("keep me")
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False, generation=False)
    with pytest.raises(ModelError, match=r"holds files passforge did not write \(important\.txt\)"):
        opt.save(project)
    assert (project / "important.txt").read_text() == "keep me"
    opt.save(tmp_path / "out")
    opt.save(tmp_path / "out")  # a passforge folder is replaced as a whole
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_dynamic_sequence_length_survives_save_and_load(small_llama, tmp_path):
    tokens = torch.randint(0, 256, (1, 16))
    dims = ({1: torch.export.Dim("T", min=2, max=64)},)
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False, generation=False,
                             dynamic_shapes=dims)
    longer = torch.randint(0, 256, (1, 40))
    again = passforge.load(opt.save(tmp_path / "out"))
    torch.testing.assert_close(again(longer), small_llama(longer), rtol=1e-5, atol=1e-5)


def test_manifest_cannot_point_outside_its_folder(small_llama, tokens, tmp_path):
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False, generation=False)
    out = opt.save(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["forward"] = "../elsewhere.pt2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a plain file name"):
        passforge.load(out)


def test_generate_rejects_impossible_requests(small_llama, tokens):
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False)
    with pytest.raises(InputError, match="at least 1"):
        opt.generate(tokens[:, :4], 0)


def test_generation_graphs_that_cannot_be_captured_leave_the_forward_graph(small_llama, tokens, monkeypatch):
    from passforge import api
    from passforge.ir.capture import CaptureError

    def refuse(*args: object, **kwargs: object) -> object:
        raise CaptureError("capture of prefill failed: forward() writes into rotary_emb.inv_freq in place")

    monkeypatch.setattr(api, "_add_generation_graphs", refuse)
    with pytest.warns(UserWarning, match="no generation graphs"):
        opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False)
    assert opt.report["generation"] == {"error": "capture of prefill failed: forward() writes into "
                                        "rotary_emb.inv_freq in place"}  # fmt: skip
    assert opt.prefill is None
    with pytest.raises(RuntimeError, match="no prefill/decode graphs"):
        opt.generate(tokens[:, :4], 2)
