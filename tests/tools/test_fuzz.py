"""The semantic fuzzer (passforge.tools.fuzz): a seeded slice of random models × random pipelines must keep
every invariant, and the checker must catch the bugs it is there to catch (a wrong lossless rewrite, a
non-idempotent pass, a pass that writes into a shared tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import fx

from passforge.ir.graph import get_attr
from passforge.passes.base import Context, Pass, PassResult
from passforge.tools.fuzz import (
    Block,
    Outcome,
    Recipe,
    build_model,
    check,
    derived_bound,
    pipelines,
    recipes,
)

aten = torch.ops.aten

SLICE = settings(max_examples=20, derandomize=True, database=None, deadline=None,
                 suppress_health_check=list(HealthCheck))


def _explain(recipe: Recipe, outcome: Outcome) -> str:
    return f"pipeline {outcome.pipeline}\nrecipe {recipe!r}\n" + "\n".join(outcome.failures + outcome.findings)


@SLICE
@given(recipe=recipes(), passes=pipelines(max_size=3))
def test_random_pipelines_keep_the_invariants(recipe: Recipe, passes: list[Pass]) -> None:
    """Every pass is applied within its bound or rolled back and named; the result verifies, runs, stays within
    the bound derived from the passes that ran, and a second run changes nothing. A pass that crashes or had
    to be rolled back for a wrong rewrite fails the test too (a finding: the manager contained a bug)."""
    outcome = check(recipe, passes)
    assert not outcome.failures and not outcome.findings, _explain(recipe, outcome)


ATTENTION = Recipe(
    blocks=(Block("rms_norm"), Block("explicit", variant=1 | 8, heads=2, kv_heads=1, residual=True),
            Block("layer_norm"), Block("mlp", bias=True, residual=True), Block("sdpa", variant=1, heads=2, kv_heads=2)),
    dim=16, batch=2, seq=5, head=32, seed=3,
)


@pytest.mark.parametrize("spec", [
    "cleanup,fuse-attention,local-attention(window=2,sinks=1),fuse-linears",
    "smooth-quant(calib_windows=2),quantize(scheme=w8a8-static,calib_windows=2),fold-quant,lower-quant(guard=false)",
    "cast,quantize(scheme=w4,group_size=16),gptq(calib_windows=2),fold-quant,lower-quant(guard=false)",
    "sparsify(pattern=2:4,method=sparsegpt,blocksize=8,calib_windows=2),prune-channels(target=heads)",
])
def test_deep_pipelines_on_an_attention_model(spec: str) -> None:
    """Chains the random draw reaches rarely, on a model with both attention spellings, GQA, both norms."""
    from passforge.passes.spec import parse_pipeline

    outcome = check(ATTENTION, parse_pipeline(spec))
    assert not outcome.failures and not outcome.findings, _explain(ATTENTION, outcome)
    assert [label for _, label in outcome.labels].count("ok") >= 2, outcome.labels


# ------------------------------------------------------------------------------------------------ can fail

SIMPLE = Recipe(blocks=(Block("linear", bias=True), Block("elementwise", variant=3)), dim=8, seq=3, seed=1)


@dataclass(frozen=True)
class _ScalesOutputs(Pass):
    """Claims to be lossless, multiplies the first linear's output by 1.01."""

    name: ClassVar[str] = "test-scale-outputs"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
        with gm.graph.inserting_after(linear):
            scaled = gm.graph.call_function(aten.mul.Tensor, (linear, 1.01))
        linear.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        gm.recompile()
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class _AddsZero(Pass):
    """Lossless, but adds one more ``+ 0`` every time it runs: not idempotent."""

    name: ClassVar[str] = "test-add-zero"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        first = output.args[0] if isinstance(output.args[0], fx.Node) else output.args[0][0]
        with gm.graph.inserting_before(output):
            plus = gm.graph.call_function(aten.add.Tensor, (first, 0.0))
        output.replace_input_with(first, plus)
        gm.recompile()
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class _WritesInPlace(Pass):
    """Lossy with no guard, zeroes the first weight *in place*: the caller's graph (and model) change."""

    name: ClassVar[str] = "test-in-place"
    lossy: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        weight = next(n for n in gm.graph.nodes if n.op == "get_attr")
        with torch.no_grad():
            get_attr(gm, weight.target).mul_(0.5)
        return PassResult(gm, modified=True)


def test_a_wrong_lossless_rewrite_is_a_finding() -> None:
    outcome = check(SIMPLE, [_ScalesOutputs()])
    assert outcome.labels == [("test-scale-outputs", "rolled-back:lossless-mismatch")]
    assert outcome.findings and not outcome.failures


def test_a_non_idempotent_pass_fails() -> None:
    outcome = check(SIMPLE, [_AddsZero()])
    assert outcome.labels == [("test-add-zero", "ok")]
    assert any("not idempotent" in f for f in outcome.failures), outcome.failures


def test_writing_into_a_shared_tensor_fails() -> None:
    outcome = check(SIMPLE, [_WritesInPlace()])
    assert any("caller's graph changed" in f for f in outcome.failures), outcome.failures


def test_derived_bound_adds_up_the_passes() -> None:
    """capture (1e-5, 1e-5) then a lossless pass (0, 1e-3): |x| = 2 gives 1e-5 + 2e-5 + 1e-3; a lossy pass
    with a guard adds max_rel_err × the largest magnitude (bounded), one without a guard gives no bound."""
    from passforge.tools.fuzz import _Accepted

    original = [torch.tensor([2.0, -1.0])]
    lossless = _Accepted(_AddsZero(), original, original, None, (0.0, 1e-3))  # type: ignore[arg-type]
    bound = derived_bound(original, [lossless], (1e-5, 1e-5))
    torch.testing.assert_close(bound[0], torch.tensor([1e-5 + 2e-5 + 1e-3, 1e-5 + 1e-5 + 1e-3], dtype=torch.float64))
    assert derived_bound(original, [_Accepted(_WritesInPlace(), original, original, None, None)],  # type: ignore
                         (1e-5, 1e-5)) is None


def test_models_are_reproducible_from_their_recipe() -> None:
    a, b = build_model(ATTENTION), build_model(ATTENTION)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.testing.assert_close(a(*ATTENTION.inputs()), b(*ATTENTION.inputs()), rtol=0, atol=0)
