"""The one pattern-rewrite driver every pattern pass uses.

A rule is data: a pattern and a replacement written as plain torch code, example inputs to trace them to ATen
(through ``torch.export``, exactly as models are captured), and a ``check`` that returns ``None`` to accept a
match or a *reason* to reject it. Variants come from loops over parameters, never from copies::

    Rule("clone-of-contiguous", pattern=lambda x: x.clone(), replacement=lambda x: x,
         example_inputs=lambda: (torch.randn(2, 3),), check=input_is_contiguous)

:func:`apply_rules` matches with ``torch.fx``'s SubgraphMatcher and replaces with its subgraph rewriter; it
counts matches per rule (the counts go into the pass report). :func:`explain` answers "why didn't my rule
fire?": per rule, the matches accepted, those the check rejected (with the reason), and for near misses —
nodes that compute the pattern's final op but differ below it — the first difference.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from passforge.ir.graph import PASS_META, op_name

Check = Callable[[InternalMatch, fx.GraphModule], "str | None"]


@dataclass(frozen=True)
class Rule:
    """``pattern`` → ``replacement`` where ``check(match, gm)`` returns None (accept) or a reason (reject)."""

    name: str
    pattern: Callable[..., object]
    replacement: Callable[..., object]
    example_inputs: Callable[[], tuple[object, ...]]
    check: Check | None = None
    ignore_literals: bool = False

    def traced(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        return _trace(self.pattern, self.example_inputs), _trace(self.replacement, self.example_inputs)


@dataclass
class RuleReport:
    """What one rule did (or would do) on one graph."""

    rule: str
    replaced: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    near_misses: list[tuple[str, str]] = field(default_factory=list)  # (node name, first difference)

    def lines(self) -> list[str]:
        out = [f"{self.rule}: {self.replaced} match(es) accepted"]
        out += [f"  rejected at {node}: {reason}" for node, reason in self.rejected]
        out += [f"  near miss at {node}: {why}" for node, why in self.near_misses]
        if not (self.replaced or self.rejected or self.near_misses):
            out.append("  the pattern's final op does not occur in the graph")
        return out


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: object) -> object:
        return self.fn(*args)


@functools.cache
def _trace(fn: Callable[..., object], example_inputs: Callable[[], tuple[object, ...]]) -> fx.GraphModule:
    """Trace plain torch code to the same ATen IR as captured models (cached: rules are traced once)."""
    from passforge.ir.capture import capture  # capture → graph; rewrite is below capture in the layering

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(_Fn(fn), example_inputs(), name="pattern")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule]) -> dict[str, int]:
    """Apply each rule everywhere it matches and its check accepts; returns ``{rule name: replacements}``."""
    counts: dict[str, int] = {}
    for rule in rules:
        counts[rule.name] = _apply(gm, rule, RuleReport(rule.name)).replaced
    gm.recompile()
    return counts


def _apply(gm: fx.GraphModule, rule: Rule, report: RuleReport) -> RuleReport:
    pattern, replacement = rule.traced()

    def accept(match: InternalMatch, _graph: fx.Graph, _pattern: fx.Graph) -> bool:
        reason = rule.check(match, gm) if rule.check else None
        if reason is not None:
            report.rejected.append((_anchor_name(match), reason))
        return reason is None

    replaced = replace_pattern_with_filters(
        gm, pattern, replacement, match_filters=[accept], ignore_literals=rule.ignore_literals
    )
    for replacement_set in replaced:
        for node in replacement_set.replacements:
            # torch copies metadata from the traced replacement: shapes of the rule's example inputs and
            # provenance "capture". Drop both; the pass manager recomputes and stamps them.
            node.meta.pop("val", None)
            node.meta.pop(PASS_META, None)
    report.replaced = len(replaced)
    return report


def explain(gm: fx.GraphModule, rules: Sequence[Rule]) -> list[RuleReport]:
    """What each rule would do on ``gm``, without changing it (see module docstring)."""
    reports = []
    for rule in rules:
        pattern, _ = rule.traced()
        report = RuleReport(rule.name)
        matcher = SubgraphMatcher(pattern.graph, ignore_literals=rule.ignore_literals, remove_overlapping_matches=True)
        matches = matcher.match(gm.graph)
        matched_anchors = set()
        for match in matches:
            matched_anchors.add(_anchor_name(match))
            reason = rule.check(match, gm) if rule.check else None
            if reason is None:
                report.replaced += 1
            else:
                report.rejected.append((_anchor_name(match), reason))
        anchor = _pattern_anchor(pattern)
        for node in gm.graph.nodes:
            if node.name in matched_anchors or node.op != "call_function" or node.target != anchor.target:
                continue
            diff = first_difference(anchor, node, ignore_literals=rule.ignore_literals)
            if diff:
                report.near_misses.append((node.name, diff))
        reports.append(report)
    return reports


def _pattern_anchor(pattern: fx.GraphModule) -> fx.Node:
    out = next(n for n in pattern.graph.nodes if n.op == "output")
    return out.all_input_nodes[0]


def _anchor_name(match: InternalMatch) -> str:
    return match.returning_nodes[0].name if match.returning_nodes else "?"


def first_difference(pattern_node: fx.Node, node: fx.Node, *, ignore_literals: bool, path: str = "") -> str | None:
    """The first place (depth-first over arguments) where ``node``'s subgraph differs from the pattern's."""
    if pattern_node.op == "placeholder":
        return None
    where = path or "the final op"
    if node.op != "call_function" or node.target != pattern_node.target:
        return f"{where} is {op_name(node)}, the pattern wants {op_name(pattern_node)}"
    p_args, g_args = _flat_args(pattern_node), _flat_args(node)
    if len(p_args) != len(g_args):
        return f"{where} ({op_name(node)}) has {len(g_args)} arguments, the pattern {len(p_args)}"
    for i, (p_arg, g_arg) in enumerate(zip(p_args, g_args)):
        if isinstance(p_arg, fx.Node):
            if not isinstance(g_arg, fx.Node):
                return f"argument {i} of {op_name(node)} is the constant {g_arg!r}, the pattern wants a tensor"
            diff = first_difference(p_arg, g_arg, ignore_literals=ignore_literals, path=f"argument {i} of {node.name}")
            if diff:
                return diff
        elif not ignore_literals and p_arg != g_arg:
            return f"argument {i} of {node.name} ({op_name(node)}) is {g_arg!r}, the pattern wants {p_arg!r}"
    return None


def _flat_args(node: fx.Node) -> list[object]:
    return list(node.args) + [node.kwargs[k] for k in sorted(node.kwargs)]
