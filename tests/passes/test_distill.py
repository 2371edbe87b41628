"""distill: the graph stays as it is, its linear/embedding/norm parameters train towards the teacher's logits.

Setup: the small Llama with its output head scaled 8x (a random model's next-token distributions are close to
uniform; a sharper one makes perplexity and KL move by more than sampling noise) is the teacher, and the
calibration text is *sampled from it*, so held-out perplexity — what distill's early stopping watches — is
cross-entropy = the teacher's entropy + KL(teacher || student): it falls exactly as the student approaches the
teacher. The student is the teacher with Gaussian noise (0.3 of each weight tensor's std) added to its weights,
optionally quantized or with substituted attention. KL is measured on separately sampled text.

Structure (op counts unchanged, only float parameters change, scales and buffers untouched, no
requires_grad left), numerics (KL on unseen text drops by a stated margin, through fake-quant and through
passforge::attention), negatives (folded weights, no data, missing checkpoint, decode graphs, bad options).
"""

from __future__ import annotations

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.eval.compare import logits_kl
from passforge.eval.perplexity import perplexity
from passforge.ir.capture import capture
from passforge.ir.graph import (
    copy_graph_module,
    count_calls,
    get_attr,
    op_counts,
    param_stats,
    set_tensor_attr,
    tensor_attrs,
)
from passforge.models.llama import DecodeStep, Llama, example_decode_inputs
from passforge.passes.base import Context, PreconditionError
from passforge.passes.distill import Distill, sparsified_weights, trainable_names
from passforge.passes.manager import PassFailure, PassManager
from tests.conftest import SMALL, TiedEmbeddingHead

ATTENTION = torch.ops.passforge.attention.default
QUANTIZE = torch.ops.quantized_decomposed.quantize_per_channel.default
BATCH, SEQ = 8, 16  # the graphs' static input shape: one call takes 8 windows
TRAIN = "distill(steps=30,lr=1e-3,batch_size=16,eval_every=10)"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is as fast, and immune to a busy machine's thread contention (2 threads under
    load run these tests ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _sample(model: Llama, sequences: int, length: int, seed: int) -> torch.Tensor:
    """(sequences, length) tokens sampled from ``model``, each sequence from a random first token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SMALL.vocab_size, (sequences, 1), generator=generator)
    for _ in range(length - 1):
        probs = model(tokens)[:, -1].float().softmax(-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens


@pytest.fixture(scope="module")
def lm() -> tuple[Llama, torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    """(teacher model, its graph, calibration stream of 3072 sampled tokens, unseen (8, 16) sampled text)."""
    torch.manual_seed(0)
    model = Llama(SMALL).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calib = _sample(model, 48, 64, seed=1).reshape(-1)
        unseen = _sample(model, BATCH, SEQ, seed=2)
        return model, capture(model, (unseen,)), calib, unseen
    finally:
        torch.set_num_threads(threads)


def _noisy(gm: torch.fx.GraphModule, scale: float = 0.3, seed: int = 5) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose trainable weights carry Gaussian noise of ``scale`` times their std."""
    student = copy_graph_module(gm)
    generator = torch.Generator().manual_seed(seed)
    for name in trainable_names(student):
        w = get_attr(student, name)
        set_tensor_attr(student, name, w + scale * w.std() * torch.randn(w.shape, generator=generator))
    return student


def _run(student, spec, lm, **context):
    _, teacher, calib, unseen = lm
    ctx = Context(example_inputs=(unseen,), calib_tokens=calib, teacher=teacher)
    for key, value in context.items():
        setattr(ctx, key, value)
    return PassManager.parse(spec).run(student, ctx)


def _kl(lm, gm) -> float:
    """KL(teacher || gm) per position on the unseen text."""
    _, teacher, _, unseen = lm
    with torch.no_grad():
        return logits_kl(teacher(unseen), gm(unseen))


# --- structure ----------------------------------------------------------------------------------------------


def test_what_trains_is_the_float_parameters_of_linears_embeddings_and_norms(lm):
    quantized = _run(lm[1], "quantize(scheme=w4,group_size=32)", lm).graph
    names = trainable_names(quantized)
    layer = ["attention_norm", *(f"attention.{p}_proj" for p in "qkvo"), "ffn_norm",
             *(f"feed_forward.{p}_proj" for p in ("gate", "up", "down"))]
    expected = ["tok_embeddings", *(f"layers.{i}.{part}" for i in range(SMALL.n_layers) for part in layer),
                "norm", "lm_head"]
    assert names == [f"{name}.weight" for name in expected]
    frozen = {name for name, _ in tensor_attrs(quantized)} - set(names)
    assert {"rope_cos", "rope_sin"} <= frozen and all(  # quantization scales and zero points, RoPE tables
        name.endswith(("_scale", "_zero_point")) or name.startswith("rope_") for name in frozen)


