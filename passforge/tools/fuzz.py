"""Semantic fuzzing of passes: random small models × random pipelines, checked against the IR invariants.

Hand-written pass tests cover the graphs their authors thought of (the bundled LM, a LLaMA, nanoGPT). This
module draws graphs nobody wrote a test for — linears, matmuls on parameters, elementwise ops, LayerNorm and a
hand-written RMSNorm, softmax, reshapes and transposes, SDPA and explicit ``q @ k^T → softmax → @ v`` attention
(the shapes ``fuse-attention`` matches, with and without causal masks and GQA), residuals; fp32 and sometimes
bf16 — captures them with :func:`passforge.ir.capture.capture`, and runs a random pipeline of the registered
passes under :class:`PassManager` with :class:`VerifyHook` and ``on_error="skip"``. :func:`check` then asserts:

1. **Contained.** Every pass has one record, in pipeline order; it is ``ok`` with no error, or ``skipped`` with
   the error that caused it. A skipped pass left no trace: the next pass (or the result) sees exactly the graph
   and outputs of the last ``ok`` pass.
2. **Verified.** An ``ok`` lossless pass kept the outputs within its own :meth:`Pass.tolerance` (recomputed
   here, independently of the verifier); an ``ok`` lossy pass kept shapes and dtypes, added no NaN/Inf and
   stayed within its ``max_rel_err`` collapse guard.
3. **Final graph sound.** It lints, every ``meta["val"]`` is true (:func:`check_meta`), it runs, it keeps the
   interface (output count, shapes, dtypes), and its outputs are within :func:`derived_bound` of the original
   model's.
4. **Idempotent** (INVARIANTS.md item 8). Each ``ok`` pass, run again on its own output, changes nothing
   (passes whose docstring says otherwise — ``distill`` — are exempt). And the whole pipeline, run again on
   the result, changes nothing, except where a later pass of the first run changed the graph a pass saw
   (``fold-quant,quantize`` folds on the second run: an order effect of the pipeline, not of the pass).
5. **The caller's graph is untouched** (items 5 and 6): same code, same tensors, bitwise.

Outcomes a random model may rightly get — a :class:`PreconditionError` or :class:`PassError` refusal, a lossy
pass rolled back by its collapse guard — are counted, not failed. A pass that crashes with any other exception
(it should have refused cleanly), or that the verifier had to roll back for a wrong rewrite, broken metadata or
NaN, is a *finding*: the manager contained it, but the pass has a bug.

Used by ``tests/tools/test_fuzz.py`` (a seeded slice) and by the long mode::

    OMP_NUM_THREADS=1 python -m passforge.tools.fuzz --examples 500 --seed 0

``hypothesis`` is a dev dependency: it is imported by the functions that build strategies and run examples,
never at import time of anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from passforge.ir.capture import capture
from passforge.ir.graph import copy_graph_module
from passforge.ir.verify import VerificationError, check_meta, check_quant_params, lint
from passforge.passes.base import Context, Pass, PassError, PreconditionError
from passforge.passes.hooks import VerifyHook, run_graph
from passforge.passes.manager import Hook, PassManager, PassRecord, PipelineResult

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

NOT_IDEMPOTENT = frozenset({"distill"})
"""Passes whose docstring says a second run changes the graph again (``distill`` continues training)."""

CALIB_WINDOWS = 2
"""Calibration input tuples per example: enough to exercise every observer, cheap enough for CI."""

BlockKind = Literal[
    "linear", "mlp", "matmul", "elementwise", "layer_norm", "rms_norm", "softmax", "reshape", "sdpa", "explicit"
]
BLOCK_KINDS: tuple[BlockKind, ...] = (
    "linear", "mlp", "matmul", "elementwise", "layer_norm", "rms_norm", "softmax", "reshape", "sdpa", "explicit"
)
ELEMENTWISE = ("relu", "gelu", "silu", "tanh", "sigmoid", "scale", "shift", "square")


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Block:
    """One shape-preserving ``(B, T, D) → (B, T, D)`` step of a random model.

    ``variant`` picks the spelling within a kind (which activation, which reshape, which mask); ``heads`` and
    ``kv_heads`` are used by attention (``kv_heads < heads``: GQA with HF's ``repeat_kv``); ``bias`` by the
    linears; ``residual``: ``x + block(x)`` instead of ``block(x)``.
    """

    kind: BlockKind
    variant: int = 0
    heads: int = 1
    kv_heads: int = 1
    bias: bool = False
    residual: bool = False


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a random model and its inputs: the printed recipe *is* the reproducer."""

    blocks: tuple[Block, ...]
    dim: int = 16
    batch: int = 1
    seq: int = 4
    head: int = 0  # 0: no output head; else a final linear named lm_head to this many features
    second_output: bool = False  # also return the hidden state before the head (or before the last block)
    dtype: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def inputs(self, index: int = 0) -> tuple[torch.Tensor]:
        """Example input ``index`` (0: the verifier's; 1..: calibration), seeded by the recipe."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + index + 1)
        x = torch.randn(self.batch, self.seq, self.dim, generator=generator)
        return (x.to(self.torch_dtype),)


class _RMSNorm(nn.Module):
    """LLaMA's RMSNorm, written out (``x * rsqrt(mean(x²) + eps) * g``, in fp32): the form smooth-quant and
    prune-channels(target=hidden) look for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h.type_as(x) * self.weight


class _Attention(nn.Module):
    """q/k/v/o projections around SDPA (``sdpa``) or hand-written attention (``explicit``).

    ``variant`` bits: 1 causal; 2 (explicit) scale by ``div`` instead of ``mul``; 4 (explicit) the mask as an
    additive bias instead of ``masked_fill``; 8 (explicit) softmax in fp32 with casts around it.
    """

    def __init__(self, block: Block, dim: int, seq: int) -> None:
        super().__init__()
        self.block = block
        self.head_dim = dim // block.heads
        kv_dim = self.head_dim * block.kv_heads
        self.q_proj = nn.Linear(dim, dim, bias=block.bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=block.bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=block.bias)
        self.o_proj = nn.Linear(dim, dim, bias=block.bias)
        self.register_buffer("tril", torch.tril(torch.ones(seq, seq, dtype=torch.bool)), persistent=False)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """HF's ``repeat_kv``: ``(B, kv, T, hd) → (B, H, T, hd)`` by unsqueeze → expand → reshape."""
        n_rep = self.block.heads // self.block.kv_heads
        if n_rep == 1:
            return t
        b, kv, s, hd = t.shape
        return t[:, :, None, :, :].expand(b, kv, n_rep, s, hd).reshape(b, kv * n_rep, s, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # (B, T, D)
        q = self.q_proj(x).view(b, s, self.block.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, s, self.block.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(b, s, self.block.kv_heads, self.head_dim).transpose(1, 2)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        causal = bool(self.block.variant & 1)
        if self.block.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            y = self._explicit(q, k, v, causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        variant = self.block.variant
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        scores = scores / math.sqrt(self.head_dim) if variant & 2 else scores * (1.0 / math.sqrt(self.head_dim))
        if causal:
            s = q.shape[-2]
            keep = self.tril[:s, :s]
            if variant & 4:
                scores = scores + torch.zeros_like(keep, dtype=scores.dtype).masked_fill(~keep, float("-inf"))
            else:
                scores = scores.masked_fill(keep == 0, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q) if variant & 8 else F.softmax(scores, dim=-1)
        return probs @ v


class _Mlp(nn.Module):
    """SwiGLU (``variant`` even: ``down(silu(gate(x)) * up(x))``, LLaMA) or GELU (odd: ``fc2(gelu(fc1(x)))``,
    GPT-2); hidden width ``2 * dim``."""

    def __init__(self, block: Block, dim: int) -> None:
        super().__init__()
        self.swiglu = block.variant % 2 == 0
        hidden = 2 * dim
        if self.swiglu:
            self.gate_proj = nn.Linear(dim, hidden, bias=block.bias)
            self.up_proj = nn.Linear(dim, hidden, bias=block.bias)
            self.down_proj = nn.Linear(hidden, dim, bias=block.bias)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=block.bias)
            self.fc2 = nn.Linear(hidden, dim, bias=block.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x)))


class _Step(nn.Module):
    """A parameter-free or single-parameter block: elementwise, matmul, softmax, reshape."""

    def __init__(self, block: Block, dim: int) -> None:
        super().__init__()
        self.block = block
        if block.kind == "matmul":
            self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, variant = self.block.kind, self.block.variant
        if kind == "matmul":
            return torch.matmul(x, self.weight)
        if kind == "softmax":
            return F.softmax(x, dim=-1)
        if kind == "reshape":
            b, s, d = x.shape
            h = self.block.heads
            if variant % 3 == 0:  # heads split and merged back, as attention does around its core
                return x.view(b, s, h, d // h).transpose(1, 2).contiguous().transpose(1, 2).reshape(b, s, d)
            if variant % 3 == 1:  # flatten tokens and back
                return x.reshape(b * s, d).view(b, s, d)
            return x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        name = ELEMENTWISE[variant % len(ELEMENTWISE)]
        if name == "scale":
            return x * 0.5
        if name == "shift":
            return x + 1.0
        if name == "square":
            return x * x
        return getattr(F, name)(x) if name in ("relu", "gelu", "silu") else getattr(torch, name)(x)


class FuzzModel(nn.Module):
    """The module a :class:`Recipe` describes: its blocks in order (each optionally residual), then an
    optional ``lm_head``; returns the output, or ``(output, hidden)`` with ``second_output``."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        blocks: list[nn.Module] = []
        for block in recipe.blocks:
            if block.kind in ("sdpa", "explicit"):
                blocks.append(_Attention(block, recipe.dim, recipe.seq))
            elif block.kind == "mlp":
                blocks.append(_Mlp(block, recipe.dim))
            elif block.kind == "linear":
                blocks.append(nn.Linear(recipe.dim, recipe.dim, bias=block.bias))
            elif block.kind == "layer_norm":
                blocks.append(nn.LayerNorm(recipe.dim, elementwise_affine=block.variant % 2 == 0))
            elif block.kind == "rms_norm":
                blocks.append(_RMSNorm(recipe.dim))
            else:
                blocks.append(_Step(block, recipe.dim))
        self.layers = nn.ModuleList(blocks)
        self.lm_head = nn.Linear(recipe.dim, recipe.head, bias=False) if recipe.head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        for block, layer in zip(self.recipe.blocks, self.layers):
            x = x + layer(x) if block.residual else layer(x)
        out = self.lm_head(x) if self.lm_head is not None else x
        return (out, x) if self.recipe.second_output else out


def build_model(recipe: Recipe) -> FuzzModel:
    """The recipe's model with seeded weights (norm scales perturbed so smoothing has something to move),
    in the recipe's dtype, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = FuzzModel(recipe)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("weight") and param.dim() == 1:  # norm scales: not all ones
                    param.copy_(1 + 0.2 * torch.randn_like(param))
    return model.to(recipe.torch_dtype).eval()


# ------------------------------------------------------------------------------------------------ checking


class FuzzFailure(AssertionError):
    """An invariant broke; the message names it and the example (recipe and pipeline) that broke it."""


@dataclass
class Outcome:
    """What one example did: per-pass outcome labels (``ok``, ``ok:unchanged``, ``refused:...``,
    ``rolled-back:...``, ``crash:...``), the findings (a pass misbehaved, contained by the manager) and the
    failures (an invariant of the framework broke)."""

    pipeline: str
    labels: list[tuple[str, str]] = field(default_factory=list)  # (pass name, label)
    findings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    capture_failed: str | None = None


def classify(record: PassRecord) -> str:
    """A record's outcome as a short label: ``ok``, ``ok:unchanged``, ``refused:precondition`` /
    ``refused:pass-error`` (clean refusals), ``rolled-back:<reason>`` (the verifier rejected it; reasons:
    ``lossless-mismatch``, ``lossy-guard``, ``new-nonfinite``, ``quant-scale``, ``interface``, ``meta``, ``lint``) or
    ``crash:<ExceptionType>`` (anything else raised inside the pass)."""
    if record.status == "ok":
        return "ok" if record.modified else "ok:unchanged"
    error = record.error or ""
    kind, _, message = error.partition(": ")
    if kind == PreconditionError.__name__:
        return "refused:precondition"
    if kind in (PassError.__name__, "PassFailure"):
        return "refused:pass-error"
    if kind == VerificationError.__name__:
        for needle, reason in (
            ("changed (rtol", "lossless-mismatch"),
            ("NaN/Inf values", "new-nonfinite"),
            ("moved by", "lossy-guard"),
            ("NaN, Inf or <= 0", "quant-scale"),
            ("outputs, it returned", "interface"),
            ("changed from", "interface"),
            ("meta['val']", "meta"),
            ("propagates shapes", "meta"),
            ("lint", "lint"),
            ("reads attribute", "lint"),
        ):
            if needle in message:
                return f"rolled-back:{reason}"
        return "rolled-back:other"
    return f"crash:{kind or 'unknown'}"


ACCEPTABLE = ("ok", "ok:unchanged", "refused:precondition", "refused:pass-error", "rolled-back:lossy-guard")
"""Labels a random model may rightly get; every other label is a finding."""


@dataclass
class _Accepted:
    """What the recording hook saw of one ``ok`` pass."""

    pass_: Pass
    before: list[torch.Tensor]
    after: list[torch.Tensor]
    graph: fx.GraphModule  # a copy of the pass's output (tensors shared)
    tolerance: tuple[float, float] | None  # lossless: (rtol, atol) as the pass declares for this graph


class _RecordingHook(Hook):
    """Runs after :class:`VerifyHook`, so it sees only passes the verifier accepted: keeps their outputs and
    a copy of their graph, and checks, before every pass, that the graph is the last accepted one (a skipped
    pass was rolled back without a trace)."""

    def __init__(self, inputs: tuple[object, ...]) -> None:
        self.inputs = inputs
        self.steps: list[_Accepted] = []
        self.problems: list[str] = []
        self._last_code = ""
        self._last_outputs: list[torch.Tensor] = []

    def start(self, gm: fx.GraphModule, ctx: Context, baseline: dict[str, object]) -> None:
        self._last_code = gm.code
        self._last_outputs = run_graph(gm, self.inputs)

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: Context) -> None:
        if gm.code != self._last_code:
            self.problems.append(f"before '{pass_.spec}': the graph is not the last accepted pass's output "
                                 "(a skipped pass left a trace)")
            return
        outputs = run_graph(gm, self.inputs)
        if not _bitwise_equal(outputs, self._last_outputs):
            self.problems.append(f"before '{pass_.spec}': same code, other outputs than the last accepted pass's "
                                 "(a skipped pass changed a tensor in place)")

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        outputs = run_graph(after, self.inputs)
        tolerance = None if pass_.lossy else pass_.tolerance(before, self._last_outputs)
        self.steps.append(_Accepted(pass_, self._last_outputs, outputs, copy_graph_module(after), tolerance))
        self._last_code, self._last_outputs = after.code, outputs


def _bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(
        torch.nan_to_num(x.double(), nan=1.5e300), torch.nan_to_num(y.double(), nan=1.5e300)) for x, y in zip(a, b))


