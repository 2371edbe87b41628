"""The pass manager: runs a pipeline of passes with one hook mechanism and a rollback-on-failure policy.

    pm = PassManager.parse("cleanup,cast(dtype=bf16)", hooks=[VerifyHook(), ProfileHook(...)])
    result = pm.run(gm, ctx)          # result.graph, result.records (one PassRecord per pass)

Each pass runs on the current graph while the manager keeps a snapshot of it (graph structure copied, tensors
shared — passes never mutate tensors in place). If the pass raises, or a hook's ``after_pass`` raises (the
verifier does when the graph is broken), the snapshot is restored, the record says ``rolled_back``, a
reproducer is written when the context names a folder for it, and the pipeline stops (``on_error="stop"``,
raising :class:`PassFailure`) or carries on without the pass (``on_error="skip"``).

Ctrl-C is not a failure but it is handled the same way: the running pass is rolled back and
:class:`PipelineInterrupted` carries the graph after the passes that completed, so the caller can keep it. A
pass with a long loop of its own (``distill``'s training) may instead stop early on Ctrl-C, keep its best
result and set ``ctx.interrupted``: the manager then stops after that pass, with the pass kept.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from passforge.ir.graph import PASS_META, copy_graph_module, propagate_meta
from passforge.passes.base import Context, InterfaceChange, Pass, PassError
from passforge.passes.spec import format_pipeline, parse_pipeline

Status = Literal["ok", "rolled_back", "skipped", "interrupted"]
OnError = Literal["stop", "skip"]


@dataclass
class PassRecord:
    """One pass's row: what ran, how it ended, its own time, its counters, and what hooks measured."""

    name: str
    spec: str
    lossy: bool
    status: Status = "ok"
    time_s: float | None = None
    modified: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, object] = field(default_factory=dict)
    error: str | None = None
    reproducer: str | None = None


@dataclass
class PipelineResult:
    graph: fx.GraphModule
    pipeline: str
    records: list[PassRecord]
    baseline: dict[str, object] = field(default_factory=dict)


