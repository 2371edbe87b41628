"""Which layers can a quantization recipe touch within a perplexity budget? (``passforge profile --sensitivity``)

1. Rank: quantize one linear weight at a time (the recipe's ``quantize`` pass with ``only=`` that weight,
   every other layer in float) and measure the held-out perplexity each costs. Layers the recipe's own
   ``skip`` names (``lm_head*`` by default) stay in float throughout.
2. Propose: quantize everything but the ``k`` most sensitive layers (added to the recipe's ``skip``), ``k``
   found by bisection (perplexity falls as more of the worst layers stay in float) — the smallest ``k``
   whose perplexity is within ``max_increase`` of the float model's.

Time-bounded: every evaluation checks the clock; when ``time_budget_s`` is spent the search stops with the
best candidate so far (the fewest skipped layers within budget, else the lowest perplexity). After every
evaluation the state — ranking, candidates tried, best — is written atomically to ``out`` (JSON), so a
killed search leaves its best answer behind; Ctrl-C stops it the same way as the clock (``interrupted``) and
returns the best so far. Layers the ranking did not reach count as the most
sensitive (kept in float) — the safe guess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from passforge.eval.perplexity import perplexity
from passforge.ir.serialize import write_text_atomic
from passforge.passes.base import Context, Pass
from passforge.passes.manager import PassManager
from passforge.passes.quantize.insert import Quantize
from passforge.passes.spec import SpecError, parse_pipeline


@dataclass
class Candidate:
    skip: list[str]
    ppl: float
    increase: float  # relative to the float model: 0.01 is +1%
    pipeline: str


@dataclass
class SensitivityResult:
    recipe: str
    float_ppl: float
    max_increase: float
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (weight, relative increase), worst first
    unranked: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    stopped_early: bool = False
    interrupted: bool = False  # by Ctrl-C (stopped_early too)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def sensitivity_search(
    gm: fx.GraphModule,
    ctx: Context,
    recipe: str,
    *,
    seq_len: int,
    max_increase: float = 0.01,
    eval_windows: int = 16,
    time_budget_s: float = 600.0,
    out: Path | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
) -> SensitivityResult:
    """Rank ``gm``'s linear weights by what ``recipe`` (a pipeline whose first pass is ``quantize``) costs
    each alone, then propose the recipe with a skip list meeting ``max_increase``; see the module docstring."""
    passes = recipe_passes(recipe)
    if ctx.eval_tokens is None:
        raise ValueError("the sensitivity search measures perplexity: it needs evaluation text (--eval-data)")
    deadline = time.monotonic() + time_budget_s

    def ppl_of(graph: fx.GraphModule) -> float:
        with torch.inference_mode():
            return perplexity(graph, ctx.eval_tokens, seq_len=seq_len, batch_size=1, max_windows=eval_windows)

    def with_quantize(**changes: object) -> list[Pass]:
        return [dataclasses.replace(passes[0], **changes), *passes[1:]]

    def run(pipeline: list[Pass]) -> fx.GraphModule:  # a fresh memo: no calibration leaks between candidates
        return PassManager(pipeline).run(gm, dataclasses.replace(ctx, memo={})).graph

    result = SensitivityResult(recipe=recipe, float_ppl=ppl_of(gm), max_increase=max_increase)
    layers = passes[0].targets(gm, passes[0].scheme)[0]
    names = list(dict.fromkeys(weight.target for _, weight in layers))
    measured: dict[str, float] = {}
    try:
        for i, name in enumerate(names):
            if time.monotonic() > deadline:
                result.stopped_early = True
                break
            measured[name] = ppl_of(run(with_quantize(only=name))) / result.float_ppl - 1
            on_progress(f"[{i + 1}/{len(names)}] {name}: {100 * measured[name]:+.3f}%")
    except KeyboardInterrupt:
        result.stopped_early = result.interrupted = True
    result.ranking = sorted(measured.items(), key=lambda item: -item[1])
    result.unranked = [n for n in names if n not in measured]
    order = result.unranked + [name for name, _ in result.ranking]  # most sensitive (or unknown) first
    _save(result, out)

    def evaluate(k: int) -> Candidate:
        skip = order[:k]
        pipeline = with_quantize(skip=";".join(p for p in (passes[0].skip, *skip) if p))
        ppl = ppl_of(run(pipeline))
        candidate = Candidate(skip, ppl, ppl / result.float_ppl - 1, ",".join(p.spec for p in pipeline))
        result.candidates.append(candidate)
        if _better(candidate, result.best, max_increase):
            result.best = candidate
        on_progress(f"skip {k} layer(s): {100 * candidate.increase:+.3f}%")
        _save(result, out)
        return candidate

    low, high = 0, len(order)  # invariant: skipping `high` meets the budget (all float: +0%)
    try:
        while low < high and not result.interrupted:
            if time.monotonic() > deadline:
                result.stopped_early = True
                break
            k = (low + high) // 2
            if evaluate(k).increase <= max_increase:
                high = k
            else:
                low = k + 1
    except KeyboardInterrupt:
        result.stopped_early = result.interrupted = True
    if not result.stopped_early and order and (result.best is None or result.best.increase > max_increase):
        evaluate(len(order))  # every tried k missed the budget: the answer is to keep all of them in float
    _save(result, out)
    return result


def _better(candidate: Candidate, best: Candidate | None, max_increase: float) -> bool:
    if best is None:
        return True
    ok, best_ok = candidate.increase <= max_increase, best.increase <= max_increase
    if ok != best_ok:
        return ok
    if ok:
        return len(candidate.skip) < len(best.skip)
    return candidate.ppl < best.ppl


def recipe_passes(recipe: str) -> list[Pass]:
    """``recipe`` parsed; a :class:`SpecError` unless it starts with ``quantize(...)``."""
    passes = parse_pipeline(recipe)
    if not passes or not isinstance(passes[0], Quantize):
        raise SpecError(recipe, 0, "a sensitivity recipe starts with quantize(...), e.g. 'quantize(scheme=w4),gptq'")
    return passes


def _save(result: SensitivityResult, out: Path | None) -> None:
    if out is not None:
        write_text_atomic(out, result.to_json())


def parse_increase(text: str) -> float:
    """``"1%"`` → 0.01; ``"0.01"`` → 0.01."""
    value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"a perplexity budget must be a non-negative number or percentage, got {text!r}")
    return value