def _floats(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().double() for t in tensors]


def _interface_error(label: str, want: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> str | None:
    """Why ``got`` does not stand in for ``want`` before any tolerance applies: another output count, shape
    or dtype, or NaN/Inf where ``want`` is finite."""
    if len(want) != len(got):
        return f"{label}: {len(want)} outputs became {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w.shape != g.shape or w.dtype != g.dtype:
            return f"{label}: output {i} changed from {w.dtype}{list(w.shape)} to {g.dtype}{list(g.shape)}"
        if w.is_floating_point() and bool((~torch.isfinite(g) & torch.isfinite(w)).any()):
            return f"{label}: output {i} gained NaN/Inf"
    return None


def step_error(step: _Accepted) -> str | None:
    """Why an accepted pass should not have been accepted (None: within its declared bound)."""
    label = step.pass_.spec
    if (problem := _interface_error(label, step.before, step.after)) is not None:
        return problem
    for i, (want, got) in enumerate(zip(step.before, step.after)):
        if not want.is_floating_point():
            if not torch.equal(want, got) and step.tolerance is not None:
                return f"{label}: integer output {i} changed"
            continue
        w, g = want.double(), got.double()
        finite = torch.isfinite(w)
        if step.tolerance is not None:
            rtol, atol = step.tolerance
            excess = (g - w).abs() - (atol + rtol * w.abs())
            if bool((excess[finite] > 0).any()):
                return f"{label}: output {i} moved by {float((g - w)[finite].abs().max()):.3g}, beyond " \
                       f"its declared rtol={rtol}, atol={atol}"
        elif step.pass_.max_rel_err is not None and bool(finite.any()):
            scale = max(float(w[finite].abs().max()), torch.finfo(torch.float32).tiny)
            moved = float((g - w)[finite].abs().max()) / scale
            if moved > step.pass_.max_rel_err:
                return f"{label}: output {i} moved by {moved:.1%} of its scale, beyond max_rel_err " \
                       f"{step.pass_.max_rel_err}"
    return None


CAPTURE_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-6)}
"""Eager model vs its captured graph: the same ATen ops, at most reordered by export (fp32: 1e-5; bf16: two
of bf16's 2^-7 steps — eager and the graph may round an intermediate at different points)."""


