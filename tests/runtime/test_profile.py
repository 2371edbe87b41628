from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import capture
from passforge.ir.graph import param_stats
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.passes.precision import Cast
from passforge.runtime.profile import METRIC_FIELDS, ProfileHook, planned_peak_bytes, profile_nodes


class _Chain(torch.nn.Module):
    """x (1 MiB) -> exp -> view -> exp: each exp needs its input and its output, never three tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp().view(-1).exp()


def test_planned_peak_counts_live_tensors_not_views():
    x = torch.randn(256, 1024)  # 1 MiB
    gm = capture(_Chain(), (x,))
    mib = 2**20
    # x lives until the first exp has run; the view keeps exp's output alive until the second exp reads it.
    assert planned_peak_bytes(gm) == 2 * mib


def test_planned_peak_includes_parameters(llama_graph):
    assert planned_peak_bytes(llama_graph) > param_stats(llama_graph)[1]


def test_profile_hook_fills_every_metric(llama_graph, tokens):
    hook = ProfileHook(repeats=2, warmup=1, lm=True)
    eval_tokens = torch.randint(0, 256, (16 * 5,), generator=torch.Generator().manual_seed(0))
    ctx = Context(example_inputs=(tokens,), eval_tokens=eval_tokens)
    result = PassManager([Cast()], hooks=[hook]).run(llama_graph, ctx)
    row = result.records[0].metrics
    assert set(METRIC_FIELDS) <= row.keys()
    assert all(row[k] is not None for k in METRIC_FIELDS)
    assert result.baseline["max_abs_err"] == 0.0 and result.baseline["kl"] == 0.0
    assert row["param_bytes"] < result.baseline["param_bytes"]


def test_node_profile_attributes_time_to_passes(llama_graph, tokens):
    gm = PassManager([Cast()]).run(llama_graph, Context(example_inputs=(tokens,))).graph
    profile = profile_nodes(gm, (tokens,), repeats=2)
    assert set(profile.by_pass) == {"capture", "cast"}  # the casts the pass inserted are its own
    assert sum(profile.by_op.values()) == pytest.approx(profile.total_ms)  # aggregation, not a timing bound
    assert "aten.linear.default" in profile.by_op
    lm_head = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert profile.bytes_by_node[lm_head.name] == 16 * 256 * 2  # (1, 16, 256) logits in bf16
    assert all(profile.bytes_by_node[n.name] == 0 for n in gm.graph.nodes if n.target is torch.ops.aten.view.default)