class PassFailure(PassError):
    """A pass failed under ``on_error="stop"``; ``partial`` holds the pipeline up to (not including) it."""

    def __init__(self, message: str, *, pass_spec: str, before: Sequence[str], partial: PipelineResult) -> None:
        super().__init__(message, pass_spec=pass_spec, before=before)
        self.partial = partial


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pipeline. ``partial`` holds the graph after the last pass that completed (the one that
    was running is rolled back, unless it stopped itself and kept its best result: see the module docstring).
    ``optimized`` is filled by :func:`passforge.api.optimize` with that graph ready to save."""

    def __init__(self, message: str, *, partial: PipelineResult) -> None:
        super().__init__(message)
        self.partial = partial
        self.optimized: object | None = None

    def __str__(self) -> str:
        return str(self.args[0])


class Hook:
    """Called around every pass. The one mechanism for timing, verification, dumps and profiling.

    ``after_pass`` may raise to reject the pass: the manager then rolls it back.
    """

    def start(self, gm: fx.GraphModule, ctx: Context, baseline: dict[str, object]) -> None:
        """Once, on the captured graph, before the first pass; may fill ``baseline``."""

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: Context) -> None:
        """Before ``pass_`` runs on ``gm``."""

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        """After ``pass_`` turned ``before`` into ``after``; write figures into ``record.metrics``."""

    def finish(self, result: PipelineResult, ctx: Context) -> None:
        """Once, after the last pass (or the pass that stopped the pipeline); may complete the records."""


class PassManager:
    """An ordered list of passes plus hooks; see the module docstring for the failure policy."""

    def __init__(self, passes: Sequence[Pass], *, hooks: Sequence[Hook] = (), on_error: OnError = "stop") -> None:
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        self.passes = list(passes)
        self.hooks = list(hooks)
        self.on_error = on_error

    @classmethod
    def parse(cls, spec: str, *, hooks: Sequence[Hook] = (), on_error: OnError = "stop") -> PassManager:
        return cls(parse_pipeline(spec), hooks=hooks, on_error=on_error)

    @property
    def spec(self) -> str:
        return format_pipeline(self.passes)

    def run(self, gm: fx.GraphModule, ctx: Context | None = None) -> PipelineResult:
        """Run every pass on a copy of ``gm`` (the caller's graph is never changed). Unless the context names
        one already, ``gm`` becomes ``ctx.teacher``: the original model that ``distill`` trains towards."""
        ctx = ctx or Context()
        if ctx.teacher is not None:
            return self._run(gm, ctx)
        ctx.teacher = gm
        try:
            return self._run(gm, ctx)
        finally:
            ctx.teacher = None  # this run's original: a later run on another model must not train towards it

    def _run(self, gm: fx.GraphModule, ctx: Context) -> PipelineResult:
        work = copy_graph_module(gm)
        result = PipelineResult(graph=work, pipeline=self.spec, records=[])
        for hook in self.hooks:
            try:
                hook.start(work, ctx, result.baseline)
            except Exception as exc:
                raise PassError(
                    f"before any pass, {type(hook).__name__} failed on the captured graph: {type(exc).__name__}: "
                    f"{exc}\n  check that the example inputs run through the model"
                ) from exc
        for pass_ in self.passes:
            record = PassRecord(name=pass_.name, spec=pass_.spec, lossy=pass_.lossy)
            result.records.append(record)
            snapshot = copy_graph_module(work)
            memo = dict(ctx.memo)  # what a pass remembers for the model's other graphs is rolled back with it
            inputs = ctx.example_inputs  # and the inputs, which a pass changing the graph's state replaces
            try:
                work = self._run_one(pass_, work, snapshot, ctx, record)
            except KeyboardInterrupt:
                _roll_back(ctx, memo, inputs, record)
                record.status, result.graph = "interrupted", snapshot
                what = f"'{pass_.spec}' was rolled back"
                raise PipelineInterrupted(_interrupted_message(result, what), partial=result) from None
            except Exception as exc:
                work = snapshot
                _roll_back(ctx, memo, inputs, record)  # a pass that stopped early and then failed too
                record.status = "rolled_back" if self.on_error == "stop" else "skipped"
                record.error = f"{type(exc).__name__}: {exc}"
                before = [r.spec for r in result.records[:-1] if r.status == "ok"]
                if ctx.repro_dir is not None:
                    from passforge.passes.repro import write_reproducer

                    record.reproducer = str(
                        write_reproducer(ctx.repro_dir, snapshot, pass_, ctx, exc, passes_before=before)
                    )
                if self.on_error == "stop":
                    result.graph = work
                    self._finish(result, ctx)
                    raise PassFailure(
                        _failure_message(pass_, before, exc, record.reproducer),
                        pass_spec=pass_.spec,
                        before=before,
                        partial=result,
                    ) from exc
            result.graph = work
            if ctx.interrupted:  # the pass stopped itself on Ctrl-C and kept its best result
                ctx.interrupted = False
                what = f"'{pass_.spec}' stopped early and kept its best result"
                raise PipelineInterrupted(_interrupted_message(result, what), partial=result)
        try:
            self._finish(result, ctx)
        except KeyboardInterrupt:  # every pass completed: only the hooks' closing figures (timing) are missing
            what = "every pass completed, the closing measurements (timing) did not"
            raise PipelineInterrupted(_interrupted_message(result, what), partial=result) from None
        return result

    def _finish(self, result: PipelineResult, ctx: Context) -> None:
        for hook in self.hooks:
            hook.finish(result, ctx)

    def _run_one(
        self, pass_: Pass, work: fx.GraphModule, snapshot: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> fx.GraphModule:
        for hook in self.hooks:
            hook.before_pass(pass_, work, ctx)
        existing = set(work.graph.nodes)  # holds the old nodes, so no new node can reuse an old one's id
        start = time.perf_counter()
        out = pass_.run(work, ctx)
        after = out.graph
        _complete_meta(after, pass_.name, existing)
        record.time_s = time.perf_counter() - start
        record.modified = out.modified
        record.stats = dict(out.stats)
        record.notes = list(out.notes)
        if out.interface is not None:  # the graph's state was resized: later passes and hooks get its inputs
            resized = _resized_inputs(pass_, out.interface, ctx)
            ctx.interface_change = dataclasses.replace(out.interface, inputs_before=ctx.example_inputs)
            ctx.example_inputs = resized
        try:
            for hook in self.hooks:
                hook.after_pass(pass_, snapshot, after, ctx, record)
        finally:
            ctx.interface_change = None
        return after


def _complete_meta(gm: fx.GraphModule, pass_name: str, existing: set[fx.Node]) -> None:
    """Stamp nodes the pass created with its name and give them ``meta["val"]`` if the pass did not."""
    missing_val = False
    for node in gm.graph.nodes:
        if node not in existing:
            node.meta[PASS_META] = pass_name
        if node.op != "output" and "val" not in node.meta:
            missing_val = True
    if missing_val:
        for node, val in propagate_meta(gm).items():
            node.meta.setdefault("val", val)


def _resized_inputs(pass_: Pass, change: InterfaceChange, ctx: Context) -> tuple[object, ...]:
    """The example inputs after ``change``: each resized one the kept part of the old one. Refused on a forward
    graph (its interface is the caller's model) and where recorded calibration inputs have the old shapes."""
    if ctx.role == "forward":
        raise PassError(f"'{pass_.spec}' resized the graph's inputs or outputs, which only a generation step graph "
                        "(role prefill or decode) may do: a forward graph's interface is the caller's model")
    if ctx.calib_inputs is not None:
        raise PassError(f"'{pass_.spec}' resized the graph's state, and the context's recorded calibration inputs "
                        "have the old shapes")
    inputs = list(ctx.example_inputs)
    for position, state in change.inputs.items():
        if not (position < len(inputs) and isinstance(inputs[position], torch.Tensor)):
            raise PassError(f"'{pass_.spec}' resized input {position}, and the context has no example tensor there")
        inputs[position] = state.restrict(inputs[position])
    return tuple(inputs)


def _roll_back(ctx: Context, memo: dict[str, object], inputs: tuple[object, ...], record: PassRecord) -> None:
    """Undo what a pass left outside its graph: what it remembered for the model's other graphs, the example
    inputs it replaced, its stopped-early flag, and what it reported as modified."""
    ctx.memo.clear()
    ctx.memo.update(memo)
    ctx.example_inputs = inputs
    ctx.interrupted = False
    record.modified = False


def _interrupted_message(result: PipelineResult, what: str) -> str:
    done = [r.spec for r in result.records if r.status == "ok"]
    return f"interrupted after {len(done)} of the pipeline's passes ({', '.join(done) or 'none'}); {what}"


def _failure_message(pass_: Pass, before: Sequence[str], exc: BaseException, reproducer: str | None) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    lines = [
        f"pass '{pass_.spec}' failed and was rolled back: {type(exc).__name__}: {exc}{where}",
        f"  passes before it: {', '.join(before) if before else '(none)'}",
    ]
    if reproducer:
        lines.append(f"  reproducer: {reproducer}  (replay: passforge replay {reproducer})")
    else:
        lines.append("  rerun with --on-error=skip to continue without it")
    return "\n".join(lines)