def derived_bound(
    original: Sequence[torch.Tensor], steps: Sequence[_Accepted], capture_tol: tuple[float, float]
) -> list[torch.Tensor] | None:
    """Per output, the elementwise bound on ``|final − original|`` that the accepted passes promise.

    By the triangle inequality over the chain eager → captured → pass 1 → … → pass n: the capture contributes
    ``atol + rtol·|o₀|``; a lossless pass ``i`` contributes ``atol_i + rtol_i·|o_{i−1}|``, where
    ``|o_{i−1}| ≤ |o₀| + B_{i−1}`` (``B``: the bound so far); a lossy pass with a collapse guard contributes
    ``max_rel_err_i · max|o_{i−1}|`` to every element (the guard bounds the largest move by a fraction of the
    largest magnitude). A lossy pass without a guard (``prune-channels``, ``local-attention``, ``distill``)
    promises no bound: None (the final graph must still run, keep the interface and add no NaN/Inf).
    """
    magnitude = [t.abs() for t in _floats(original)]
    rtol, atol = capture_tol
    bound = [atol + rtol * m for m in magnitude]
    for step in steps:
        if step.tolerance is not None:
            rtol, atol = step.tolerance
            bound = [b + atol + rtol * (m + b) for b, m in zip(bound, magnitude)]
        elif step.pass_.max_rel_err is not None:
            bound = [b + step.pass_.max_rel_err * float((m + b).max()) if m.numel() else b
                     for b, m in zip(bound, magnitude)]
        else:
            return None
    return bound


