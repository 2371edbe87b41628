"""``distill(steps=200, lr=1e-4, loss=kl|kl+hidden, temperature=1.0, teacher=PATH)``: train the optimized graph's
weights to reproduce the original model's outputs, winning back what pruning and quantization cost.

Why: a pass that drops or rounds weights (``quantize(scheme=w4)``, pruning) makes each layer a little wrong, and
the errors compound through the depth of the model. A few hundred steps of knowledge distillation (Hinton et
al. 2015) — the student (the graph as optimized so far) trained towards the teacher's (the original model's)
next-token distribution on calibration text — win part of it back: the teacher's logits carry far more signal
per token than the one-hot next byte. (How much depends on the calibration text: docs/pruning.md measures it.)

Before → after: the graph is unchanged, node for node; only the values of its trainable tensors change::

    %w = get_attr[layers.0.attention.q_proj.weight]     (the same nodes; the tensor behind
    %q = quantize_per_channel_group(%w, %s, %z, ...)  →   layers.0.attention.q_proj.weight is the trained one,
    %d = dequantize_per_channel_group(%q, ...)            the scales %s and zero points %z are not touched)
    %y = aten.linear(%x, %d)

What trains: every floating-point tensor the graph reads through ``get_attr`` that is a *parameter* (not a
buffer) and is a linear's weight or bias, an embedding table or a norm's scale or bias — reached directly or
through casts, views and fake-quant (quantize → dequantize) nodes. Nothing else: not integer tensors, not the
quantization scales and zero points (buffers, fixed: the rounding grid ``quantize`` chose stays), not buffers
such as RoPE tables. Training runs in fp32 master copies and stores the result in each tensor's own dtype; the
graph's tensors are replaced, never written into (the teacher shares them), and are plain ``requires_grad=False``
parameters again afterwards. Weights ``sparsify`` pruned keep their zeros (masked after every step), so the
sparsity — and the compressed size — survive; ``prune-channels``' smaller shapes train as they are.

Loss: ``KL(teacher || student)`` of the next-token distributions at temperature ``T``, scaled by ``T²`` so the
gradient scale does not depend on ``T``; ``kl+hidden`` adds ``hidden_weight`` times the mean squared error
between the final hidden states — the input of the linear that computes the logits, i.e. the output of the
final norm, found by that rule in teacher and student alike (a student whose hidden size was pruned has no
matching hidden state: use ``loss=kl``). The logits are the graph's first output, ``(batch, seq, vocab)``.

Fake-quant and substituted ops: a graph with quantize → dequantize nodes trains through
:func:`~passforge.passes.quantize.ste.straight_through` (forward is the fake-quantized one, gradients pass to the
float weights: quantization-aware training); ``passforge::attention`` has an autograd formula. Folded integer
weights (``fold-quant``, ``lower-quant``) cannot train: run ``distill`` before them.

Data: random ``batch_size`` × ``seq_len`` windows (seeded) of ``ctx.calib_tokens``; the last 10% of them are
held out — never trained on — and scored every ``eval_every`` steps (perplexity on up to ``eval_windows``
windows). Training stops early when that perplexity has not improved for ``patience`` evaluations, and the
weights of the best evaluation are kept (the original ones if training never improved it: the pass then reports
``modified=False``). ``ctx.eval_tokens`` are never read: choosing weights by the text the profile then scores
would flatter the result. Optimiser: AdamW, linear warm-up over the first 10% of the steps, cosine decay to 10%
of ``lr``, gradients clipped to norm 1. The report's notes give the held-out perplexity before → after (and
the teacher's), the step the kept weights come from and why training stopped.

Teacher: ``ctx.teacher`` (the graph the pipeline started from, which :class:`PassManager` records), or
``teacher=PATH``, a ``.pt2`` saved by passforge (loaded without unpickling anything). It runs under ``no_grad``
on the same windows and is never modified.

Generation graphs (``ctx.role`` prefill / decode) are not trained again: they take the forward graph's trained
tensors from ``ctx.memo`` by weight name, so all graphs of a model compute the same function; with nothing in
the memo they are left alone (with a note). Not idempotent: a second ``distill`` continues training from the
first one's weights (early stopping keeps it from making held-out perplexity worse).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from passforge.eval.perplexity import perplexity
from passforge.ir.graph import copy_graph_module, describe_val, get_attr, set_tensor_attr, tensor_attrs, to_device
from passforge.passes.base import Context, Pass, PassResult, PreconditionError
from passforge.passes.quantize.calibrate import memo_get, memo_put, token_slot
from passforge.passes.quantize.ste import _pairs as fake_quant_pairs
from passforge.passes.quantize.ste import straight_through
from passforge.passes.registry import register

aten = torch.ops.aten
HOLDOUT_FRACTION = 0.1  # of the calibration tokens, held out for early stopping
GRAD_CLIP = 1.0  # global gradient-norm clip: one bad window cannot throw the weights far
LR_FLOOR = 0.1  # the cosine schedule ends at this fraction of lr
PASSTHROUGH = (
    aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.t.default, aten.transpose.int, aten.permute.default, aten.expand.default,
)  # ops that hand a tensor on unchanged in value (first argument): a weight read through them is still that weight
# op -> argument positions that hold a trainable parameter (linear: weight, bias; embedding: table; norms: scale,
# bias). RMSNorm in ATen is ``mul(normed, weight)``: a 1-D parameter multiplied in is its scale.
PARAMETER_SLOTS = {
    aten.linear.default: (1, 2),
    aten.embedding.default: (0,),
    aten.layer_norm.default: (2, 3),
    aten.native_layer_norm.default: (2, 3),
    aten.rms_norm.default: (2,),
    aten.group_norm.default: (2, 3),
}


@register
@dataclass(frozen=True)
class Distill(Pass):
    """Train the graph's linear, embedding and norm parameters towards the original model's logits (KL, plus
    optionally the final hidden state's MSE) on calibration text, with held-out early stopping."""

    name: ClassVar[str] = "distill"
    lossy: ClassVar[bool] = True  # training changes the outputs by design: no collapse bound
    steps: int = 200
    lr: float = 1e-4
    loss: Literal["kl", "kl+hidden"] = "kl"
    temperature: float = 1.0
    hidden_weight: float = 1.0
    batch_size: int = 4
    seq_len: int = 0  # 0: the token input's example length
    eval_every: int = 25
    eval_windows: int = 16
    patience: int = 2
    weight_decay: float = 0.0
    seed: int = 0
    teacher: str = ""  # "": ctx.teacher (the original model); else a passforge .pt2

    def __post_init__(self) -> None:
        checks = (
            ("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("temperature", self.temperature > 0, "> 0"), ("hidden_weight", self.hidden_weight >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("seq_len", self.seq_len >= 0, ">= 0 (0: the example's)"),
            ("eval_every", self.eval_every >= 1, ">= 1"), ("eval_windows", self.eval_windows >= 1, ">= 1"),
            ("patience", self.patience >= 1, ">= 1"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
        )
        for option, ok, bound in checks:
            if not ok:
                raise ValueError(f"{option} must be {bound}, got {getattr(self, option)}")

    @property
    def needs_calibration(self) -> bool:
        return True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        refuse_folded_weights(gm, self.spec)
        names = trainable_names(gm)
        if ctx.role != "forward":
            return self._reuse(gm, ctx, names)
        if not names:
            return PassResult(gm, modified=False, stats={"steps": 0}, notes=["nothing to train: no linear, "
                                                                             "embedding or norm parameters"])
        data = _Windows.from_context(ctx, gm, self.seq_len, self.spec)
        hidden = self.loss == "kl+hidden"
        teacher = _LogitsGraph(copy_graph_module(self._teacher(ctx, gm)), hidden, self.spec)
        quantized = any(n.target in fake_quant_pairs() for n in gm.graph.nodes)
        student_graph = straight_through(gm) if quantized else copy_graph_module(gm)
        frozen = _freeze_untrained(student_graph, names)
        student = _LogitsGraph(student_graph, hidden, self.spec)
        _check_outputs_match(student, teacher, self.spec)
        run = _Training(self, student, teacher, data, names, gm)
        run.train()
        ctx.interrupted = ctx.interrupted or run.interrupted
        notes = [
            f"held-out perplexity {run.history[0][1]:.3f} → {run.best_ppl:.3f} (best at step {run.best_step} of "
            f"{run.steps_run}; teacher {run.teacher_ppl():.3f}; {data.held.numel()} calibration tokens held out, "
            "not trained on)",
            run.stop_reason,
            f"trained {len(names)} tensors ({run.numel} values): linear, embedding and norm parameters"
            + (", through the straight-through fake-quant graph" if quantized else ""),
        ]
        if frozen:
            notes.append(f"not trained (read by ops other than linear/embedding/norm slots): {', '.join(frozen[:5])}"
                         + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else ""))
        stats = {"steps": run.steps_run, "trained_tensors": len(names)}
        if run.best_step == 0:
            notes.append("no evaluation beat the starting weights: weights left unchanged")
            return PassResult(gm, modified=False, stats=stats, notes=notes)
        for name, value in run.best_weights().items():
            set_tensor_attr(gm, name, value)
            memo_put(ctx.memo, self._memo_kind, name, value)
        return PassResult(gm, modified=True, stats=stats, notes=notes)

    @property
    def _memo_kind(self) -> str:
        return f"{self.spec}:w"

    def _teacher(self, ctx: Context, gm: fx.GraphModule) -> fx.GraphModule:
        if not self.teacher:
            if ctx.teacher is None:
                raise PreconditionError(
                    f"{self.spec}: no teacher: run it through a PassManager (which keeps the original graph as "
                    "ctx.teacher), set Context(teacher=...), or give teacher=PATH.pt2"
                )
            return ctx.teacher
        path = Path(self.teacher)
        if not path.is_file():
            raise PreconditionError(
                f"{self.spec}: teacher checkpoint '{path}' does not exist; give the path of a .pt2 graph saved by "
                "passforge (passforge.ir.serialize.save_graph), or leave teacher empty to distill from the "
                "original model"
            )
        from passforge.ir.serialize import load_graph

        device = next((t.device for t in gm.parameters()), torch.device("cpu"))
        return to_device(load_graph(path), device)

    def _reuse(self, gm: fx.GraphModule, ctx: Context, names: list[str]) -> PassResult:
        """A prefill or decode graph: take the forward graph's trained tensors from ``ctx.memo``."""
        reused, mismatched = 0, []
        converted: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # tied names: one object
        for name in names:
            value = memo_get(ctx.memo, self._memo_kind, [name])
            if value is None:
                continue
            old = get_attr(gm, name)
            if value.shape != old.shape:
                mismatched.append(name)
                continue
            key = (id(value), old.dtype, old.device)
            converted.setdefault(key, value.to(device=old.device, dtype=old.dtype))
            set_tensor_attr(gm, name, converted[key])
            reused += 1
        notes = [f"{ctx.role} graph: took {reused} of {len(names)} trained tensors from the forward graph's run"]
        if mismatched:
            notes.append(f"not taken (shape differs from the forward graph's): {', '.join(mismatched)}")
        if not reused:
            notes = [f"{ctx.role} graph: no trained weights from a forward graph's {self.spec} in ctx.memo; left "
                     "unchanged (generation graphs are not trained: run the pipeline on the forward graph first)"]
            return PassResult(gm, modified=False, stats={"steps": 0}, notes=notes)
        return PassResult(gm, modified=True, stats={"steps": 0, "reused": reused}, notes=notes)


def _freeze_untrained(student: fx.GraphModule, names: list[str]) -> list[str]:
    """The student copy's float parameters that are not trained, replaced by detached tensors (same storage,
    no autograd): they are shared with the user's model, whose ``.grad`` a backward pass must not touch.
    Returns their names (the report lists them)."""
    trained = set(names)
    frozen = []
    for name, tensor in list(tensor_attrs(student)):
        if name not in trained and tensor.is_floating_point():
            set_tensor_attr(student, name, tensor.detach())
            if isinstance(tensor, torch.nn.Parameter):
                frozen.append(name)
    return frozen


def trainable_names(gm: fx.GraphModule) -> list[str]:
    """The ``get_attr`` targets distill trains (see the module docstring), in graph order."""
    parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in found or node.target not in parameters:
            continue
        value = get_attr(gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and _is_parameter_slot(node, value):
            found.append(node.target)
    return found


def _is_parameter_slot(node: fx.Node, value: torch.Tensor) -> bool:
    if value.dim() == 1 and any(u.target is aten.mul.Tensor for u in node.users):
        return True  # a norm's scale in its ATen form: mul(normed, weight)
    dequantize_to_quantize = fake_quant_pairs()
    hand_on = (*PASSTHROUGH, *dequantize_to_quantize, *dequantize_to_quantize.values())
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            slots = PARAMETER_SLOTS.get(user.target, ())
            if any(i < len(user.args) and user.args[i] is current for i in slots):
                return True
            if user.target in hand_on and user.args and user.args[0] is current:
                stack.append(user)
    return False


def refuse_folded_weights(gm: fx.GraphModule, spec: str) -> None:
    """Raise when weights are stored as integers (``fold-quant``) or read by integer kernels (``lower-quant``):
    there is no float weight left to train."""
    from passforge.kernels import ops

    lowered = {op._opoverload for op in (ops.int8_weight_linear, ops.int8_dynamic_linear, ops.int8_static_linear,
                                         ops.int4_weight_linear, ops.fp8_linear)}
    reads_stored = {*fake_quant_pairs(), ops.unpack_int4._opoverload}
    folded = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        source = node.args[0] if node.args else None
        if node.target in lowered:
            folded.append(node.name)
        elif node.target in reads_stored and isinstance(source, fx.Node) and source.op == "get_attr":
            folded.append(source.target)
    if folded:
        shown = ", ".join(folded[:3]) + (f" and {len(folded) - 3} more" if len(folded) > 3 else "")
        raise PreconditionError(
            f"{spec}: the graph holds folded integer weights ({shown}); there is no float weight left to train. "
            "Run distill before fold-quant and lower-quant — it trains through the fake-quant form: "
            f"'quantize(scheme=w4),{spec},fold-quant'"
        )


class _LogitsGraph:
    """A private copy of an LM graph that returns ``(logits, hidden)`` — its first output and, when asked for,
    the input of the linear computing it — as a flat tuple (plain code generation: flat inputs, flat outputs)."""

    def __init__(self, gm: fx.GraphModule, hidden: bool, spec: str) -> None:
        self.gm = gm
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        logits = pytree.tree_leaves(output.args[0])[0]
        if not isinstance(logits, fx.Node):
            raise PreconditionError(f"{spec}: the graph's first output is a constant, not logits")
        self.logits = logits
        self.hidden = final_hidden_state(logits, spec) if hidden else None
        gm.graph.set_codegen(fx.graph.CodeGen())
        output.args = ((logits, self.hidden) if hidden else (logits,),)
        gm.recompile()

    def __call__(
        self, args: tuple[object, ...], params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = torch.func.functional_call(self.gm, params, args) if params else self.gm(*args)
        return out[0], (out[1] if self.hidden is not None else None)


def _check_outputs_match(student: _LogitsGraph, teacher: _LogitsGraph, spec: str) -> None:
    """Before any training, from the shapes the graphs record (``meta["val"]``): both first outputs must be
    logits ``(batch, seq, vocab)`` over one vocabulary and, for ``kl+hidden``, the final hidden states of one
    width. (Batch and sequence come from the same input; symbolic sizes may be named differently.)"""
    def shape(node: fx.Node | None) -> tuple[str, ...]:
        val = node.meta.get("val") if node is not None else None
        return tuple(str(d) for d in getattr(val, "shape", ()))

    logits, teacher_logits = shape(student.logits), shape(teacher.logits)
    if len(logits) != 3 or len(teacher_logits) != 3 or logits[-1] != teacher_logits[-1]:
        raise PreconditionError(
            f"{spec}: the first outputs of teacher ({describe_val(teacher.logits.meta.get('val'))}) and student "
            f"({describe_val(student.logits.meta.get('val'))}) must be logits (batch, seq, vocab) over one "
            "vocabulary; distill trains language models towards a teacher of the same vocabulary"
        )
    if student.hidden is not None and shape(student.hidden)[-1:] != shape(teacher.hidden)[-1:]:
        raise PreconditionError(
            f"{spec}: loss=kl+hidden compares final hidden states, but the student's is "
            f"{describe_val(student.hidden.meta.get('val'))} and the teacher's "
            f"{describe_val(teacher.hidden.meta.get('val'))} (hidden size pruned?); use loss=kl"
        )


def final_hidden_state(logits: fx.Node, spec: str) -> fx.Node:
    """The input of the linear that computes ``logits`` (through casts and views after it): the final norm's
    output. A fake-quantized input (dequantize(quantize(x))) is read as the float ``x``."""
    node = logits
    while node.op == "call_function" and node.target in PASSTHROUGH:
        node = node.args[0]
    if node.target is not aten.linear.default:
        raise PreconditionError(
            f"{spec}: loss=kl+hidden needs the final hidden state, the input of the linear computing the logits, "
            f"but the logits come from {node.name} ({node.target}); use loss=kl"
        )
    hidden = node.args[0]
    pairs = fake_quant_pairs()
    if hidden.target in pairs and getattr(hidden.args[0], "target", None) is pairs[hidden.target]:
        hidden = hidden.args[0].args[0]
    return hidden


@dataclass
class _Windows:
    """Token windows for training (random, seeded) and the held-out stream, shaped for the graph's input."""

    example: tuple[object, ...]
    slot: int  # which example input takes the tokens
    graph_batch: int | None  # None: the batch dim is dynamic
    seq_len: int
    train: torch.Tensor  # 1-D
    held: torch.Tensor  # 1-D

    @classmethod
    def from_context(cls, ctx: Context, gm: fx.GraphModule, seq_len: int, spec: str) -> _Windows:
        example = tuple(ctx.example_inputs)
        slot = token_slot(example)
        if slot is None:
            raise PreconditionError(f"{spec}: distill trains language models on token windows, but none of the "
                                    "example inputs is a (batch, seq) int64 token tensor")
        if ctx.calib_tokens is None or ctx.calib_tokens.numel() == 0:
            raise PreconditionError(
                f"{spec}: needs calibration text to train on and there is none: pass --calib-data FILE (CLI) or "
                "calib_data=... (optimize), or Context(calib_tokens=...)"
            )
        placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][slot]
        shape = getattr(placeholder.meta.get("val"), "shape", example[slot].shape)
        batch, seq = (None if isinstance(d, torch.SymInt) else int(d) for d in shape)
        if seq_len and seq is not None and seq_len != seq:
            raise PreconditionError(f"{spec}: seq_len={seq_len}, but the graph takes exactly {seq} tokens per "
                                    "window (static shape); leave seq_len=0 or capture with a dynamic length")
        seq_len = seq_len or int(example[slot].shape[1])
        stream = ctx.calib_tokens.reshape(-1).long().to(example[slot].device)
        held_count = max(math.ceil(HOLDOUT_FRACTION * stream.numel()), seq_len + 1)
        if stream.numel() - held_count < seq_len:
            raise PreconditionError(
                f"{spec}: {stream.numel()} calibration tokens are too few: training and the held-out part each "
                f"need at least one window of {seq_len} (+1) tokens; give more calibration text"
            )
        return cls(example, slot, batch, seq_len, stream[:-held_count], stream[-held_count:])

    def inputs(self, tokens: torch.Tensor) -> tuple[object, ...]:
        return (*self.example[:self.slot], tokens, *self.example[self.slot + 1:])

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One step's windows, in chunks the graph takes: all at once if its batch is dynamic, else its batch."""
        per_call = self.graph_batch or batch_size
        calls = math.ceil(batch_size / per_call)
        starts = torch.randint(0, self.train.numel() - self.seq_len + 1, (calls * per_call, 1), generator=generator)
        offsets = torch.arange(self.seq_len)
        windows = self.train[(starts + offsets).to(self.train.device)]  # (calls * per_call, seq_len)
        yield from windows.split(per_call)


def lr_factor(step: int, *, steps: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based): linear warm-up over the first 10% of the steps
    (Adam's first updates, from barely-estimated moments, would otherwise throw every weight by the full ``lr``
    at once), then a cosine decay to 10% at the last step."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def sparsified_weights(gm: fx.GraphModule) -> list[str]:
    """Weights of the linears ``sparsify`` pruned (``node.meta["passforge.sparsified"]``), read directly or
    through fake-quant and passthrough ops: their zeros are the point of the pass, so training keeps them."""
    from passforge.passes.prune.sparse_format import SPARSIFIED_META

    dequantize_to_quantize = fake_quant_pairs()
    hand_on = (*PASSTHROUGH, *dequantize_to_quantize, *dequantize_to_quantize.values())
    names = []
    for node in gm.graph.nodes:
        if node.target is not aten.linear.default or not node.meta.get(SPARSIFIED_META):
            continue
        weight = node.args[1]
        while isinstance(weight, fx.Node) and weight.target in hand_on:
            weight = weight.args[0]
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target not in names:
            names.append(weight.target)
    return names


def _same_values(t: torch.Tensor) -> tuple[object, ...]:
    """Equal for two names of one tied weight: the same tensor, or the same view of the same storage (what
    ``set_tensor_attr`` leaves when it stores one tensor under two names)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class _Training:
    """The optimisation loop: fp32 master copies of the trainable tensors (one per distinct tensor, so tied
    weights stay tied, under every name the module holds them by), AdamW, held-out evaluation and early
    stopping. Weights ``sparsify`` pruned are masked back to their zeros after every step (sparse fine-tuning)."""

    def __init__(self, options: Distill, student: _LogitsGraph, teacher: _LogitsGraph, data: _Windows,
                 names: list[str], gm: fx.GraphModule) -> None:
        self.options, self.student, self.teacher, self.data = options, student, teacher, data
        groups: dict[tuple[object, ...], list[str]] = {}
        tensors = {name: get_attr(gm, name) for name in names}
        for name, tensor in tensors.items():
            groups.setdefault(_same_values(tensor), []).append(name)
        for name, tensor in gm.named_parameters(remove_duplicate=False):  # a tied weight's other names follow it
            group = groups.get(_same_values(tensor))
            if group is not None and name not in group:
                group.append(name)
        self.names_of = {group[0]: group for group in groups.values()}
        self.dtype_of = {key: tensors[key].dtype for key in self.names_of}
        self.masters = {key: tensors[key].detach().float().clone().requires_grad_() for key in self.names_of}
        sparse = set(sparsified_weights(gm))
        self.masks = {key: tensors[key] != 0 for key, group in self.names_of.items() if sparse.intersection(group)}
        self.numel = sum(t.numel() for t in self.masters.values())
        self.best = None  # None: the starting weights
        self.best_ppl, self.best_step, self.steps_run = math.inf, 0, 0
        self.interrupted = False
        self.history: list[tuple[int, float]] = []
        self.stop_reason = ""

    def params(self) -> dict[str, torch.Tensor]:
        return self._by_name(self.masters)

    def best_weights(self) -> dict[str, torch.Tensor]:
        return self._by_name(self.best)

    def _by_name(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every name of each trained tensor -> one converted value (tied names must get the same object)."""
        out = {}
        for key, names in self.names_of.items():
            value = values[key].to(self.dtype_of[key])
            out.update(dict.fromkeys(names, value))
        return out

    def train(self) -> None:
        from tqdm.auto import tqdm

        o = self.options
        optimizer = torch.optim.AdamW(list(self.masters.values()), lr=o.lr, weight_decay=o.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, steps=o.steps))
        generator = torch.Generator().manual_seed(o.seed)
        self._evaluate(0)
        bar = tqdm(range(1, o.steps + 1), desc="distill", unit="step", leave=False, disable=None)
        misses = 0
        try:
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                chunks = list(self.data.batches(o.batch_size, generator))
                loss_sum = 0.0
                for tokens in chunks:
                    loss = self._loss(self.data.inputs(tokens)) / len(chunks)
                    loss.backward()
                    loss_sum += loss.item()
                torch.nn.utils.clip_grad_norm_(list(self.masters.values()), GRAD_CLIP)
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for key, keep in self.masks.items():  # sparsify's zeros stay zero
                        self.masters[key].mul_(keep)
                self.steps_run = step
                bar.set_postfix(loss=f"{loss_sum:.4f}", ppl=f"{self.history[-1][1]:.3f}", refresh=False)
                if step % o.eval_every and step != o.steps:
                    continue
                if self._evaluate(step):
                    misses = 0
                else:
                    misses += 1
                    if misses >= o.patience and step != o.steps:
                        self.stop_reason = (f"stopped early at step {step}: held-out perplexity did not improve in "
                                            f"{misses} evaluations (every {o.eval_every} steps)")
                        break
        except KeyboardInterrupt:  # keep the best evaluation so far; the manager stops the pipeline after this pass
            self.interrupted = True
            self.stop_reason = (f"interrupted (Ctrl-C) after {self.steps_run} steps: kept the best evaluated "
                                f"weights (step {self.best_step})")
        bar.close()
        self.stop_reason = self.stop_reason or f"ran all {o.steps} steps"

    def _loss(self, args: tuple[object, ...]) -> torch.Tensor:
        o = self.options
        with torch.no_grad():
            teacher_logits, teacher_hidden = self.teacher(args)
        logits, hidden = self.student(args, self.params())
        t = o.temperature
        loss = F.kl_div(
            F.log_softmax(logits.float().flatten(0, 1) / t, dim=-1),
            F.log_softmax(teacher_logits.float().flatten(0, 1) / t, dim=-1),
            log_target=True, reduction="batchmean",
        ) * t * t  # Hinton's T²: gradients keep their scale at any temperature
        if hidden is not None:
            loss = loss + o.hidden_weight * F.mse_loss(hidden.float(), teacher_hidden.float())
        return loss

    def _held_out_perplexity(self, graph: _LogitsGraph, params: dict[str, torch.Tensor] | None = None) -> float:
        batch = self.data.graph_batch or self.options.batch_size

        def logits_of(tokens: torch.Tensor) -> torch.Tensor:
            short = batch - tokens.shape[0]  # the last batch may be short: pad it to the graph's batch
            padded = torch.cat([tokens, tokens.new_zeros(short, tokens.shape[1])]) if short else tokens
            return graph(self.data.inputs(padded), params)[0][: tokens.shape[0]]

        return perplexity(logits_of, self.data.held, seq_len=self.data.seq_len, batch_size=batch,
                          max_windows=self.options.eval_windows)

    def teacher_ppl(self) -> float:
        return self._held_out_perplexity(self.teacher)

    def _evaluate(self, step: int) -> bool:
        """Score the current weights on the held-out tokens; keep them if they are the best so far."""
        ppl = self._held_out_perplexity(self.student, self.params())
        self.history.append((step, ppl))
        if not math.isfinite(ppl) or ppl >= self.best_ppl:  # a diverged (NaN/inf) step is never the best
            return False
        best = {key: master.detach().clone() for key, master in self.masters.items()} if step else None
        self.best, self.best_ppl, self.best_step = best, ppl, step  # together: a Ctrl-C never splits them
        return True
