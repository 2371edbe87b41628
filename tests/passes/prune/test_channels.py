"""``prune-channels``: weights and shapes really shrink; channels that contribute nothing go without changing
the output; data-aware importance beats magnitude on the trained LM; a second run changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls, get_attr, op_counts
from passforge.models.llama import DecodeStep, Llama, PrefillStep
from passforge.passes.base import Context, PreconditionError
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.prune.channels import PruneChannels
from tests.conftest import SMALL, held_out_ppl

aten = torch.ops.aten


def _run(gm, *passes, tokens=None, calib=None, memo=None):
    example = tokens if tokens is not None else torch.zeros(1, 16, dtype=torch.long)
    ctx = Context(example_inputs=(example,), calib_tokens=calib, memo=memo if memo is not None else {})
    return PassManager(list(passes), hooks=[VerifyHook()]).run(gm, ctx)


def test_mlp_structure_shapes_and_counts(llama_graph, tokens):
    result = _run(llama_graph, PruneChannels(ratio=0.25), tokens=tokens)
    gm = result.graph
    kept = int(SMALL.ffn_dim * 0.75)  # 96: already a multiple of 8
    for i in range(SMALL.n_layers):
        assert get_attr(gm, f"layers.{i}.feed_forward.gate_proj.weight").shape == (kept, SMALL.dim)
        assert get_attr(gm, f"layers.{i}.feed_forward.up_proj.weight").shape == (kept, SMALL.dim)
        assert get_attr(gm, f"layers.{i}.feed_forward.down_proj.weight").shape == (SMALL.dim, kept)
    assert op_counts(gm) == op_counts(llama_graph)
    assert result.records[0].stats == {"pruned_groups": 2, "units_removed": 2 * (SMALL.ffn_dim - kept)}
    assert gm(tokens).shape == llama_graph(tokens).shape


def test_kept_counts_round_to_the_multiple(llama_graph):
    gm = _run(llama_graph, PruneChannels(ratio=0.3, multiple=16)).graph
    assert get_attr(gm, "layers.0.feed_forward.gate_proj.weight").shape[0] == 96  # 128 * 0.7 = 89.6 -> 96


def _silence_mlp_channels(model: Llama, layer: int, channels: slice) -> None:
    ff = model.layers[layer].feed_forward
    with torch.no_grad():
        ff.gate_proj.weight[channels] = 0
        ff.up_proj.weight[channels] = 0
        ff.down_proj.weight[:, channels] = 0


def test_channels_that_contribute_nothing_go_without_changing_outputs(small_llama, tokens):
    """With 32 channels of every MLP zeroed, l2 ranks exactly those last: pruning 25% removes them and the
    function is unchanged (up to float reassociation of the shorter GEMMs)."""
    for layer in range(SMALL.n_layers):
        _silence_mlp_channels(small_llama, layer, slice(40, 72))
    gm = capture(small_llama, (tokens,))
    pruned = _run(gm, PruneChannels(ratio=0.25), tokens=tokens).graph
    torch.testing.assert_close(pruned(tokens), gm(tokens), rtol=1e-5, atol=1e-5)


def test_a_silent_kv_group_goes_without_changing_outputs(small_llama, tokens):
    """Zero kv head 1's q/k/v rows and o_proj's columns of its query heads: pruning one of two groups (l2)
    removes it, the view/expand head counts follow, and the outputs stay equal."""
    hd, rep = SMALL.head_dim, SMALL.n_heads // SMALL.n_kv_heads
    with torch.no_grad():
        for layer in small_llama.layers:
            att = layer.attention
            att.q_proj.weight[rep * hd:2 * rep * hd] = 0
            att.k_proj.weight[hd:2 * hd] = 0
            att.v_proj.weight[hd:2 * hd] = 0
            att.o_proj.weight[:, rep * hd:2 * rep * hd] = 0
    gm = capture(small_llama, (tokens,))
    pruned = _run(gm, PruneChannels(target="heads", ratio=0.5), tokens=tokens).graph
    assert get_attr(pruned, "layers.0.attention.k_proj.weight").shape == (hd, SMALL.dim)
    assert get_attr(pruned, "layers.0.attention.o_proj.weight").shape == (SMALL.dim, rep * hd)
    views = [n.args[1] for n in pruned.graph.nodes if n.target is torch.ops.aten.view.default]
    assert [1, 16, rep, hd] in views and [1, 16, 1, hd] in views  # q: 1 group of `rep` heads; k, v: 1 head
    torch.testing.assert_close(pruned(tokens), gm(tokens), rtol=1e-5, atol=1e-5)


def test_hidden_shrinks_every_layer_and_still_runs(llama_graph, tokens):
    gm = _run(llama_graph, PruneChannels(target="hidden", ratio=0.25), tokens=tokens).graph
    assert get_attr(gm, "tok_embeddings.weight").shape == (SMALL.vocab_size, 48)
    assert get_attr(gm, "lm_head.weight").shape == (SMALL.vocab_size, 48)
    assert get_attr(gm, "layers.1.ffn_norm.weight").shape == (48,)
    assert get_attr(gm, "layers.1.attention.o_proj.weight").shape == (48, SMALL.dim)
    assert torch.isfinite(gm(tokens)).all()


def test_global_scope_varies_per_layer_and_keeps_the_total(llama_graph):
    calib = torch.randint(0, SMALL.vocab_size, (2048,), generator=torch.Generator().manual_seed(2))
    gm = _run(llama_graph, PruneChannels(ratio=0.25, scope="global", importance="wanda", multiple=1),
              calib=calib).graph
    kept = [get_attr(gm, f"layers.{i}.feed_forward.gate_proj.weight").shape[0] for i in range(SMALL.n_layers)]
    assert sum(kept) == int(0.75 * SMALL.n_layers * SMALL.ffn_dim)
    assert len(set(kept)) > 1, kept  # random weights still score the two layers differently


def test_second_run_changes_nothing_and_skip_leaves_a_layer(llama_graph):
    first = _run(llama_graph, PruneChannels(skip="layers.1.*")).graph
    assert get_attr(first, "layers.1.feed_forward.gate_proj.weight").shape[0] == SMALL.ffn_dim
    again = _run(first, PruneChannels(skip="layers.1.*"))
    assert again.records[0].modified is False
    for name, tensor in first.state_dict().items():
        assert torch.equal(get_attr(again.graph, name), tensor), name


def test_prefill_and_decode_graphs_reuse_the_forward_choice(small_llama):
    memo: dict = {}
    forward = capture(small_llama, (torch.zeros(1, 16, dtype=torch.long),))
    calib = torch.randint(0, SMALL.vocab_size, (2048,), generator=torch.Generator().manual_seed(3))
    pass_ = PruneChannels(importance="wanda")
    pruned = _run(forward, pass_, calib=calib, memo=memo).graph
    prefill = capture(PrefillStep(small_llama), (torch.zeros(1, 16, dtype=torch.long),))
    pruned_prefill = _run(prefill, pass_, memo=memo).graph  # no calibration data: must come from the memo
    name = "layers.0.feed_forward.down_proj.weight"
    torch.testing.assert_close(get_attr(pruned_prefill, f"model.{name}"), get_attr(pruned, name))
    tokens = torch.randint(0, SMALL.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pruned_prefill(tokens)[0], pruned(tokens), rtol=1e-5, atol=1e-5)


def _decode_inputs(model: Llama) -> tuple[torch.Tensor, ...]:
    """A decode step's example inputs with random caches (seeded), so which heads a pruned cache keeps shows."""
    g = torch.Generator().manual_seed(8)
    caches = (torch.randn(c.shape, generator=g) for c in model.new_kv_cache(1))
    return (torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]), *caches)


