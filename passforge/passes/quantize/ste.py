"""Straight-through gradients for fake-quantized graphs, so training (QAT, distillation) can run through them.

A quantize node rounds and casts to an integer dtype: autograd stops there, and the weight it reads gets no
gradient. :func:`straight_through` returns a copy of the graph in which every fake-quant value ``dq(q(x))``
becomes ``x + (dq(q(c)) - c)`` with ``c = detach(x)``: forward it is the fake-quantized value (up to one
float rounding of the sum), backward the gradient passes to ``x`` unchanged (the straight-through estimator
of Bengio et al.; values clipped at the range edges get the gradient too). Before → after (one weight)::

    %q = quantize_per_channel(%w, ...)              %q = quantize_per_channel(%w, ...)
    %d = dequantize_per_channel(%q, ...)      →     %d = dequantize_per_channel(%q, ...)
    %y = aten.linear(%x, %d)                        %e = aten.sub(%d, %c); %s = aten.add(%w, %e)
                                                    %y = aten.linear(%x, %s)
    (%c = aten.detach(%w) feeds the quantize node and ``sub``: the fake-quant branch carries no gradient.)

The inference graph is not changed (a copy is returned, tensors shared): train the copy, then quantize the
trained weights again. Covers every dequantize op passforge's ``quantize`` inserts (per channel, per group,
per token, per tensor, fp8).
"""

from __future__ import annotations

import torch
from torch import fx

from passforge.ir.graph import copy_graph_module

aten = torch.ops.aten


def _pairs() -> dict[object, object]:
    """dequantize op -> the quantize op whose output it reads."""
    import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops (and passforge's fp8 pair)

    qd = torch.ops.quantized_decomposed
    return {
        torch.ops.passforge.dequantize_fp8.default: torch.ops.passforge.quantize_fp8.default,
        qd.dequantize_per_channel.default: qd.quantize_per_channel.default,
        qd.dequantize_per_channel_group.default: qd.quantize_per_channel_group.default,
        qd.dequantize_per_token.default: qd.quantize_per_token.default,
        qd.dequantize_per_tensor.default: qd.quantize_per_tensor.default,
    }


def straight_through(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose fake-quant values pass gradients straight through to their float inputs."""
    out = copy_graph_module(gm)
    pairs = _pairs()
    graph = out.graph
    rewritten = 0
    for dq in list(graph.nodes):
        q = dq.args[0] if dq.target in pairs else None
        if not (isinstance(q, fx.Node) and q.target is pairs[dq.target]):
            continue
        source = q.args[0]
        users = list(dq.users)
        with graph.inserting_after(source):
            constant = graph.call_function(aten.detach.default, (source,))
        for node in _ancestors_reading(dq, source):  # the quantizer (and a per-token qparams chooser)
            node.replace_input_with(source, constant)
        with graph.inserting_before(dq.next):
            error = graph.call_function(aten.sub.Tensor, (dq, constant))
            passed = graph.call_function(aten.add.Tensor, (source, error))
        for user in users:
            user.replace_input_with(dq, passed)
        for node in (constant, error, passed):
            node.meta["val"] = source.meta.get("val") if node is constant else dq.meta.get("val")
        rewritten += 1
    out.recompile()
    out.meta["passforge.straight_through"] = rewritten
    return out


def _ancestors_reading(dq: fx.Node, source: fx.Node) -> list[fx.Node]:
    """Nodes between ``source`` and ``dq`` that read ``source`` directly."""
    found, stack, seen = [], [dq], set()
    while stack:
        node = stack.pop()
        if node in seen or node is source:
            continue
        seen.add(node)
        if source in node.all_input_nodes:
            found.append(node)
        stack.extend(n for n in node.all_input_nodes if n is not source and n.op == "call_function")
    return found