def _final_error(original: Sequence[torch.Tensor], final: Sequence[torch.Tensor],
                 bound: Sequence[torch.Tensor] | None) -> str | None:
    if (problem := _interface_error("the final graph", original, final)) is not None or bound is None:
        return problem
    for i, (want, got) in enumerate(zip(original, final)):
        if not want.is_floating_point():
            continue
        w, g = want.double(), got.double()
        finite = torch.isfinite(w)
        excess = (g - w).abs() - bound[i] * (1 + 1e-9) - 1e-12
        if bool((excess[finite] > 0).any()):
            worst = float(excess[finite].max())
            return f"final output {i} is {worst:.3g} beyond the bound derived from the passes that ran"
    return None


def _tensors_snapshot(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in gm.state_dict(keep_vars=True).items()}


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], ctx: Context,
                 hooks: Sequence[Hook] = ()) -> PipelineResult:
    """``passes`` under the verifier (then ``hooks``) with ``on_error="skip"``: what :func:`check` runs."""
    return PassManager(passes, hooks=[VerifyHook(), *hooks], on_error="skip").run(gm, ctx)


def _context(recipe: Recipe) -> Context:
    """Example inputs plus whole calibration tuples (``calib_inputs``): calibration-driven passes need no
    token stream, so they run on models that take no tokens."""
    return Context(example_inputs=recipe.inputs(0),
                   calib_inputs=[recipe.inputs(i) for i in range(1, CALIB_WINDOWS + 1)])