def _step_graphs(model: Llama, pass_: PruneChannels, tokens: torch.Tensor):
    """The forward, prefill and decode graphs pruned by ``pass_`` sharing one memo, as optimize runs them;
    returns the three results and the decode graph's context (whose example inputs the pass replaced)."""
    memo: dict = {}
    forward = _run(capture(model, (tokens,)), pass_, tokens=tokens, memo=memo)
    prefill_ctx = Context(example_inputs=(tokens,), memo=memo, role="prefill")
    prefill = PassManager([pass_], hooks=[VerifyHook()]).run(capture(PrefillStep(model), (tokens,)), prefill_ctx)
    decode_ctx = Context(example_inputs=_decode_inputs(model), memo=memo, role="decode")
    decode_graph = capture(DecodeStep(model), _decode_inputs(model))
    decode = PassManager([pass_], hooks=[VerifyHook()]).run(decode_graph, decode_ctx)
    return forward, prefill, decode, decode_ctx


def test_heads_prune_the_kv_cache_of_the_prefill_and_decode_steps(small_llama, tokens):
    """Structure: every layer keeps one of its two kv heads, and the caches the steps return and read shrink
    from (L, 1, 2, S, hd) to (L, 1, 1, S, hd); the decode context's example caches are the old ones' kept
    heads. Numerics: a decode step on the pruned prefill's caches gives the logits of the pruned forward
    graph on the prompt plus that token (fp32, only the summation order differs: 1e-5)."""
    pass_ = PruneChannels(target="heads", ratio=0.5)
    forward, prefill, decode, decode_ctx = _step_graphs(small_llama, pass_, tokens)
    cache_shape = (SMALL.n_layers, 1, 1, SMALL.max_seq_len, SMALL.head_dim)
    old_caches = _decode_inputs(small_llama)[2:]
    for result in (prefill, decode):
        assert result.records[0].status == "ok" and result.records[0].stats["units_removed"] == SMALL.n_layers
        assert get_attr(result.graph, "model.layers.1.attention.k_proj.weight").shape == (SMALL.head_dim, SMALL.dim)
    placeholders = [n.meta["val"].shape for n in decode.graph.graph.nodes if n.op == "placeholder"]
    assert placeholders[2:] == [cache_shape, cache_shape]
    for old, new in zip(old_caches, decode_ctx.example_inputs[2:]):  # each layer's kept kv head of the old cache
        assert tuple(new.shape) == cache_shape
        for layer in range(SMALL.n_layers):
            kept = get_attr(forward.graph, f"layers.{layer}.attention.k_proj.weight")[:SMALL.head_dim]
            head = next(h for h in range(SMALL.n_kv_heads) if torch.equal(
                small_llama.layers[layer].attention.k_proj.weight[h * SMALL.head_dim:(h + 1) * SMALL.head_dim], kept))
            assert torch.equal(new[layer, :, 0], old[layer, :, head])
    assert any(note.startswith("KV caches resized: input k_cache (2, 1, 1, 64, 16), input v_cache")
               for note in decode.records[0].notes)

    logits, k_cache, v_cache = prefill.graph(tokens)
    assert tuple(k_cache.shape) == tuple(v_cache.shape) == cache_shape
    torch.testing.assert_close(logits, forward.graph(tokens), rtol=1e-5, atol=1e-5)
    token = torch.randint(0, SMALL.vocab_size, (1, 1), generator=torch.Generator().manual_seed(7))
    step_logits, new_k, _ = decode.graph(token, torch.tensor([tokens.shape[1]]), k_cache, v_cache)
    longer = torch.cat([tokens, token], dim=1)
    forward_longer = _run(capture(small_llama, (longer,)), pass_, tokens=longer, memo={}).graph
    torch.testing.assert_close(step_logits[0, -1], forward_longer(longer)[0, -1], rtol=1e-5, atol=1e-5)
    assert tuple(new_k.shape) == cache_shape

    again_ctx = Context(example_inputs=decode_ctx.example_inputs, memo={}, role="decode")
    again = PassManager([pass_], hooks=[VerifyHook()]).run(decode.graph, again_ctx)
    assert again.records[0].modified is False and again_ctx.example_inputs is decode_ctx.example_inputs


