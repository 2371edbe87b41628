"""Per-layer pruning ratios from a sensitivity scan: prune more where the model cares less.

A uniform ratio takes as much from a layer whose channels all matter as from one that is nearly redundant.
:func:`sensitivity_counts` measures, on calibration windows, what removing each group's lowest-scoring units
costs on its own — up to 16 sizes in steps of whole ``multiple`` units, with the units silenced in place (their
producing rows and consuming columns zeroed, which for MLP channels and attention heads computes exactly what
removing them does) and the next-token loss compared with the unpruned graph's. Then it removes steps greedily,
always the one with the smallest loss increase per unit removed, until ``ratio`` of all the units are gone — or,
with a ``budget``, earlier, once the summed increases predict a perplexity more than ``budget`` above the start
(``exp(sum of loss increases) - 1``). The scan assumes the groups' costs add up, which holds well for small
ratios (it is what OWL / LLM-Pruner-style per-layer allocations assume); the pass's report measures the real
result.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from passforge.ir.graph import get_attr, set_tensor_attr
from passforge.passes.base import Context, PreconditionError
from passforge.passes.prune.groups import Group
from passforge.passes.quantize.calibrate import calibration_inputs, next_token_loss, token_slot

MAX_STEP_FRACTION = 0.875  # never silence more than 7/8 of a group in the scan
SCAN_STEPS = 16  # a group's scan measures at most this many sizes (steps of whole multiples)


def sensitivity_counts(
    gm: fx.GraphModule,
    ctx: Context,
    groups: list[Group],
    scores: dict[str, torch.Tensor],
    *,
    ratio: float,
    multiple: int,
    budget: float,
    spec: str,
    windows: int,
) -> tuple[dict[str, int], list[str]]:
    """Units to keep per group, and notes (the chosen per-group ratios, the predicted perplexity change)."""
    inputs = calibration_inputs(ctx, spec, windows)
    base = _loss(gm, inputs, spec)
    costs: dict[str, list[float]] = {}
    step = {g.name: multiple * max(1, math.ceil(g.units / (SCAN_STEPS * multiple))) for g in groups}
    for g in groups:
        order = scores[g.name].cpu().argsort()  # lowest first
        costs[g.name] = [0.0]
        for k in range(1, int(g.units * MAX_STEP_FRACTION) // step[g.name] + 1):
            with _silenced(gm, g, order[:k * step[g.name]]):
                costs[g.name].append(_loss(gm, inputs, spec) - base)
    target = ratio * sum(g.units for g in groups)
    removed = {g.name: 0 for g in groups}  # in steps
    total, predicted = 0, 0.0
    while total < target:
        best, best_rate = None, math.inf
        for g in groups:
            k = removed[g.name]
            if k + 1 < len(costs[g.name]):
                rate = (costs[g.name][k + 1] - costs[g.name][k]) / step[g.name]
                if rate < best_rate:
                    best, best_rate = g, rate
        if best is None:
            break
        step_cost = costs[best.name][removed[best.name] + 1] - costs[best.name][removed[best.name]]
        if budget > 0 and math.exp(predicted + step_cost) - 1 > budget:
            break
        removed[best.name] += 1
        predicted += step_cost
        total += step[best.name]
    counts = {g.name: g.units - removed[g.name] * step[g.name] for g in groups}
    notes = [
        "sensitivity: " + ", ".join(f"{g.name} {1 - counts[g.name] / g.units:.0%}" for g in groups),
        f"sensitivity: removed {total / sum(g.units for g in groups):.1%} of units, predicted perplexity "
        f"{math.exp(predicted) - 1:+.1%}" + (" (stopped by the budget)" if total < target and budget > 0 else ""),
    ]
    return counts, notes


class _silenced:
    """Swap in copies of the group's tensors with the given units zeroed; the originals go back on exit (the
    tensors are shared with the user's model and the teacher: never written in place)."""

    def __init__(self, gm: fx.GraphModule, group: Group, units: torch.Tensor) -> None:
        self.gm = gm
        self.slices = list(dict.fromkeys((*group.producers, *group.consumers)))
        self.units = units
        self.originals: dict[str, torch.Tensor] = {}

    def __enter__(self) -> None:
        for s in self.slices:
            tensor = get_attr(self.gm, s.name)
            self.originals.setdefault(s.name, tensor)
            index = s.elements(self.units.to(tensor.device))
            set_tensor_attr(self.gm, s.name, tensor.index_fill(s.dim, index, 0))

    def __exit__(self, *exc: object) -> None:
        for name, tensor in self.originals.items():
            set_tensor_attr(self.gm, name, tensor)


@torch.no_grad()
def _loss(gm: fx.GraphModule, inputs: list[tuple[object, ...]], spec: str) -> float:
    """Mean next-token cross-entropy of the graph's logits over the input windows."""
    slot = token_slot(inputs[0])
    if slot is None:
        raise PreconditionError(f"{spec}: schedule=sensitivity needs a (batch, seq) token input to measure the loss")
    return sum(float(next_token_loss(gm(*args), args[slot], spec)) for args in inputs) / len(inputs)