def test_graph_unchanged_only_float_parameters_train(lm):
    """w4 fake-quant student: the same nodes after; every trainable tensor replaced by a trained one in its own
    dtype (requires_grad False); the scales, zero points and RoPE tables are the very same tensors; the teacher
    (which shared the student's tensors before noise) is untouched."""
    _, teacher, _, _ = lm
    teacher_before = {name: t.clone() for name, t in tensor_attrs(teacher)}
    student = _run(_noisy(teacher), "quantize(scheme=w4,group_size=32)", lm).graph
    result = _run(student, TRAIN, lm)
    after, record = result.graph, result.records[0]
    assert record.modified and record.stats["steps"] >= 10 and record.stats["trained_tensors"] == 21
    assert op_counts(after) == op_counts(student)
    assert str(after.graph) == str(student.graph)
    trained = set(trainable_names(student))
    for name, before in tensor_attrs(student):
        now = get_attr(after, name)
        assert now.dtype == before.dtype and not now.requires_grad, name
        if name in trained:
            assert not torch.equal(now, before), f"{name} did not train"
        else:
            assert now is before, f"{name} is not a parameter distill may train"
    assert all(not p.requires_grad for p in after.parameters())
    for name, t in tensor_attrs(teacher):
        assert torch.equal(t, teacher_before[name]), f"teacher tensor {name} changed"
    assert any("held-out perplexity" in note and "→" in note for note in record.notes), record.notes


def test_sparsified_weights_keep_their_zeros(lm):
    """After sparsify the zeros are the point: distill trains the remaining weights and masks the pruned ones
    back to zero after every step."""
    sparse = _run(_noisy(lm[1]), "sparsify(method=magnitude)", lm).graph
    result = _run(sparse, "distill(steps=10,lr=1e-3,batch_size=16,eval_every=5)", lm)
    assert result.records[0].modified
    names = sparsified_weights(sparse)
    assert len(names) == 7 * SMALL.n_layers  # every linear but the (skipped) lm_head
    for name in names:
        before, after = get_attr(sparse, name), get_attr(result.graph, name)
        assert torch.equal(after == 0, before == 0), name
        assert not torch.equal(after, before), name


def test_tied_weights_stay_tied():
    """An embedding and output head sharing one weight train as one tensor: both names hold the trained values,
    in one storage (the model's size is unchanged)."""
    tokens = torch.zeros(1, 8, dtype=torch.long)
    teacher = capture(TiedEmbeddingHead(), (tokens,))
    student = _noisy(teacher, scale=1.0)
    # _noisy replaced only the name the graph reads: tie the other one to it again (one storage, two names)
    set_tensor_attr(student, "emb.weight", get_attr(student, "head.weight"))
    calib = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(3))
    result = PassManager.parse("distill(steps=20,lr=1e-2,eval_every=5)").run(
        student, Context(example_inputs=(tokens,), calib_tokens=calib, teacher=teacher))
    assert result.records[0].modified
    head, emb = get_attr(result.graph, "head.weight"), get_attr(result.graph, "emb.weight")
    assert head.data_ptr() == emb.data_ptr() and not torch.equal(head, get_attr(student, "head.weight"))
    assert param_stats(result.graph) == param_stats(student)
    bf16 = PassManager.parse("distill(steps=4,lr=1e-2,eval_every=2)").run(  # one converted value for both names
        student.to(torch.bfloat16), Context(example_inputs=(tokens,), calib_tokens=calib,
                                            teacher=teacher.to(torch.bfloat16)))
    assert bf16.records[0].status == "ok", bf16.records[0].error


