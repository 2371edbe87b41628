"""The standard hooks: verification and IR dumps (profiling lives in :mod:`passforge.runtime.profile`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import fx

from passforge.ir.graph import num_compute_nodes
from passforge.ir.serialize import safe_filename, write_text_atomic
from passforge.ir.verify import (
    VerificationError,
    check_lossy_outputs,
    check_meta,
    check_outputs_close,
    check_quant_params,
    first_divergence,
    lint,
    restrict_resized_outputs,
)
from passforge.passes.base import Context, Pass, output_scale
from passforge.passes.manager import Hook, PassRecord


def run_graph(gm: fx.GraphModule, inputs: tuple[object, ...]) -> list[torch.Tensor]:
    """Call ``gm`` without autograd and flatten its outputs to a list of tensors."""
    with torch.inference_mode():
        out = gm(*inputs)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


class VerifyHook(Hook):
    """After each pass: lint, ``meta["val"]`` consistency, usable quantization scales, then a run on
    ``ctx.example_inputs`` (when there are any): a lossless pass must keep outputs within its declared
    ``rtol``/``atol``; a lossy pass must still run, keep the output types, add no NaN/Inf and stay within its
    declared ``max_rel_err`` (a collapse guard; its accuracy cost is the profiler's to measure). When outputs
    moved too far, the error names the first value and layer that moved (:func:`first_divergence`). After a
    pass that resized the graph's state (``ctx.interface_change``: a KV cache's heads), the graph before runs
    on the inputs it took and the graph after on the new ones, and each resized output compares by its kept
    part (what the graph after should return in its place).
    """

    def __init__(self, *, numerics: bool = True) -> None:
        self.numerics = numerics

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        lint(after)
        check_meta(after)
        check_quant_params(after)
        if not (self.numerics and ctx.example_inputs):
            return
        change = ctx.interface_change
        expected = run_graph(before, change.inputs_before if change else ctx.example_inputs)
        actual = run_graph(after, ctx.example_inputs)
        if change is not None:  # a resized output compares by the part of it the pass kept
            expected = restrict_resized_outputs(expected, change.outputs)
        try:
            if pass_.lossy:
                bound = math.inf if pass_.max_rel_err is None else pass_.max_rel_err
                check_lossy_outputs(expected, actual, max_rel_err=pass_.max_rel_err)
            else:
                rtol, atol = pass_.tolerance(before, expected)
                bound = rtol + atol / max(output_scale(expected), torch.finfo(torch.float32).tiny)
                check_outputs_close(expected, actual, rtol=rtol, atol=atol)
        except VerificationError as exc:
            if change is not None:  # the two graphs take different inputs: no value-by-value search
                raise
            where = first_divergence(before, after, ctx.example_inputs, bound)
            if where is None:
                raise
            raise VerificationError(f"{exc}; {where}") from exc


class DumpHook(Hook):
    """Writes the IR before the first pass and after each one: ``DIR/00_capture.txt``, ``DIR/01_cleanup.txt``…"""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = 0

    def start(self, gm: fx.GraphModule, ctx: Context, baseline: dict[str, object]) -> None:
        self._index = 0
        self._write("capture", gm)

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        self._index += 1
        self._write(pass_.name, after)

    def _write(self, label: str, gm: fx.GraphModule) -> None:
        header = f"# {label}: {num_compute_nodes(gm)} compute nodes\n"
        text = header + gm.print_readable(print_output=False, include_stride=False, colored=False)
        write_text_atomic(self.directory / f"{self._index:02d}_{safe_filename(label)}.txt", text)
