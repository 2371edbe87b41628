"""``cast(dtype=bf16|fp16)``: mixed precision with autocast's policy, applied to the graph once.

Parameters (weights) become the low dtype; buffers (RoPE frequency tables, masks) stay fp32 — positions above
256 are not even representable in bf16. Matmul-like ops that see a low-precision operand cast the others to
it and compute in it; ops whose accuracy needs range or many-term sums — softmax, norms, reductions,
exp/log/pow/rsqrt, losses — get their inputs upcast to fp32; ops that need one dtype (cat, index_copy into a
cache) get fp32; everything else runs on what arrives (type promotion). Outputs are cast back, so callers
see the dtypes they saw before. Tied weights stay tied.

Before → after (one RMSNorm feeding a linear)::

    %w = get_attr[wq.weight]                     %w = get_attr[wq.weight]                       # now bf16
    %p = aten.pow(%x, 2)                         %x32 = aten._to_copy(%x, dtype=f32)
    %m = aten.mean(%p, [-1], True)        →      %p = aten.pow(%x32, 2) ... %n = aten.mul(...)  # f32
    %n = aten.mul(...)                           %n16 = aten._to_copy(%n, dtype=bf16)
    %q = aten.linear(%n, %w)                     %q = aten.linear(%n16, %w)                     # bf16

Lossy: the profile measures what it costs (KL, perplexity). Idempotent: a second run inserts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention (a low-precision op below)
from passforge.ir.graph import fake_mode_of, get_attr, set_tensor_attr
from passforge.passes.base import Context, Pass, PassResult
from passforge.passes.registry import register

aten = torch.ops.aten

LOW_PRECISION_OPS = frozenset(
    {aten.linear, aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm, aten.conv1d, aten.conv2d,
     aten.convolution, aten.scaled_dot_product_attention, aten.einsum, torch.ops.passforge.attention}
)
FP32_OPS = frozenset(
    {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.layer_norm, aten.native_layer_norm,
     aten.group_norm, aten.rms_norm, aten.mean, aten.sum, aten.var, aten.var_mean, aten.std, aten.norm,
     aten.linalg_vector_norm, aten.cumsum, aten.exp, aten.log, aten.pow, aten.rsqrt, aten.reciprocal,
     aten.logsumexp, aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_forward, aten.mse_loss}
)
# Ops whose tensor inputs must share one dtype: mixed inputs are cast to the node's original (fp32) dtype.
SAME_DTYPE_OPS = frozenset(
    {aten.index_copy, aten.index_put, aten.index_add, aten.index_reduce, aten.cat, aten.stack, aten.where,
     aten.scatter, aten.scatter_add, aten.scatter_reduce, aten.masked_scatter, aten.copy, aten.lerp,
     aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.as_strided_scatter}
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _packet(node: fx.Node) -> object:
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _dtype_of(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


@register
@dataclass(frozen=True)
class Cast(Pass):
    """Mixed precision: weights and matmuls in ``dtype`` (bf16 or fp16), softmax/norms/reductions kept in
    fp32, graph inputs and outputs keep their dtypes."""

    name: ClassVar[str] = "cast"
    lossy: ClassVar[bool] = True
    dtype: Literal["bf16", "fp16"] = "bf16"

    # Collapse guard: bf16/fp16 rounding moves logits by ~1% of their scale (docs); 10% means a broken cast.
    max_rel_err: ClassVar[float | None] = 0.1

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        low = DTYPES[self.dtype]
        graph = gm.graph
        mode = fake_mode_of(gm)
        original: dict[fx.Node, torch.dtype | None] = {n: _dtype_of(n) for n in graph.nodes}
        stats = {"params": _cast_parameters(gm, low), "casts": 0}
        for node in list(graph.nodes):  # topological: inputs already carry their new dtype
            if node.op != "call_function":
                continue
            packet = _packet(node)
            if packet in LOW_PRECISION_OPS and low in {_dtype_of(a) for a in node.all_input_nodes}:
                stats["casts"] += _cast_inputs(graph, node, low, only_from=torch.float32)
            elif packet in FP32_OPS or (packet in SAME_DTYPE_OPS and original[node] == torch.float32):
                stats["casts"] += _cast_inputs(graph, node, torch.float32, only_from=low)
            _refresh(node, mode)
        if stats == {"params": 0, "casts": 0}:
            return PassResult(gm, modified=False, stats=stats)
        stats["casts"] += _restore_output_dtypes(graph, original)
        gm.recompile()
        return PassResult(gm, modified=True, stats=stats)


def _cast_parameters(gm: fx.GraphModule, low: torch.dtype) -> int:
    """Store fp32 parameters read by the graph in ``low`` (one new tensor per storage: tied stays tied)."""
    converted: dict[int, torch.Tensor] = {}
    buffers = {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in buffers:
            continue
        tensor = get_attr(gm, node.target)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float32, low):
            continue
        if tensor.dtype == torch.float32:
            new = converted.setdefault(id(tensor), tensor.detach().to(low))
            set_tensor_attr(gm, node.target, new)
        node.meta["val"] = node.meta["val"].to(low)
    return len(converted)


def _restore_output_dtypes(graph: fx.Graph, original: dict[fx.Node, torch.dtype | None]) -> int:
    """Outputs leave the graph in the dtype they had before the pass (callers see the same types): fp32 ones
    that became low precision, and — in a model already in bf16/fp16 — low ones that an fp32 op (a norm,
    softmax) now computes in fp32."""
    output = next(n for n in graph.nodes if n.op == "output")
    inserted = 0

    def restore(arg: fx.Node) -> fx.Node:
        nonlocal inserted
        want = original.get(arg, _dtype_of(arg))
        if want is not None and want.is_floating_point and _dtype_of(arg) != want:
            inserted += 1
            with graph.inserting_before(output):
                return _to_copy(graph, arg, want)
        return arg

    output.args = fx.node.map_arg(output.args, restore)
    return inserted


def _to_copy(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    cast = graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
    cast.meta["val"] = node.meta["val"].to(dtype)
    return cast


def _cast_inputs(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, *, only_from: torch.dtype) -> int:
    """Cast the tensor inputs of ``node`` that are ``only_from`` to ``dtype`` (one cast per input node)."""
    inserted = 0
    for arg in list(node.all_input_nodes):
        if _dtype_of(arg) == only_from:
            with graph.inserting_before(node):
                node.replace_input_with(arg, _to_copy(graph, arg, dtype))
            inserted += 1
    return inserted


def _refresh(node: fx.Node, mode: FakeTensorMode) -> None:
    """Recompute ``node``'s fake value from its inputs' (possibly new) dtypes."""
    if not node.all_input_nodes:
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)
