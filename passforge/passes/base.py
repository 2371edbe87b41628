"""What a pass is: a frozen dataclass whose fields are its options and whose ``name`` is its pipeline key.

    @register
    @dataclass(frozen=True)
    class Cast(Pass):
        name: ClassVar[str] = "cast"
        lossy: ClassVar[bool] = True
        dtype: Literal["bf16", "fp16"] = "bf16"

        def run(self, gm, ctx): ...          # returns PassResult(gm, modified=..., stats=...)

``Cast(dtype="fp16").spec == "cast(dtype=fp16)"`` and ``PassManager.parse("cast(dtype=fp16)")`` builds it back.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import fx


class PassError(RuntimeError):
    """A pass failed; carries the pass's spec and the specs of the passes that ran before it."""

    def __init__(self, message: str, *, pass_spec: str = "", before: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.pass_spec = pass_spec
        self.before = tuple(before)


class PreconditionError(PassError):
    """The graph is not something this pass can work on (e.g. no example inputs for a pass that needs them)."""


@dataclass
class Context:
    """What passes, hooks and the profiler may read besides the graph.

    ``example_inputs`` are the flat inputs the graph is called with; ``calib_tokens`` and ``eval_tokens`` are
    1-D int64 token streams (for calibration-driven passes and perplexity); ``repro_dir`` is where a failing
    pass leaves its reproducer (none written when unset); ``role`` says which graph of a model this is —
    ``forward``, or ``prefill`` / ``decode`` for the generation graphs — so a pass can treat a one-token
    decode step differently from a compute-bound prefill. ``memo`` holds what a calibration-driven pass
    computed on one graph of a model (smoothing factors, activation ranges, GPTQ weights), keyed by weight
    name, so the same model's other graphs (prefill, decode) reuse it: all of them then compute the same
    function, and calibration runs once. ``calib_inputs``, when set, are whole input tuples to calibrate on
    instead of token windows (the ``torch.compile`` backend records a graph's first real calls there, which
    also calibrates graphs that take no tokens). ``teacher`` is the graph the pipeline started from — the
    original model — which ``distill`` (its default teacher) and the profiler may read; nothing modifies it
    (:meth:`PassManager.run` sets it to the caller's graph when unset). ``interrupted`` is set by a pass that
    stopped its own loop early on Ctrl-C and kept its best result: the manager stops the pipeline after it.
    ``interface_change`` is set by the manager while its hooks check a pass that resized the graph's state
    (:class:`InterfaceChange`), and None otherwise.
    """

    example_inputs: tuple[object, ...] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calib_tokens: torch.Tensor | None = None
    calib_inputs: list[tuple[object, ...]] | None = None
    eval_tokens: torch.Tensor | None = None
    repro_dir: Path | None = None
    role: Literal["forward", "prefill", "decode"] = "forward"
    memo: dict[str, object] = field(default_factory=dict)
    teacher: fx.GraphModule | None = None
    interrupted: bool = False
    interface_change: InterfaceChange | None = None


@dataclass(frozen=True)
class ResizedState:
    """A state tensor stacked along dim 0, one slot per layer (a KV cache ``(L, B, nkv, S, hs)``), of which
    slot ``s`` keeps the elements ``kept[s]`` along ``dim`` (a dim of the stacked tensor), first, zero-padded
    to the widest slot's count (layers that keep fewer heads than others)."""

    dim: int
    kept: tuple[torch.Tensor, ...]

    def restrict(self, full: torch.Tensor) -> torch.Tensor:
        """The kept part of a tensor of the old shape: what the resized graph takes or returns in its place."""
        if full.dim() <= self.dim or full.shape[0] != len(self.kept):
            raise ValueError(f"a state of {len(self.kept)} slots resized along dim {self.dim} cannot take a "
                             f"tensor of shape {tuple(full.shape)}")
        from passforge.ir.graph import high_pad

        width = max(len(k) for k in self.kept)
        return torch.stack([
            torch.nn.functional.pad(full[s].index_select(self.dim - 1, k.to(full.device)),
                                    high_pad(full.dim() - 1, self.dim - 1, width - len(k)))
            for s, k in enumerate(self.kept)
        ])


@dataclass(frozen=True)
class InterfaceChange:
    """What a pass that resized a graph's state — a KV cache's heads after pruning heads — declares: the one
    exception to "passes keep the interface" (``ir/INVARIANTS.md`` rule 9), allowed on generation step graphs
    only (``Context.role`` prefill or decode). ``inputs`` and ``outputs`` map the positions of the resized
    inputs and outputs to what each keeps. The manager gives the later passes and the hooks the new example
    inputs (each the kept part of the old one; restored on rollback); the verifier runs the graph before on
    ``inputs_before`` (filled in by the manager) and the graph after on the new inputs, and compares every
    output, a resized one by its kept part."""

    inputs: dict[int, ResizedState] = field(default_factory=dict)
    outputs: dict[int, ResizedState] = field(default_factory=dict)
    inputs_before: tuple[object, ...] = ()


@dataclass
class PassResult:
    """What a pass hands back: the graph (usually the one it was given, changed in place), whether anything
    changed, counters (``{"cse": 12, "folded": 3}``) and notes (why it chose what it did) for the report."""

    graph: fx.GraphModule
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interface: InterfaceChange | None = None  # only a pass that resized a step graph's state (its KV cache)


@dataclass(frozen=True)
class Pass(ABC):
    """A named graph transformation; subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str]
    lossy: ClassVar[bool] = False
    # Tolerance of the verifier's before/after comparison for lossless passes (float reassociation only).
    rtol: ClassVar[float] = 1e-5
    atol: ClassVar[float] = 1e-5
    # Lossy passes: the verifier's collapse guard, max |after - before| / max |before| per output (None: off).
    max_rel_err: ClassVar[float | None] = None

    @property
    def needs_calibration(self) -> bool:
        """True when this pass, as configured, reads calibration data (``Context.calib_tokens`` or
        ``calib_inputs``); callers that have none can then collect it first."""
        return False

    @abstractmethod
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        """Transform ``gm`` (in place or into a new module) and report what changed."""

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """``(rtol, atol)`` for the verifier's before/after comparison of a lossless pass; override when the
        bound depends on the graph (e.g. the precision it computes in)."""
        return self.rtol, self.atol

    @property
    def spec(self) -> str:
        """The pipeline text that rebuilds this pass: its name plus every option that differs from default."""
        options = [
            f"{f.name}={_format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.init and getattr(self, f.name) != _default_of(f)
        ]
        return f"{self.name}({','.join(options)})" if options else self.name

    @classmethod
    def doc(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "")


BF16_ULP = 2**-7  # bf16's relative step (8 significant bits): the unit low-precision tolerances are given in


def computes_in_low_precision(gm: fx.GraphModule) -> bool:
    """True when some value in ``gm`` is bf16 or fp16: its results carry low-precision rounding."""
    return any(getattr(n.meta.get("val"), "dtype", None) in (torch.bfloat16, torch.float16) for n in gm.graph.nodes)


def output_scale(expected: Sequence[torch.Tensor]) -> float:
    """The largest magnitude among the floating outputs: what absolute tolerances are a fraction of (float8
    outputs read in fp32: torch has no abs / max for them)."""
    return max((float((t.float() if t.element_size() == 1 else t).abs().max())
                for t in expected if t.is_floating_point() and t.numel()), default=1.0)


def _default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ";".join(_format_value(v) for v in value)
    text = str(value)
    return text if _BARE_WORD.fullmatch(text) else repr(text)  # quoted when empty or holding , ( ) = etc.


_BARE_WORD = re.compile(r"[A-Za-z0-9_.\-+*/:;]+")
