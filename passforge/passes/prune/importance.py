"""How much each unit of a channel group matters: the scores ``prune-channels`` ranks units by.

- ``l1`` / ``l2``: the magnitude of every weight the unit owns (producer rows, consumer columns, per-channel
  tensors) — data-free, the classic baseline.
- ``wanda``: ``|W| * ||X||`` (Sun et al. 2023, structured as in FLAP / Wanda-sp): each weight's magnitude
  times the L2 norm over calibration tokens of the input feature it multiplies, summed over the unit's
  weights. A channel that carries large activations keeps its weights even when they are small.
- ``taylor``: ``|W * dL/dW|`` (first-order Taylor expansion of the loss, Molchanov et al. 2019; LLM-Pruner's
  element-wise form): the loss change from zeroing each weight, with ``L`` the next-token cross-entropy of
  the graph's logits on calibration windows; gradients accumulate over the windows.

Scores are per unit (``Group.units`` of them) and only compared within one group, or after dividing by the
group's mean when pruning globally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from passforge.ir.graph import get_attr
from passforge.passes.base import Context, PreconditionError
from passforge.passes.prune.groups import Group, Slice
from passforge.passes.quantize.calibrate import calibration_inputs, next_token_loss, observe, token_slot

aten = torch.ops.aten


def magnitude_scores(gm: fx.GraphModule, group: Group, p: int) -> torch.Tensor:
    """Sum over the group's tensors of ``|w|^p`` per unit."""
    return sum(_per_unit(get_attr(gm, s.name).float().abs().pow(p), s, group.units) for s in group.slices)


def wanda_scores(gm: fx.GraphModule, group: Group, input_norms: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """Sum over the group's linears of ``|W_ij| * ||X_j||``: for a consumer, over the unit's columns; for a
    producer, over the unit's rows (each row's weights times the norms of the producer's own inputs). An
    embedding producer's input is one-hot: its columns score by magnitude."""
    readers = _linears_by_weight(gm)
    total = torch.zeros(group.units)  # _per_unit hands back CPU sums
    for s in (*group.producers, *group.consumers):
        w = get_attr(gm, s.name).float().abs()
        linear = readers.get(s.name)
        if linear is None:  # the embedding
            total += _per_unit(w, s, group.units)
            continue
        norms = input_norms[linear.args[0]].to(w.device)
        total += _per_unit(w * norms[None, :], s, group.units)
    return total


def calibrate_input_norms(
    gm: fx.GraphModule, ctx: Context, groups: Sequence[Group], spec: str, windows: int
) -> dict[fx.Node, torch.Tensor]:
    """``||X_j||_2`` over calibration tokens for the input of every linear in ``groups``."""
    readers = _linears_by_weight(gm)
    inputs = {readers[s.name].args[0] for g in groups for s in (*g.producers, *g.consumers) if s.name in readers}
    squares: dict[fx.Node, torch.Tensor] = {}

    def recorder(x: fx.Node):
        def record(value: torch.Tensor) -> None:
            rows = value.float().reshape(-1, value.shape[-1])
            squares[x] = squares.get(x, 0) + rows.pow(2).sum(dim=0)

        return record

    observe(gm, calibration_inputs(ctx, spec, windows), {x: recorder(x) for x in inputs},
            label=f"{spec}: activation norms")
    return {x: s.sqrt() for x, s in squares.items()}


def taylor_scores(
    gm: fx.GraphModule, ctx: Context, groups: Sequence[Group], spec: str, windows: int
) -> dict[str, torch.Tensor]:
    """``sum |w * dL/dw|`` per unit for every group (keyed by group name), ``L`` the next-token loss."""
    names = {s.name for g in groups for s in g.slices}
    tensors = {name: get_attr(gm, name) for name in names}
    grads = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in tensors.items()}
    inputs = calibration_inputs(ctx, spec, windows)
    slot = token_slot(inputs[0])
    if slot is None:
        raise PreconditionError(f"{spec}: taylor importance needs a (batch, seq) token input to compute the loss")
    flags = {name: t.requires_grad for name, t in tensors.items()}  # shared with the user's model: restored
    for t in tensors.values():
        t.requires_grad_(True)
    try:
        for args in inputs:
            with torch.enable_grad():
                loss = next_token_loss(gm(*args), args[slot], spec)
                found = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
            for name, g in zip(tensors, found, strict=True):
                if g is not None:
                    grads[name] += g.float()
    finally:
        for name, t in tensors.items():
            t.requires_grad_(flags[name])
    scores = {}
    for g in groups:
        scores[g.name] = sum(
            _per_unit((tensors[s.name].detach().float() * grads[s.name]).abs(), s, g.units) for s in g.slices
        )
    return scores


def _per_unit(values: torch.Tensor, s: Slice, units: int) -> torch.Tensor:
    """Sum of ``values`` over each unit along ``s.dim`` (from ``s.offset``: a fused weight's piece): (units,),
    on the CPU so scores from tensors on any device compare."""
    return values.movedim(s.dim, 0).narrow(0, s.offset, units * s.unit).reshape(units, -1).sum(dim=1).cpu()


def _linears_by_weight(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {
        n.args[1].target: n for n in gm.graph.nodes
        if n.target is aten.linear.default and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"
    }