@pytest.mark.parametrize(("spec", "heads", "compiled"), [
    ("prune-channels(target=heads,ratio=0.5,skip=layers.1.*)", [1, 2], True),
    ("prune-channels(target=heads,ratio=0.25,scope=global)", None, False),
    ("prune-channels(target=heads,ratio=0.5,skip=layers.1.*),prune-channels(target=heads,ratio=0.5)", [1, 1], True),
])
def test_layers_that_keep_different_head_counts_share_one_padded_cache(small_llama, tokens, spec, heads, compiled):
    """Per-layer head counts (a skipped layer, global scope): the cache keeps the widest layer's heads; a layer
    that keeps fewer reads the first heads of its slot (a slice) and returns it zero-padded. Structure: one
    slice per narrowed layer and cache input, one pad per narrowed layer and returned cache, none once a later
    run prunes the skipped layer to the same count (the cache then shrinks). generate() — op by op and
    compiled (the in-place update writes through the slice) — gives the greedy tokens of the model with those
    heads removed."""
    import passforge
    from tests.test_api import _greedy_eager

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the compiled step must build
        opt = passforge.optimize(small_llama, (tokens,), pipeline=spec, profile=False)
        kept = [get_attr(opt.graph, f"layers.{i}.attention.k_proj.weight").shape[0] // SMALL.head_dim
                for i in range(SMALL.n_layers)]
        assert kept == heads if heads else sorted(kept) == [1, 2]  # global: one layer keeps one head, one both
        narrowed = kept.count(min(kept)) if len(set(kept)) > 1 else 0
        cache = [n.meta["val"].shape for n in opt.decode.graph.nodes if n.op == "placeholder"][2]
        assert cache[2] == max(kept)
        assert count_calls(opt.decode, aten.slice.Tensor) - count_calls(capture_decode(small_llama),
                                                                        aten.slice.Tensor) == 2 * narrowed
        assert count_calls(opt.decode, aten.constant_pad_nd.default) == 2 * narrowed
        expected = _greedy_eager(_without_pruned_heads(small_llama, opt.graph), tokens, 6)
        assert torch.equal(opt.generate(tokens, 6)[0], expected)
        if compiled:
            assert torch.equal(opt.generate(tokens, 6, compiled_decode=True)[0], expected)


