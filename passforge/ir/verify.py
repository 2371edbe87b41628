"""Post-pass checks: the graph lints, every ``meta["val"]`` tells the truth, and lossless means lossless.

Run by the pass manager's verification hook after every pass; a failure rolls the pass back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from passforge.ir.graph import describe_val, get_attr, propagate_meta, same_shape


class VerificationError(RuntimeError):
    """The graph after a pass is malformed or computes something else than it claims."""


def lint(gm: fx.GraphModule) -> None:
    """torch.fx's structural lint plus: every ``get_attr`` target exists on the module."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph lint failed: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                get_attr(gm, str(node.target))
            except AttributeError:
                raise VerificationError(
                    f"node '{node.name}' reads attribute '{node.target}', which is missing"
                ) from None


def check_meta(gm: fx.GraphModule) -> None:
    """Every node's ``meta["val"]`` must agree (shape, dtype, device) with a fresh fake-tensor propagation."""
    try:
        fresh = propagate_meta(gm)
    except Exception as exc:
        raise VerificationError(f"graph no longer propagates shapes: {type(exc).__name__}: {exc}") from exc
    for node, val in fresh.items():
        if "val" not in node.meta:
            raise VerificationError(f"node '{node.name}' has no meta['val'] (should be {describe_val(val)})")
        recorded = node.meta["val"]
        if not _same_value(recorded, val):
            raise VerificationError(
                f"node '{node.name}' ({node.target}) claims meta['val'] = {describe_val(recorded)} "
                f"but computes {describe_val(val)}"
            )


def _same_value(recorded: object, actual: object) -> bool:
    if isinstance(actual, torch.Tensor):
        return (
            isinstance(recorded, torch.Tensor)
            and recorded.dtype == actual.dtype
            and recorded.device.type == actual.device.type
            and same_shape(recorded, actual)
        )
    if isinstance(actual, (list, tuple)):
        return (
            isinstance(recorded, (list, tuple))
            and len(recorded) == len(actual)
            and all(_same_value(r, a) for r, a in zip(recorded, actual))
        )
    return True  # symbolic ints and Python scalars: nothing further to compare


def check_outputs_close(
    expected: Sequence[torch.Tensor],
    actual: Sequence[torch.Tensor],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Outputs of the graph after a lossless pass must match the graph before it."""
    _check_count(expected, actual)
    for i, (want, got) in enumerate(zip(expected, actual)):
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, check_dtype=True)
        except AssertionError as exc:
            summary = " ".join(str(exc).split())[:400]
            raise VerificationError(f"output {i} changed (rtol={rtol}, atol={atol}): {summary}") from exc


def check_lossy_outputs(
    expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], *, max_rel_err: float | None
) -> None:
    """After a lossy pass: same outputs (count, shapes, dtypes), no NaN/Inf where the graph before had none,
    and — when the pass declares ``max_rel_err`` — no output moved by more than that fraction of its scale."""
    _check_count(expected, actual)
    for i, (want, got) in enumerate(zip(expected, actual)):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise VerificationError(
                f"output {i} changed from {describe_val(want)} to {describe_val(got)}; passes keep the interface"
            )
        if not got.is_floating_point():
            continue
        new_bad = ~torch.isfinite(got) & torch.isfinite(want)
        if bool(new_bad.any()):
            raise VerificationError(f"output {i} has {int(new_bad.sum())} new NaN/Inf values")
        finite = torch.isfinite(want) & torch.isfinite(got)
        if max_rel_err is not None and bool(finite.any()):
            scale = want[finite].abs().max().float().clamp_min(torch.finfo(torch.float32).tiny)
            moved = ((got[finite].float() - want[finite].float()).abs().max() / scale).item()
            if moved > max_rel_err:
                raise VerificationError(
                    f"output {i} moved by {moved:.1%} of its scale; the pass allows at most {max_rel_err:.0%}"
                )


def _check_count(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> None:
    if len(expected) != len(actual):
        raise VerificationError(f"graph now returns {len(actual)} outputs, it returned {len(expected)}")
