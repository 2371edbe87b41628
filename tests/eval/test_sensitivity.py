"""The sensitivity search: ranking, a proposal within budget found by bisection, time bound, saved state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from passforge.eval.sensitivity import parse_increase, sensitivity_search
from passforge.passes.base import Context
from passforge.passes.spec import SpecError
from passforge.tools.cli import main

RECIPE = "quantize(scheme=w4,group_size=16)"
WEIGHTS = 2 * 7  # every linear but lm_head (the recipe's default skip=lm_head* holds throughout)


def _ctx(tokens: torch.Tensor) -> Context:
    stream = torch.randint(0, 256, (8 * 17,), generator=torch.Generator().manual_seed(3))
    return Context(example_inputs=(tokens,), eval_tokens=stream, calib_tokens=stream)


def test_ranking_and_a_proposal_within_budget(llama_graph, tokens, tmp_path):
    """Budget 0.5x of what quantizing everything costs: the proposal must meet it by keeping the top-k
    ranked layers in float, found in at most ceil(log2(n + 1)) evaluations; the JSON holds the same."""
    ctx = _ctx(tokens)
    out = tmp_path / "sens.json"
    probe = sensitivity_search(llama_graph, ctx, RECIPE, seq_len=16, max_increase=math.inf, eval_windows=4,
                               out=out)
    everything = probe.candidates[-1].increase  # bisection ends at k=0 when any budget is met: all quantized
    assert probe.candidates[-1].skip == []
    result = sensitivity_search(llama_graph, ctx, RECIPE, seq_len=16, max_increase=everything / 2, eval_windows=4,
                                out=out)
    assert len(result.ranking) == WEIGHTS and not result.unranked
    increases = [inc for _, inc in result.ranking]
    assert increases == sorted(increases, reverse=True)
    best = result.best
    assert best is not None and best.increase <= everything / 2
    assert best.skip == [name for name, _ in result.ranking[: len(best.skip)]]
    assert 0 < len(best.skip) < WEIGHTS
    assert len(result.candidates) <= math.ceil(math.log2(WEIGHTS + 2))
    assert best.pipeline.startswith("quantize(") and f"skip=lm_head*;{best.skip[0]}" in best.pipeline
    saved = json.loads(out.read_text())
    assert saved["best"]["skip"] == best.skip and len(saved["ranking"]) == WEIGHTS


def test_an_exhausted_time_budget_stops_and_keeps_what_it_has(llama_graph, tokens, tmp_path):
    out = tmp_path / "sens.json"
    result = sensitivity_search(llama_graph, _ctx(tokens), RECIPE, seq_len=16, time_budget_s=0.0, out=out)
    assert result.stopped_early and result.ranking == [] and len(result.unranked) == WEIGHTS
    assert json.loads(out.read_text())["stopped_early"] is True


def test_ctrl_c_stops_the_search_with_the_best_so_far(llama_graph, tokens, tmp_path):
    """Ctrl-C during the third ranking step: the two layers measured stay ranked, no bisection runs, the
    state is on disk and the result says it was interrupted."""
    out, seen = tmp_path / "sens.json", []

    def progress(message: str) -> None:
        seen.append(message)
        if len(seen) == 2:
            raise KeyboardInterrupt

    result = sensitivity_search(llama_graph, _ctx(tokens), RECIPE, seq_len=16, eval_windows=2, out=out,
                                on_progress=progress)
    assert result.interrupted and result.stopped_early
    assert len(result.ranking) == 2 and len(result.unranked) == WEIGHTS - 2 and result.candidates == []
    saved = json.loads(out.read_text())
    assert saved["interrupted"] is True and len(saved["ranking"]) == 2


def test_bad_recipes_and_budgets(llama_graph, tokens):
    with pytest.raises(SpecError, match="starts with quantize"):
        sensitivity_search(llama_graph, _ctx(tokens), "cleanup", seq_len=16)
    assert parse_increase("1%") == pytest.approx(0.01)
    assert parse_increase("0.02") == pytest.approx(0.02)
    with pytest.raises(ValueError, match="budget"):
        parse_increase("-1%")
    assert main(["profile", "--sensitivity", "--recipe", "cleanup"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["profile", "--sensitivity", "--max-ppl-increase", "lots"])
    assert info.value.code == 2