def capture_decode(model: Llama) -> torch.fx.GraphModule:
    return capture(DecodeStep(model), _decode_inputs(model))


def test_bad_options_and_missing_calibration():
    with pytest.raises(ValueError, match="ratio"):
        PruneChannels(ratio=1.0)
    with pytest.raises(ValueError, match="multiple"):
        PruneChannels(multiple=-8)
    gm = capture(Llama(SMALL).eval(), (torch.zeros(1, 16, dtype=torch.long),))
    with pytest.raises(PreconditionError, match="calibration data"):
        PruneChannels(importance="wanda").run(gm, Context(example_inputs=(torch.zeros(1, 16, dtype=torch.long),)))


def test_sensitivity_schedule_varies_per_layer_and_budget_caps_it(llama_graph):
    calib = torch.randint(0, SMALL.vocab_size, (2048,), generator=torch.Generator().manual_seed(5))
    result = _run(llama_graph, PruneChannels(ratio=0.25, schedule="sensitivity"), calib=calib)
    kept = [get_attr(result.graph, f"layers.{i}.feed_forward.gate_proj.weight").shape[0] for i in range(2)]
    assert sum(kept) == int(0.75 * 2 * SMALL.ffn_dim) and all(k % 8 == 0 for k in kept)
    assert any(n.startswith("sensitivity: removed 25.0%") for n in result.records[0].notes)
    capped = _run(llama_graph, PruneChannels(ratio=0.5, schedule="sensitivity", budget=1e-9), calib=calib)
    kept = [get_attr(capped.graph, f"layers.{i}.feed_forward.gate_proj.weight").shape[0] for i in range(2)]
    assert sum(kept) > SMALL.ffn_dim  # stopped before 50%: every step costs more than a 1e-9 budget
    assert any("stopped by the budget" in n for n in capped.records[0].notes)
    with pytest.raises(ValueError, match="sensitivity"):
        PruneChannels(target="hidden", schedule="sensitivity")


def test_loss_aware_choices_beat_magnitude_on_the_trained_lm(bundled_lm_and_text):
    """25% of every MLP's channels (bundled LM, held-out text): the loss-aware score keeps what matters, and
    per-layer ratios from the sensitivity scan do better still. Measured: dense 5.09, l2 5.65 (+11%), taylor
    5.42 (+6%), taylor + sensitivity 5.19 (+2%) on 64 x 128 held-out bytes; the bounds ask taylor to beat l2
    by 2%, the scan to beat uniform taylor by 2%, and both to stay within the issue's +10% before distillation."""
    from passforge.models import bundled
    from passforge.models.tokenizer import encode

    model, ids = bundled_lm_and_text
    example = torch.zeros(1, 128, dtype=torch.long)
    gm = capture(model, (example,))
    calib = torch.tensor(encode(bundled.calib_text()))
    ctx = lambda: Context(example_inputs=(example,), calib_tokens=calib)  # noqa: E731
    dense = held_out_ppl(gm, ids)
    l2 = held_out_ppl(PassManager([PruneChannels()]).run(gm, ctx()).graph, ids)
    taylor = held_out_ppl(PassManager([PruneChannels(importance="taylor")]).run(gm, ctx()).graph, ids)
    scanned = PruneChannels(importance="taylor", schedule="sensitivity")
    sensitivity = held_out_ppl(PassManager([scanned]).run(gm, ctx()).graph, ids)
    assert taylor < 0.98 * l2, (dense, l2, taylor)
    assert sensitivity < 0.98 * taylor, (dense, taylor, sensitivity)
    assert taylor < 1.10 * dense, (dense, l2, taylor)