class _MatmulProjection(torch.nn.Module):
    """A parameter read by ``x @ W`` (not a linear slot): not trained, and the user's model gets no ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.proj = torch.nn.Parameter(torch.randn(8, 8) / 3)
        self.head = torch.nn.Linear(8, 32, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids) @ self.proj))


def test_untrained_parameters_get_no_gradient_and_are_named():
    tokens = torch.zeros(1, 8, dtype=torch.long)
    model = _MatmulProjection()
    teacher = capture(model, (tokens,))
    student = _noisy(teacher, scale=0.5)
    calib = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(4))
    result = PassManager.parse("distill(steps=5,lr=1e-2,eval_every=5)").run(
        student, Context(example_inputs=(tokens,), calib_tokens=calib))
    assert model.proj.grad is None and model.emb.weight.grad is None
    assert any("not trained" in n and "proj" in n for n in result.records[0].notes)


def test_a_diverging_run_is_never_kept(lm):
    """NaN perplexity compares false with everything: it must not count as an improvement."""
    result = _run(_noisy(lm[1]), "distill(steps=3,lr=1e30,eval_every=1,batch_size=2,patience=5)", lm)
    for _, tensor in result.graph.named_parameters():
        assert torch.isfinite(tensor).all()


def test_the_teacher_is_this_runs_original_only(lm):
    ctx = Context(example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
    PassManager([]).run(lm[1], ctx)
    assert ctx.teacher is None  # a later run on another model must not distill towards this one


# --- numerics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["kl", "kl+hidden"])
def test_distill_recovers_the_teacher_from_a_noisy_student(lm, loss):
    """Measured (30 steps, lr 1e-3, 16 windows of 16 tokens a step): KL on unseen text 0.220 → 0.073 (kl) and
    0.220 → 0.069 (kl+hidden); asserted: below 0.6x (the drop is to 0.33x)."""
    student = _noisy(lm[1])
    result = _run(student, TRAIN.replace(")", f",loss={loss})"), lm)
    before, after = _kl(lm, student), _kl(lm, result.graph)
    assert result.records[0].modified
    assert after < 0.6 * before, (before, after)


def test_distill_trains_through_fake_quant(lm):
    """Noisy weights, then w8 fake-quant: the Q/DQ nodes stop autograd, so this trains only through the
    straight-through graph. The float weights behind the quantize nodes move, the scales do not, and KL drops.
    Measured: 0.220 → 0.073; asserted: below 0.6x."""
    student = _run(_noisy(lm[1]), "quantize(scheme=w8)", lm).graph
    result = _run(student, TRAIN, lm)
    weight = "layers.0.attention.q_proj.weight"
    assert not torch.equal(get_attr(result.graph, weight), get_attr(student, weight))
    quantize = next(n for n in student.graph.nodes if n.target is QUANTIZE and n.args[0].target == weight)
    scale = quantize.args[1].target
    assert get_attr(result.graph, scale) is get_attr(student, scale)
    assert "straight-through" in " ".join(result.records[0].notes)
    before, after = _kl(lm, student), _kl(lm, result.graph)
    assert after < 0.6 * before, (before, after)


def test_distill_trains_through_substituted_attention(lm):
    """fuse-attention first: the student computes attention in passforge::attention (its autograd formula
    recomputes through the reference). Measured: 0.220 → 0.073; asserted: below 0.6x."""
    student = _noisy(lm[1])
    result = _run(student, f"fuse-attention,{TRAIN}", lm)
    assert count_calls(result.graph, ATTENTION) == SMALL.n_layers
    assert result.records[1].modified
    before, after = _kl(lm, student), _kl(lm, result.graph)
    assert after < 0.6 * before, (before, after)


def test_a_second_run_continues_without_making_held_out_perplexity_worse(lm):
    """Not idempotent (it trains on), but early stopping keeps the best evaluation: the held-out perplexity the
    pass watches (the last 10% of the calibration stream) is no worse after the second run."""
    _, _, calib, _ = lm
    held = calib[-(len(calib) // 10 + 1):]
    spec = "distill(steps=10,lr=1e-3,batch_size=16,eval_every=5)"
    once = _run(_noisy(lm[1]), spec, lm).graph
    twice = _run(once, spec, lm).graph

    def held_out_ppl(gm):
        return perplexity(gm, held, seq_len=SEQ, batch_size=BATCH, max_windows=16)

    assert held_out_ppl(twice) <= held_out_ppl(once)


# --- generation graphs, checkpoints, negatives --------------------------------------------------------------


def test_decode_graph_takes_the_forward_graphs_trained_weights(lm):
    """The decode graph is not trained: it takes the forward run's tensors from ctx.memo (its names carry the
    DecodeStep wrapper's ``model.`` prefix). With an empty memo it is left alone, with a note."""
    model = lm[0]
    spec = "distill(steps=5,lr=1e-3,batch_size=8,eval_every=1)"
    memo: dict[str, object] = {}
    forward = _run(_noisy(lm[1]), spec, lm, memo=memo)
    assert forward.records[0].modified
    decode_in = example_decode_inputs(model)
    decode_gm = capture(DecodeStep(model), decode_in)
    alone = _run(decode_gm, spec, lm, example_inputs=decode_in, role="decode", memo={})
    assert not alone.records[0].modified and "left unchanged" in alone.records[0].notes[0]
    decode = _run(decode_gm, spec, lm, example_inputs=decode_in, role="decode", memo=memo)
    assert decode.records[0].modified and decode.records[0].stats["reused"] == 21
    for name in trainable_names(decode.graph):
        assert torch.equal(get_attr(decode.graph, name), get_attr(forward.graph, name.removeprefix("model.")))


