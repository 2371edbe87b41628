"""``fuse-linears``: linears that read the same input become one wider linear (q/k/v, gate/up).

One GEMM with N1 + N2 + N3 output columns instead of three: the input is read — and, once quantized, its
activations quantized — once instead of three times, the kernel-call overhead is paid once, and a wider GEMM
uses the machine better at one token. Before → after (the three q/k/v projections of a block)::

    %q = aten.linear(%x, %wq)                    %w = get_attr[layers.0.attention.fused_q_proj_k_proj_v_proj.weight]
    %k = aten.linear(%x, %wk)            →       %y = aten.linear(%x, %w)              # cat([wq, wk, wv])
    %v = aten.linear(%x, %wv)                    %q = aten.slice(%y, -1, 0, Nq); %k = ...; %v = ...

Exact up to float reassociation (the wider GEMM may block its sums differently). Fused: linears with the
same input, parameter weights (2-D, one dtype, read nowhere else — a tied weight is left alone) and either
all or none with a parameter bias. The fused weight is a new parameter (a copy of the parts: the graph holds
it instead of the parts, which leave the module). Run it after ``smooth-quant`` (which folds ``1/s`` into
up_proj's own rows) and before ``quantize`` (per-channel scales are per row, so quantizing the fused weight
equals quantizing each part). Idempotent: a second run finds one linear per input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from passforge.ir.graph import drop_unused_attrs, get_attr, set_tensor_attr
from passforge.passes.base import BF16_ULP, Context, Pass, PassResult, computes_in_low_precision, output_scale
from passforge.passes.quantize.insert import linear_operands
from passforge.passes.registry import register

aten = torch.ops.aten


@register
@dataclass(frozen=True)
class FuseLinears(Pass):
    """Concatenate the weights of linears sharing an input into one linear; slice its output."""

    name: ClassVar[str] = "fuse-linears"
    rtol: ClassVar[float] = 1e-4  # float reassociation in a wider GEMM
    atol: ClassVar[float] = 1e-4

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """fp32: reassociation (1e-4). bf16/fp16 GEMMs round their blocked sums to the low dtype: a different
        blocking moves an output by up to an ulp, compounding through the layers: allow 2 ulp of bf16 of the
        output scale."""
        if not computes_in_low_precision(before):
            return self.rtol, self.atol
        return 0.0, 2 * BF16_ULP * output_scale(expected)

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if _fusable(gm, node):
                groups.setdefault(linear_operands(node)[0], []).append(node)
        fused = 0
        for linears in groups.values():
            if len(linears) > 1 and _compatible(gm, linears):
                _fuse(gm, linears)
                fused += len(linears)
        if fused:
            drop_unused_attrs(gm)
            gm.recompile()
        return PassResult(gm, modified=fused > 0, stats={"fused": fused})


def _fusable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.target is not aten.linear.default:
        return False
    _, weight, bias = linear_operands(node)
    for param, dims in ((weight, 2), (bias, 1)):
        if param is None and dims == 1:
            continue
        if not (isinstance(param, fx.Node) and param.op == "get_attr" and len(param.users) == 1):
            return False
        tensor = get_attr(gm, param.target)
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() == dims):
            return False
    return True


def _compatible(gm: fx.GraphModule, linears: list[fx.Node]) -> bool:
    weights = [get_attr(gm, linear_operands(n)[1].target) for n in linears]
    biased = {linear_operands(n)[2] is not None for n in linears}
    return len({w.dtype for w in weights}) == 1 and len({w.device for w in weights}) == 1 and len(biased) == 1


def _fuse(gm: fx.GraphModule, linears: list[fx.Node]) -> None:
    """One linear over the concatenated weights (and biases), placed before the first of ``linears``; each
    old linear's users read their slice of its output."""
    first = linears[0]  # collected in graph order
    x = linear_operands(first)[0]
    names = [linear_operands(n)[1].target for n in linears]
    weights = [get_attr(gm, name) for name in names]
    stem = _fused_name(names)
    set_tensor_attr(gm, f"{stem}.weight", torch.cat(weights, dim=0))
    graph = gm.graph
    with graph.inserting_before(first):
        weight = graph.get_attr(f"{stem}.weight")
        bias = None
        if linear_operands(first)[2] is not None:
            set_tensor_attr(gm, f"{stem}.bias", torch.cat([get_attr(gm, linear_operands(n)[2].target)
                                                            for n in linears]))
            bias = graph.get_attr(f"{stem}.bias")
        wide = graph.call_function(aten.linear.default, (x, weight, bias))
        start = 0
        for linear, part in zip(linears, weights):
            piece = graph.call_function(aten.slice.Tensor, (wide, -1, start, start + part.shape[0]))
            start += part.shape[0]
            linear.replace_all_uses_with(piece)
    for linear in linears:
        graph.erase_node(linear)  # their weights' get_attr nodes, now unread, go with drop_unused_attrs


def _fused_name(names: list[str]) -> str:
    """``layers.0.attention.q_proj.weight`` + ``...k_proj.weight`` → ``layers.0.attention.fused_q_proj_k_proj``:
    the common module path, then the parts' own module names."""
    paths = [name.split(".")[:-1] for name in names]  # drop the leaf ("weight")
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    parts = ["_".join(p[common:]) for p in paths]
    return ".".join([*paths[0][:common], "fused_" + "_".join(parts)])