def _without_pruned_heads(model: Llama, pruned: torch.fx.GraphModule) -> Llama:
    """A copy of ``model`` computing what the head-pruned graph computes: each removed kv head's v rows and
    its query heads' o_proj columns zeroed (the head then adds exactly nothing; which heads went is read off
    the pruned k_proj rows)."""
    import copy

    reference = copy.deepcopy(model)
    hd, rep = SMALL.head_dim, SMALL.n_heads // SMALL.n_kv_heads
    with torch.no_grad():
        for i, layer in enumerate(reference.layers):
            att = layer.attention
            kept = get_attr(pruned, f"layers.{i}.attention.k_proj.weight")
            for head in range(SMALL.n_kv_heads):
                if not any(torch.equal(att.k_proj.weight[head * hd:(head + 1) * hd], kept[j * hd:(j + 1) * hd])
                           for j in range(kept.shape[0] // hd)):
                    att.v_proj.weight[head * hd:(head + 1) * hd] = 0
                    att.o_proj.weight[:, head * rep * hd:(head + 1) * rep * hd] = 0
    return reference


def test_optimize_prunes_heads_in_all_three_graphs_and_generates_what_the_pruned_model_would(
    small_llama, tokens, tmp_path
):
    """End to end: optimize prunes one kv group of two in every layer of all three graphs; generate() — op by
    op, compiled, and after save/load — gives the eager greedy tokens of the model with those heads removed."""
    import passforge
    from tests.test_api import _greedy_eager

    opt = passforge.optimize(small_llama, (tokens,), pipeline="prune-channels(target=heads,ratio=0.5)",
                             profile=False)
    assert [r["status"] for g in ("prefill", "decode") for r in opt.report["generation"][g]] == ["ok", "ok"]
    assert get_attr(opt.decode, "model.layers.0.attention.k_proj.weight").shape == (SMALL.head_dim, SMALL.dim)
    expected = _greedy_eager(_without_pruned_heads(small_llama, opt.graph), tokens, 6)
    assert torch.equal(opt.generate(tokens, 6)[0], expected)
    assert torch.equal(opt.generate(tokens, 6, compiled_decode=True)[0], expected)
    assert torch.equal(passforge.load(opt.save(tmp_path / "heads")).generate(tokens, 6)[0], expected)
    mlp = passforge.optimize(small_llama, (tokens,), pipeline="prune-channels", profile=False)
    assert get_attr(mlp.decode, "model.layers.0.feed_forward.down_proj.weight").shape == (SMALL.dim, 96)


def test_taylor_leaves_the_users_parameters_as_they_were(small_llama, tokens):
    """The captured graph shares the model's parameters: scoring toggles requires_grad and must restore it."""
    gm = capture(small_llama, (tokens,))
    calib = torch.randint(0, SMALL.vocab_size, (2048,), generator=torch.Generator().manual_seed(6))
    _run(gm, PruneChannels(importance="taylor"), tokens=tokens, calib=calib)
    assert all(p.requires_grad for p in small_llama.parameters())


def test_kept_counts_edges():
    from types import SimpleNamespace

    from passforge.passes.prune.channels import kept_counts

    a, b = SimpleNamespace(name="a", units=100), SimpleNamespace(name="b", units=100)
    ties = {"a": torch.zeros(100), "b": torch.zeros(100)}
    assert kept_counts([a, b], ties, 0.0, 8, "local") == {"a": 100, "b": 100}  # ratio 0 keeps every unit
    assert sum(kept_counts([a, b], ties, 0.1, 1, "global").values()) == 180  # exactly 10% go, ties or not


def test_a_step_graph_without_the_forward_choice_is_refused(small_llama):
    inputs = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *small_llama.new_kv_cache(1))
    gm = capture(DecodeStep(small_llama), inputs)
    ctx = Context(example_inputs=inputs, role="decode")
    with pytest.raises(PreconditionError, match="forward graph chose no channels"):
        PruneChannels().run(gm, ctx)
