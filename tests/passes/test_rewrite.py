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
    assert report.near_misses == [("mul", "argument 0 of mul is aten.sigmoid.default, the pattern wants aten.relu.default")]
    assert "near miss at mul" in "\n".join(report.lines())


def test_explain_says_when_the_final_op_is_absent():
    class NoMul(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    [report] = explain(capture(NoMul(), _example()), [DOUBLE_RELU])
    assert report.lines()[-1] == "  the pattern's final op does not occur in the graph"