def check(recipe: Recipe, passes: Sequence[Pass]) -> Outcome:
    """Run one example and check every property in the module docstring; never raises for a property (the
    caller decides): ``Outcome.failures`` and ``Outcome.findings`` say what broke."""
    outcome = Outcome(pipeline=",".join(p.spec for p in passes))
    model = build_model(recipe)
    inputs = recipe.inputs(0)
    with torch.inference_mode():
        eager = model(*inputs)
    eager_out = [t for t in torch.utils._pytree.tree_flatten(eager)[0] if isinstance(t, torch.Tensor)]
    try:
        gm = capture(model, inputs, name="fuzz")
    except Exception as exc:  # noqa: BLE001 - reported with the recipe: a capture failure is the generator's bug
        outcome.capture_failed = f"{type(exc).__name__}: {exc}"
        outcome.failures.append(f"capture failed: {outcome.capture_failed}")
        return outcome
    code, tensors = gm.code, _tensors_snapshot(gm)

    hook = _RecordingHook(inputs)
    result = run_pipeline(gm, passes, _context(recipe), [hook])
    outcome.failures.extend(hook.problems)
    outcome.failures.extend(_record_problems(result, passes))
    for record in result.records:
        label = classify(record)
        outcome.labels.append((record.name, label))
        if label not in ACCEPTABLE:
            outcome.findings.append(f"{record.spec}: {label}: {(record.error or '')[:300]}")
    for step in hook.steps:
        if (problem := step_error(step)) is not None:
            outcome.failures.append(f"accepted although out of bounds: {problem}")

    final = result.graph
    try:
        lint(final)
        check_meta(final)
        check_quant_params(final)
        final_out = run_graph(final, inputs)
    except Exception as exc:  # noqa: BLE001 - any way the final graph fails is the failure reported
        outcome.failures.append(f"the final graph does not verify or run: {type(exc).__name__}: {exc}")
        return outcome
    capture_tol = CAPTURE_TOLERANCE[recipe.torch_dtype]
    if (problem := _final_error(eager_out, final_out, derived_bound(eager_out, hook.steps, capture_tol))):
        outcome.failures.append(problem)

    outcome.failures.extend(_idempotence_problems(recipe, passes, result, hook.steps))
    if gm.code != code or not _same_tensors(tensors, _tensors_snapshot(gm)):
        outcome.failures.append("the caller's graph changed (INVARIANTS.md items 5 and 6)")
    return outcome