def test_teacher_from_a_checkpoint(lm, tmp_path):
    """teacher=PATH: the saved graph teaches, not ctx.teacher (here the student itself, which would teach
    nothing). Measured after 10 steps: KL 0.220 → 0.152; asserted: below 0.9x. A missing file is named."""
    from passforge.ir.serialize import save_graph

    _, teacher, _, unseen = lm
    path = tmp_path / "teacher.pt2"
    save_graph(teacher, path, (unseen,))
    student = _noisy(teacher)
    spec = f"distill(steps=10,lr=1e-3,batch_size=16,eval_every=5,teacher={path})"
    result = _run(student, spec, lm, teacher=student)  # ctx.teacher is the student itself: only the file teaches
    assert _kl(lm, result.graph) < 0.9 * _kl(lm, student)
    missing = tmp_path / "nope.pt2"
    with pytest.raises(PassFailure, match=r"nope\.pt2' does not exist") as info:
        _run(student, f"distill(teacher={missing})", lm)
    assert isinstance(info.value.__cause__, PreconditionError)


def test_folded_weights_are_refused_with_the_fix(lm):
    with pytest.raises(PassFailure, match="Run distill before fold-quant") as info:
        _run(lm[1], "quantize(scheme=w4,group_size=32),fold-quant,distill", lm)
    assert isinstance(info.value.__cause__, PreconditionError)
    assert "'quantize(scheme=w4),distill,fold-quant'" in str(info.value)


def test_no_calibration_tokens_is_a_precondition_error(lm):
    with pytest.raises(PassFailure, match="needs calibration text") as info:
        _run(lm[1], "distill", lm, calib_tokens=None)
    assert isinstance(info.value.__cause__, PreconditionError)


def test_no_teacher_outside_a_pass_manager(lm):
    _, gm, calib, unseen = lm
    with pytest.raises(PreconditionError, match="no teacher"):
        Distill().run(copy_graph_module(gm), Context(example_inputs=(unseen,), calib_tokens=calib))


def test_hidden_states_of_another_width_are_refused_for_kl_hidden(lm):
    """A teacher whose hidden size differs (as after pruning) has no hidden state to match: kl+hidden says so;
    plain kl still works."""
    narrow = Llama(SMALL.__class__(**{**SMALL.__dict__, "dim": 32, "n_heads": 2, "n_kv_heads": 1})).eval()
    narrow_graph = capture(narrow, (lm[3],))
    with pytest.raises(PassFailure, match="hidden size pruned"):
        _run(lm[1], "distill(steps=1,loss=kl+hidden)", lm, teacher=narrow_graph)


@pytest.mark.parametrize("options", [{"steps": 0}, {"temperature": 0.0}, {"temperature": -1.0}, {"lr": 0.0},
                                     {"patience": 0}, {"batch_size": 0}])
def test_invalid_options_fail_at_construction(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        Distill(**options)


def test_spec_round_trip():
    spec = "distill(steps=50,loss=kl+hidden,temperature=2.0,teacher=/tmp/t.pt2)"
    assert PassManager.parse(spec).spec == spec


def test_ctrl_c_during_training_keeps_the_best_evaluated_weights(lm, monkeypatch):
    """Ctrl-C in step 3 (evaluations after steps 1 and 2): the pass keeps the best evaluated weights — not the
    last step's — says so, and the pipeline stops after it with the distilled graph as its partial result."""
    from passforge.passes import distill as distill_module
    from passforge.passes.manager import PipelineInterrupted

    calls, runs, loss = [], [], distill_module._Training._loss

    def interrupted_loss(self, args):
        runs[:] = [self]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(self, args)

    monkeypatch.setattr(distill_module._Training, "_loss", interrupted_loss)
    student = _noisy(lm[1])
    with pytest.raises(PipelineInterrupted) as info:
        _run(student, "distill(steps=10,lr=1e-3,eval_every=1,batch_size=1),cast", lm)
    record = info.value.partial.records[0]
    assert [r.spec for r in info.value.partial.records] == [record.spec]  # cast never ran
    assert any("interrupted (Ctrl-C) after 2 steps" in note for note in record.notes), record.notes
    run = runs[0]
    assert run.best_step > 0 and record.modified  # noisy start: a step improved on it
    kept = info.value.partial.graph
    for name, value in run.best_weights().items():
        assert torch.equal(get_attr(kept, name), value), name
    last = {key: master.detach() for key, master in run.masters.items()}
    assert run.best_step == 2 or any(not torch.equal(run.best[k], last[k]) for k in last)  # best, not last
