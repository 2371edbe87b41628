from __future__ import annotations

import torch

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.passes.rewrite import Rule, apply_rules, explain

aten = torch.ops.aten


class _TwoScales(torch.nn.Module):
    """``relu(x) * 2`` and ``relu(y) * 3``; the rule below rewrites only a multiplication by 2."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2.0 + torch.relu(y) * 3.0


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(4),)


def _only_small(match, gm) -> str | None:
    val = match.placeholder_nodes[0].meta["val"]
    return None if val.numel() <= 8 else f"input has {val.numel()} elements; the rule wants at most 8"


DOUBLE_RELU = Rule("relu-times-two", lambda x: torch.relu(x) * 2.0, lambda x: torch.relu(x + x), _example)


def test_rule_fires_once_and_preserves_outputs():
    x, y = torch.randn(4), torch.randn(4)
    gm = capture(_TwoScales(), (x, y))
    expected = gm(x, y)
    counts = apply_rules(gm, [DOUBLE_RELU])
    assert counts == {"relu-times-two": 1}
    assert count_calls(gm, aten.mul.Tensor) == 1  # the "* 3" near miss stays
    assert count_calls(gm, aten.add.Tensor) == 2
    torch.testing.assert_close(gm(x, y), expected)
    assert apply_rules(gm, [DOUBLE_RELU]) == {"relu-times-two": 0}  # nothing left to rewrite


def test_check_rejects_with_a_reason_and_explain_reports_it():
    big = torch.randn(16)
    gm = capture(_TwoScales(), (big, big))
    rule = Rule("relu-times-two-small", DOUBLE_RELU.pattern, DOUBLE_RELU.replacement, _example, check=_only_small)
    [report] = explain(gm, [rule])
    assert report.replaced == 0
    assert report.rejected == [("mul", "input has 16 elements; the rule wants at most 8")]
    assert report.near_misses == [("mul_1", "argument 1 of mul_1 (aten.mul.Tensor) is 3.0, the pattern wants 2.0")]
    assert apply_rules(gm, [rule]) == {"relu-times-two-small": 0}
    assert count_calls(gm, aten.mul.Tensor) == 2


def test_explain_names_a_different_producer():
    class SigmoidTimesTwo(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x) * 2.0

    gm = capture(SigmoidTimesTwo(), _example())
    [report] = explain(gm, [DOUBLE_RELU])
    why = "argument 0 of mul is aten.sigmoid.default, the pattern wants aten.relu.default"
    assert report.near_misses == [("mul", why)]
    assert "near miss at mul" in "\n".join(report.lines())


def test_explain_says_when_the_final_op_is_absent():
    class NoMul(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    [report] = explain(capture(NoMul(), _example()), [DOUBLE_RELU])
    assert report.lines()[-1] == "  the pattern's final op does not occur in the graph"


def test_replacement_nodes_get_true_metadata_and_provenance():
    """Replacement nodes must not keep the traced rule's example shapes (2, 3) or claim to come from capture."""
    from passforge.ir.graph import PASS_META
    from passforge.passes.base import Context, Pass, PassResult
    from passforge.passes.hooks import VerifyHook
    from passforge.passes.manager import PassManager

    class DoubleRelu(Pass):
        name = "test-double-relu"

        def run(self, gm, ctx):
            return PassResult(gm, modified=bool(apply_rules(gm, [DOUBLE_RELU])["relu-times-two"]))

    x, y = torch.randn(5, 7), torch.randn(5, 7)
    gm = capture(_TwoScales(), (x, y))
    result = PassManager([DoubleRelu()], hooks=[VerifyHook()]).run(gm, Context(example_inputs=(x, y)))
    assert result.records[0].status == "ok"
    new = [n for n in result.graph.graph.nodes if n.meta[PASS_META] == "test-double-relu"]
    assert sorted(str(n.target) for n in new) == ["aten.add.Tensor", "aten.relu.default"]
    assert all(tuple(n.meta["val"].shape) == (5, 7) for n in new)