def _record_problems(result: PipelineResult, passes: Sequence[Pass]) -> list[str]:
    """One record per pass, in order; ``ok`` has no error, anything else has one."""
    problems = []
    if [r.spec for r in result.records] != [p.spec for p in passes]:
        problems.append(f"records {[r.spec for r in result.records]} do not match the pipeline")
    for r in result.records:
        if r.status == "ok" and r.error:
            problems.append(f"{r.spec}: status ok but error {r.error!r}")
        if r.status != "ok" and not r.error:
            problems.append(f"{r.spec}: status {r.status} without an error naming why")
    return problems


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _idempotence_problems(
    recipe: Recipe, passes: Sequence[Pass], first: PipelineResult, steps: Sequence[_Accepted]
) -> list[str]:
    """Each accepted pass again on its own output; then the whole pipeline again on the result."""
    problems = []
    for step in steps:
        if step.pass_.name in NOT_IDEMPOTENT:
            continue
        again = run_pipeline(step.graph, [step.pass_], _context(recipe)).records[0]
        if again.status == "ok" and again.modified:
            problems.append(f"not idempotent: '{step.pass_.spec}' changed its own output again ({again.stats})")
        elif again.status != "ok":
            problems.append(f"'{step.pass_.spec}' fails on its own output: {again.error}")
    second = run_pipeline(first.graph, passes, _context(recipe))
    changed_later = [r.status == "ok" and r.modified for r in first.records]
    for i, record in enumerate(second.records):
        if not (record.status == "ok" and record.modified) or record.name in NOT_IDEMPOTENT:
            continue
        order_effect = any(changed_later[i + 1:]) or any(
            r.status == "ok" and r.modified for r in second.records[:i])
        if not order_effect:
            problems.append(f"second run of the pipeline: '{record.spec}' changed the result again "
                            f"({record.stats})")
    return problems


# ------------------------------------------------------------------------------------------------ strategies


