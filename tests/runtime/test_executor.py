"""The executor on CPU calls passforge's op implementations directly: same results, the graph left as it is."""

from __future__ import annotations

import pytest
import torch

from passforge.ir.graph import count_calls
from passforge.kernels.ops import CPU_KERNELS
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.executor import Executor, direct_cpu_calls


def _passforge_calls(gm: torch.fx.GraphModule) -> int:
    return sum(count_calls(gm, op) for op in CPU_KERNELS)


@pytest.mark.parametrize(
    "pipeline",
    [
        "fuse-attention,cast(dtype=bf16),quantize(scheme=w8),fold-quant,lower-quant(guard=false)",
        "fuse-attention,quantize(scheme=w8a8),fold-quant,lower-quant(guard=false)",
        "quantize(scheme=w4,group_size=32),fold-quant,lower-quant(guard=false)",
        "smooth-quant,quantize(scheme=w8a8-static),fold-quant,lower-quant(guard=false)",
    ],
    ids=["w8-bf16-attention", "w8a8", "w4", "w8a8-static"],
)
def test_cpu_executor_calls_the_implementations_and_computes_the_same(llama_graph, tokens, pipeline):
    ctx = Context(example_inputs=(tokens,), calib_tokens=torch.randint(0, 256, (2048,)))
    gm = PassManager.parse(pipeline).run(llama_graph, ctx).graph
    ops = _passforge_calls(gm)
    assert ops >= 4  # the pipeline really left passforge ops for the executor to call
    executor = Executor(gm, "cpu")
    assert _passforge_calls(executor.gm) == 0
    assert _passforge_calls(gm) == ops  # the graph itself keeps its ops (what is saved and exported)
    direct = [n for n in executor.gm.graph.nodes if n.target in CPU_KERNELS.values()]
    assert len(direct) == ops
    with torch.inference_mode():
        want = gm(tokens)
    torch.testing.assert_close(executor(tokens), want, rtol=0, atol=0)  # the same functions: bit for bit


def test_a_graph_without_passforge_ops_runs_as_it_is(llama_graph):
    assert direct_cpu_calls(llama_graph) is llama_graph
    assert Executor(llama_graph, "cpu").gm is llama_graph
