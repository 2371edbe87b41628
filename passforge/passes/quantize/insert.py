"""``quantize(scheme=w8|w4, group_size=128, skip=lm_head*)``: fake-quant (quantize → dequantize) on the
weights of linear layers, in torch's standard Q/DQ ops (``quantized_decomposed``), which ``fold-quant`` turns
into stored integers and ``lower-quant`` into integer kernels (the same Q/DQ form ONNX's QDQ format has;
the ONNX export of it is future work).

Before → after (w8: symmetric int8, one scale per output channel)::

    %w = get_attr[wq.weight]                      %w = get_attr[wq.weight]
    %y = aten.linear(%x, %w)               →      %s = get_attr[wq.weight_scale]; %z = get_attr[wq.weight_zp]
                                                  %q = quantize_per_channel(%w, %s, %z, 0, -128, 127, int8)
                                                  %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, int8)
                                                  %y = aten.linear(%x, %d)

w4 is asymmetric uint4 (0..15) with one scale and zero point per ``group_size`` input channels of each row
(``quantize_per_channel_group``). w8a8 adds dynamic int8 activations: per token (row), asymmetric, qparams
chosen at run time (``choose_qparams_per_token_asymmetric`` → ``quantize_per_token`` →
``dequantize_per_token`` in front of the linear's input). Weight scales are the weights' min/max
(round-to-nearest); the error is measured by the profile. Weights with NaN/Inf are an error naming the
layer; an all-zero row or group gets scale 1 (zero is exact). Idempotent: a weight that already goes through
a dequantize is not a parameter read any more.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from passforge.ir.graph import add_buffer, get_attr
from passforge.passes.base import Context, Pass, PassError, PassResult
from passforge.passes.registry import register

aten = torch.ops.aten


@dataclass(frozen=True)
class QParams:
    """What ``quantize_per_channel[_group]`` takes besides the tensor: scales, zero points and the range."""

    scales: torch.Tensor
    zero_points: torch.Tensor
    quant_min: int
    quant_max: int
    dtype: torch.dtype


def int8_per_channel(weight: torch.Tensor) -> QParams:
    """Symmetric int8, one scale per output channel (row): scale = max|w| / 127."""
    amax = weight.detach().abs().amax(dim=1).float()  # (N,)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return QParams(scales, torch.zeros_like(scales, dtype=torch.int64), -128, 127, torch.int8)


def uint4_per_group(weight: torch.Tensor, group_size: int) -> QParams:
    """Asymmetric uint4 (0..15), one scale and zero point per ``group_size`` inputs of each row."""
    groups = weight.detach().float().reshape(-1, group_size)  # (N * K / g, g)
    low = groups.amin(dim=1).clamp(max=0)
    high = groups.amax(dim=1).clamp(min=0)
    span = high - low
    scales = torch.where(span > 0, span / 15, torch.ones_like(span))
    zero_points = torch.clamp(torch.round(-low / scales), 0, 15).to(torch.int32)
    rows = weight.shape[0]
    return QParams(scales.view(rows, -1), zero_points.view(rows, -1), 0, 15, torch.uint8)


@register
@dataclass(frozen=True)
class Quantize(Pass):
    """Fake-quantize linear weights: ``w8`` (int8, per output channel, symmetric), ``w4`` (uint4, per group
    of ``group_size`` inputs, asymmetric) or ``w8a8`` (w8 weights and int8 activations, per token, asymmetric,
    scales computed at run time). ``skip``: ``;``-separated globs of weight names left in float, matched
    against the name or any trailing part of it (default ``lm_head*``: the output projection is the most
    sensitive layer). ``decode_scheme``: the scheme for the one-token decode graph (``same``: ``scheme``) —
    int8 activations pay off in a compute-bound prefill, not in a weight-bound decode step."""

    name: ClassVar[str] = "quantize"
    lossy: ClassVar[bool] = True
    max_rel_err: ClassVar[float | None] = 0.5  # collapse guard only; the profile measures the real cost
    scheme: Literal["w8", "w4", "w8a8"] = "w8"
    group_size: int = 128
    skip: str = "lm_head*"
    decode_scheme: Literal["same", "w8", "w4", "w8a8"] = "same"

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops

        scheme = self.scheme if ctx.role != "decode" or self.decode_scheme == "same" else self.decode_scheme
        skips = [pattern for pattern in self.skip.split(";") if pattern]
        quantized = skipped = 0
        done: dict[str, fx.Node] = {}  # weight name -> its dequantize: a shared (tied) weight is quantized once
        for node in list(gm.graph.nodes):
            if node.target is not aten.linear.default:
                continue
            _, weight, _ = linear_operands(node)
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue  # already quantized, or a computed weight
            if weight.target in done:
                if scheme == "w8a8":
                    with gm.graph.inserting_before(node):
                        _fake_quantize_activation(gm.graph, node)
                node.replace_input_with(weight, done[weight.target])
                quantized += 1
                continue
            tensor = get_attr(gm, weight.target)
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() == 2):
                continue
            if any(_name_matches(weight.target, pattern) for pattern in skips):
                skipped += 1
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise PassError(f"quantize: weight '{weight.target}' of node '{node.name}' holds NaN/Inf values")
            if scheme == "w4" and tensor.shape[1] % self.group_size:
                raise PassError(
                    f"quantize: weight '{weight.target}' has {tensor.shape[1]} input channels, not a multiple of "
                    f"group_size={self.group_size}; choose a group_size that divides it or skip the layer"
                )
            done[weight.target] = self._insert(gm, node, weight, tensor, scheme)
            quantized += 1
        gm.recompile()
        return PassResult(gm, modified=quantized > 0, stats={"quantized": quantized, "skipped": skipped})

    def _insert(
        self, gm: fx.GraphModule, linear: fx.Node, weight: fx.Node, tensor: torch.Tensor, scheme: str
    ) -> fx.Node:
        qd = torch.ops.quantized_decomposed
        params = uint4_per_group(tensor, self.group_size) if scheme == "w4" else int8_per_channel(tensor)
        graph = gm.graph
        with graph.inserting_before(linear):
            scales = add_buffer(gm, f"{weight.target}_scale", params.scales)
            zero_points = add_buffer(gm, f"{weight.target}_zero_point", params.zero_points)
            common = (params.quant_min, params.quant_max, params.dtype)
            if scheme == "w8a8":
                _fake_quantize_activation(graph, linear)
            if scheme != "w4":
                q = graph.call_function(qd.quantize_per_channel.default, (weight, scales, zero_points, 0, *common))
                dq = graph.call_function(  # symmetric: zero points are 0, so none are read back
                    qd.dequantize_per_channel.default, (q, scales, None, 0, *common), {"out_dtype": tensor.dtype}
                )
            else:
                group = (*common, self.group_size)
                q = graph.call_function(qd.quantize_per_channel_group.default, (weight, scales, zero_points, *group))
                dq = graph.call_function(
                    qd.dequantize_per_channel_group.default, (q, scales, zero_points, *group, tensor.dtype)
                )
        linear.replace_input_with(weight, dq)
        return dq


def linear_operands(node: fx.Node) -> tuple[object, object, object]:
    """``(x, weight, bias)`` of an ``aten.linear`` call, whether passed positionally or by keyword."""
    args = (*node.args, None, None)
    return (
        node.kwargs.get("input", args[0]),
        node.kwargs.get("weight", args[1]),
        node.kwargs.get("bias", args[2] if len(node.args) > 2 else None),
    )


def _name_matches(name: str, pattern: str) -> bool:
    """A glob matches a qualified name or any trailing part of it: ``lm_head*`` matches ``lm_head.weight``
    and ``model.lm_head.weight`` (the same layer seen through a wrapper)."""
    parts = name.split(".")
    return any(fnmatch.fnmatch(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _fake_quantize_activation(graph: fx.Graph, linear: fx.Node) -> None:
    """x → quantize_per_token → dequantize_per_token with per-token qparams chosen at run time."""
    qd = torch.ops.quantized_decomposed
    x = linear_operands(linear)[0]
    qparams = graph.call_function(qd.choose_qparams_per_token_asymmetric.default, (x, torch.int8))
    scales = graph.call_function(operator.getitem, (qparams, 0))
    zero_points = graph.call_function(operator.getitem, (qparams, 1))
    q = graph.call_function(qd.quantize_per_token.default, (x, scales, zero_points, -128, 127, torch.int8))
    dq = graph.call_function(
        qd.dequantize_per_token.default, (q, scales, zero_points, -128, 127, torch.int8, x.meta["val"].dtype)
    )
    linear.replace_input_with(x, dq)