def _option_strategies() -> dict[str, Callable[[DrawFn], dict[str, object]]]:
    """Per pass, a function drawing a few valid options (``{}``: defaults). Calibration window counts are
    kept at :data:`CALIB_WINDOWS`; options that need a language model (taylor importance, the sensitivity
    schedule, distill's token windows) are drawn rarely: their clean refusal is an outcome too."""
    from hypothesis import strategies as st

    def pick(draw: DrawFn, values: Sequence[object]) -> object:
        return draw(st.sampled_from(list(values)))

    def cleanup(draw: DrawFn) -> dict[str, object]:
        return {"fold": draw(st.booleans()), "cse": draw(st.booleans())}

    def cast(draw: DrawFn) -> dict[str, object]:
        return {"dtype": pick(draw, ("bf16", "fp16"))}

    def local_attention(draw: DrawFn) -> dict[str, object]:
        return {"window": draw(st.integers(1, 6)), "sinks": draw(st.integers(0, 2))}

    def smooth_quant(draw: DrawFn) -> dict[str, object]:
        return {"alpha": pick(draw, (0.25, 0.5, 0.85)), "search": draw(st.booleans()),
                "calib_windows": CALIB_WINDOWS}

    def quantize(draw: DrawFn) -> dict[str, object]:
        options: dict[str, object] = {"scheme": pick(draw, ("w8", "w4", "w8a8", "w8a8-static", "fp8")),
                                      "calib_windows": CALIB_WINDOWS}
        if options["scheme"] == "w4":
            options["group_size"] = pick(draw, (8, 16, 32, 128))
        if options["scheme"] == "w8a8-static":
            options["observer"] = pick(draw, ("minmax", "moving-average", "percentile", "mse", "entropy"))
        if draw(st.booleans()):
            options["skip"] = ""
        return options

    def gptq(draw: DrawFn) -> dict[str, object]:
        return {"damp": pick(draw, (0.01, 0.1)), "calib_windows": CALIB_WINDOWS}

    def lower_quant(draw: DrawFn) -> dict[str, object]:
        return {"guard": draw(st.booleans()), "prefer": pick(draw, ("size", "speed"))}

    def prune_channels(draw: DrawFn) -> dict[str, object]:
        target = pick(draw, ("mlp", "heads", "hidden"))
        importance = pick(draw, ("l1", "l2", "wanda", "l2", "taylor") if target != "hidden" else ("l1", "l2"))
        return {"target": target, "ratio": pick(draw, (0.25, 0.5)), "importance": importance,
                "multiple": pick(draw, (0, 1, 2)), "calib_windows": CALIB_WINDOWS}

    def sparsify(draw: DrawFn) -> dict[str, object]:
        pattern = pick(draw, ("unstructured", "2:4"))
        return {"pattern": pattern, "ratio": 0.5 if pattern == "2:4" else pick(draw, (0.25, 0.5, 0.75)),
                "method": pick(draw, ("magnitude", "wanda", "sparsegpt")), "blocksize": pick(draw, (4, 8, 128)),
                "calib_windows": CALIB_WINDOWS, "skip": pick(draw, ("lm_head*", ""))}

    def distill(draw: DrawFn) -> dict[str, object]:
        return {"steps": 2, "eval_every": 1, "eval_windows": 1, "batch_size": 1}

    return {
        "cleanup": cleanup, "cast": cast, "local-attention": local_attention, "smooth-quant": smooth_quant,
        "quantize": quantize, "gptq": gptq, "lower-quant": lower_quant, "prune-channels": prune_channels,
        "sparsify": sparsify, "distill": distill,
    }


RARE_PASSES = frozenset({"distill"})
"""Drawn with a tenth of the others' weight: on a model without token inputs they can only refuse."""


def recipes() -> SearchStrategy[Recipe]:
    """Random small models: 1–5 blocks (attention and MLPs twice as likely as the others), dim 8–32, 1–4
    heads, batch 1–2, 1–6 tokens, an optional head and second output, fp32 or (one in four) bf16."""
    from hypothesis import strategies as st

    @st.composite
    def draw_recipe(draw: DrawFn) -> Recipe:
        dim = draw(st.sampled_from([8, 16, 32]))
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim // h >= 4]))
        blocks = draw(st.lists(_blocks(dim, heads), min_size=1, max_size=5))
        return Recipe(
            blocks=tuple(blocks),
            dim=dim,
            batch=draw(st.integers(1, 2)),
            seq=draw(st.integers(1, 6)),
            head=draw(st.sampled_from([0, 0, dim, 2 * dim])),
            second_output=draw(st.booleans()),
            dtype=draw(st.sampled_from(["fp32", "fp32", "fp32", "bf16"])),
            seed=draw(st.integers(0, 2**16)),
        )

    return draw_recipe()


def _blocks(dim: int, heads: int) -> SearchStrategy[Block]:
    from hypothesis import strategies as st

    kv = st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])
    return st.builds(
        Block,
        kind=st.sampled_from((*BLOCK_KINDS, "sdpa", "explicit", "mlp")),  # the blocks most passes rewrite: 2x
        variant=st.integers(0, 15),
        heads=st.just(heads),
        kv_heads=kv,
        bias=st.booleans(),
        residual=st.booleans(),
    )


def pipelines(names: Sequence[str] | None = None, max_size: int = 4) -> SearchStrategy[list[Pass]]:
    """Random pipelines of 1–``max_size`` of passforge's registered passes (``names``: only these), each with
    default options or a few valid random ones."""
    from hypothesis import strategies as st

    from passforge.passes.registry import available

    registry = {name: cls for name, cls in available().items() if cls.__module__.startswith("passforge.")}
    # passforge's own passes: tests register deliberately broken ones (one even presses Ctrl-C)
    chosen = [n for n in registry if names is None or n in names]
    weighted = [n for n in chosen for _ in range(1 if n in RARE_PASSES else 10)]
    options = _option_strategies()

    def make(draw: DrawFn, name: str) -> Pass:
        cls = registry[name]
        drawn = options[name](draw) if name in options and draw(st.booleans()) else {}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in drawn.items() if k in fields})

    @st.composite
    def draw_passes(draw: DrawFn) -> list[Pass]:
        """One pass, half the time after the pass it works on (a random order would mostly refuse)."""
        name = draw(st.sampled_from(weighted))
        needs = [n for n in PREREQUISITES.get(name, ()) if n in registry and (names is None or n in names)]
        before = [make(draw, n) for n in needs] if needs and draw(st.booleans()) else []
        return [*before, make(draw, name)]

    return st.lists(draw_passes(), min_size=1, max_size=max_size).map(lambda parts: [p for ps in parts for p in ps])


PREREQUISITES: dict[str, tuple[str, ...]] = {
    "local-attention": ("fuse-attention",),
    "gptq": ("quantize",),
    "fold-quant": ("quantize",),
    "lower-quant": ("quantize", "fold-quant"),
}
"""The passes a pass rewrites the output of: drawn in front of it half the time."""


# ------------------------------------------------------------------------------------------------ long mode


@dataclass
class Summary:
    """Counts over many examples, for the long mode's report."""

    examples: int = 0
    passes: Counter[str] = field(default_factory=Counter)  # pass name -> times drawn
    labels: Counter[str] = field(default_factory=Counter)  # outcome label -> count
    by_pass: Counter[tuple[str, str]] = field(default_factory=Counter)  # (pass, label) -> count
    findings: list[tuple[str, str, Recipe]] = field(default_factory=list)  # (message, pipeline, recipe)
    failures: list[tuple[str, str, Recipe]] = field(default_factory=list)

    def add(self, recipe: Recipe, outcome: Outcome) -> None:
        self.examples += 1
        for name, label in outcome.labels:
            self.passes[name] += 1
            self.labels[label] += 1
            self.by_pass[name, label] += 1
        self.findings.extend((f, outcome.pipeline, recipe) for f in outcome.findings)
        self.failures.extend((f, outcome.pipeline, recipe) for f in outcome.failures)

    def render(self) -> str:
        lines = [f"examples: {self.examples}", f"passes run: {sum(self.passes.values())}"]
        lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        not_ok = sorted((k, v) for k, v in self.by_pass.items() if not k[1].startswith("ok"))
        lines.append("not applied, by pass and reason:")
        lines.extend(f"  {name}: {label} {count}" for (name, label), count in not_ok)
        for title, items in (("findings", self.findings), ("failures", self.failures)):
            kinds = Counter(_kind(message) for message, _, _ in items)
            lines.append(f"{title}: {len(items)}")
            for kind, count in kinds.most_common():
                message, pipeline, recipe = next(i for i in items if _kind(i[0]) == kind)
                lines.append(f"  {count} × {message[:400]}")
                lines.append(f"      pipeline: {pipeline}")
                lines.append(f"      recipe: {recipe!r}")
        return "\n".join(lines)


def _kind(message: str) -> str:
    """Groups messages that differ only in numbers and node names: the pass spec and the first words."""
    return " ".join(message.split()[:4])


def fuzz(examples: int, seed: int, on_example: Callable[[Recipe, Outcome], None] | None = None) -> Summary:
    """Run ``examples`` random examples (seeded); collect every outcome instead of stopping at the first
    failure (no shrinking: each finding is printed with its full recipe and pipeline, which reproduce it)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    summary = Summary()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(recipe=recipes(), passes=pipelines())
    def one(recipe: Recipe, passes: list[Pass]) -> None:
        outcome = check(recipe, passes)
        summary.add(recipe, outcome)
        if on_example is not None:
            on_example(recipe, outcome)

    one()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m passforge.tools.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print one line per example")
    args = parser.parse_args(argv)

    def progress(recipe: Recipe, outcome: Outcome) -> None:
        if args.verbose:
            flag = "FAIL" if outcome.failures else "find" if outcome.findings else "ok  "
            print(f"{flag} {outcome.pipeline}  [{', '.join(label for _, label in outcome.labels)}]", flush=True)

    torch.set_num_threads(1)
    start = time.perf_counter()
    summary = fuzz(args.examples, args.seed, progress)
    elapsed = time.perf_counter() - start
    print(f"passforge fuzz: seed {args.seed}, {elapsed:.0f} s, torch {torch.__version__}, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip())
    print(summary.render())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
