"""``quantize(scheme=w8|w4|w8a8|w8a8-static|fp8, group_size=128, skip=lm_head*, only=...)``: fake-quant
(quantize → dequantize) on the weights (and activations) of linear layers, in torch's standard Q/DQ ops
(``quantized_decomposed``, the form PT2E produces and ONNX's QDQ format mirrors), which ``fold-quant`` turns
into stored integers and ``lower-quant`` into integer kernels.

Before → after (w8: symmetric int8, one scale per output channel)::

    %w = get_attr[wq.weight]                      %w = get_attr[wq.weight]
    %y = aten.linear(%x, %w)               →      %s = get_attr[wq.weight_scale]; %z = get_attr[wq.weight_zp]
                                                  %q = quantize_per_channel(%w, %s, %z, 0, -128, 127, int8)
                                                  %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, int8)
                                                  %y = aten.linear(%x, %d)

w4 is asymmetric uint4 (0..15) with one scale and zero point per ``group_size`` input channels of each row
(``quantize_per_channel_group``). w8a8 adds dynamic int8 activations: per token (row), asymmetric, qparams
chosen at run time (``choose_qparams_per_token_asymmetric`` → ``quantize_per_token`` →
``dequantize_per_token`` in front of the linear's input). w8a8-static quantizes each linear input per
tensor with constants calibrated on ``ctx.calib_tokens`` (``quantize_per_tensor`` → ``dequantize_per_tensor``,
one pair per input, shared by the q/k/v that read it; observers in ``observers.py``). fp8 is e4m3 with one
scale per output channel for weights and per token for activations (``passforge::quantize_fp8`` /
``dequantize_fp8``: torch's Q/DQ ops round fp8 to integers). Weight scales are the weights' min/max
(round-to-nearest; ``gptq`` refines the rounding); the error is measured by the profile. Weights with
NaN/Inf are an error naming the layer; an all-zero row or group gets scale 1 (zero is exact). Idempotent: a
weight that already goes through a dequantize is not a parameter read any more.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from passforge.ir.graph import add_buffer, get_attr
from passforge.kernels.fp8 import FP8_MAX, MIN_SCALE, fp8_scale
from passforge.passes.base import Context, Pass, PassError, PassResult
from passforge.passes.quantize.calibrate import calibration_inputs, memo_get, memo_put, observe
from passforge.passes.quantize.observers import Method, RangeObserver, int8_affine_qparams
from passforge.passes.registry import register

aten = torch.ops.aten
Scheme = Literal["w8", "w4", "w8a8", "w8a8-static", "fp8"]


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
    of ``group_size`` inputs, asymmetric), ``w8a8`` (w8 weights and int8 activations, per token, asymmetric,
    scales computed at run time) or ``w8a8-static`` (w8 weights and int8 activations, per tensor, asymmetric,
    one range per linear input from ``calib_windows`` windows of calibration data by ``observer``: minmax,
    moving-average, percentile (``percentile``), mse or entropy). ``skip``: ``;``-separated globs of weight
    names left in float, matched against the name or any trailing part of it (default ``lm_head*``: the
    output projection is the most sensitive layer); ``only``: if set, globs of the only weights quantized.
    ``decode_scheme``: the scheme for the one-token decode graph (``same``: ``scheme``) — int8 activations
    pay off in a compute-bound prefill, not in a weight-bound decode step."""

    name: ClassVar[str] = "quantize"
    lossy: ClassVar[bool] = True
    max_rel_err: ClassVar[float | None] = 0.5  # collapse guard only; the profile measures the real cost
    scheme: Scheme = "w8"
    group_size: int = 128
    skip: str = "lm_head*"
    only: str = ""
    decode_scheme: Literal["same", "w8", "w4", "w8a8", "w8a8-static", "fp8"] = "same"
    observer: Method = "minmax"
    percentile: float = 99.99
    calib_windows: int = 32

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calib_windows < 1:
            raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")

    @property
    def needs_calibration(self) -> bool:
        return "w8a8-static" in (self.scheme, self.decode_scheme)

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops

        scheme = self.scheme if ctx.role != "decode" or self.decode_scheme == "same" else self.decode_scheme
        targets, skipped = self.targets(gm, scheme)
        notes: list[str] = []
        static = self._static_activation_qparams(gm, ctx, targets, notes) if scheme == "w8a8-static" else {}
        done: dict[str, fx.Node] = {}  # weight name -> its dequantize: a shared (tied) weight is quantized once
        activations: dict[fx.Node, fx.Node] = {}  # x -> its static fake quant, shared by the linears reading x
        for linear, weight in targets:
            if weight.target not in done:
                done[weight.target] = self._insert(gm, linear, weight, scheme)
            if scheme in ("w8a8", "fp8"):
                with gm.graph.inserting_before(linear):
                    (_fake_quantize_activation if scheme == "w8a8" else _fake_quantize_fp8_activation)(gm.graph, linear)
            elif scheme == "w8a8-static":
                x = linear_operands(linear)[0]
                if x not in activations:
                    activations[x] = _fake_quantize_static(gm.graph, x, *static[x])
                linear.replace_input_with(x, activations[x])
            linear.replace_input_with(weight, done[weight.target])
        gm.recompile()
        stats = {"quantized": len(targets), "skipped": skipped}
        if static:
            stats["activation_ranges"] = len(static)
        return PassResult(gm, modified=bool(targets), stats=stats, notes=notes)

    def targets(self, gm: fx.GraphModule, scheme: str) -> tuple[list[tuple[fx.Node, fx.Node]], int]:
        """The linears to quantize with their weight nodes, and how many were skipped by name."""
        skips = [pattern for pattern in self.skip.split(";") if pattern]
        only = [pattern for pattern in self.only.split(";") if pattern]
        targets, skipped = [], 0
        for node in gm.graph.nodes:
            if node.target is not aten.linear.default:
                continue
            _, weight, _ = linear_operands(node)
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue  # already quantized, or a computed weight
            tensor = get_attr(gm, weight.target)
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() == 2):
                continue
            if any(name_matches(weight.target, p) for p in skips) or (
                only and not any(name_matches(weight.target, p) for p in only)
            ):
                skipped += 1
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise PassError(f"quantize: weight '{weight.target}' of node '{node.name}' holds NaN/Inf values")
            if scheme == "w4" and tensor.shape[1] % self.group_size:
                raise PassError(
                    f"quantize: weight '{weight.target}' has {tensor.shape[1]} input channels, not a multiple of "
                    f"group_size={self.group_size}; choose a group_size that divides it or skip the layer"
                )
            targets.append((node, weight))
        return targets, skipped

    def _static_activation_qparams(
        self, gm: fx.GraphModule, ctx: Context, targets: list[tuple[fx.Node, fx.Node]], notes: list[str]
    ) -> dict[fx.Node, tuple[float, int]]:
        """Per linear input: the int8 ``(scale, zero_point)`` its observer chose on calibration data — or the
        ones the same model's forward graph chose (``ctx.memo``), so prefill and decode graphs agree with it."""
        readers: dict[fx.Node, list[str]] = {}
        for linear, weight in targets:
            readers.setdefault(linear_operands(linear)[0], []).append(weight.target)
        ranges = {x: memo_get(ctx.memo, f"{self.spec}:range", names) for x, names in readers.items()}
        missing = [x for x, found in ranges.items() if found is None]
        if missing:
            observers = {x: RangeObserver(self.observer, f"'{readers[x][0]}' (node '{x.name}')",
                                          percentile=self.percentile) for x in missing}
            inputs = calibration_inputs(ctx, self.spec, self.calib_windows)
            observe(gm, inputs, {x: o.update for x, o in observers.items()}, label=f"{self.name}: ranges")
            if any(o.needs_histogram for o in observers.values()):
                for o in observers.values():
                    o.start_histogram()
                observe(gm, inputs, {x: o.update for x, o in observers.items()}, label=f"{self.name}: histograms")
            for x, o in observers.items():
                ranges[x] = o.range()
                memo_put(ctx.memo, f"{self.spec}:range", readers[x][0], ranges[x])
            notes.append(f"activation ranges: {self.observer} over {len(inputs)} calibration windows "
                         f"({len(missing)} inputs)")
            if ctx.role == "decode":
                notes.append("calibrated on one-token windows (this decode graph had no forward graph's ranges "
                             "to reuse)")
        return {x: int8_affine_qparams(*ranges[x]) for x in readers}

    def _insert(self, gm: fx.GraphModule, linear: fx.Node, weight: fx.Node, scheme: str) -> fx.Node:
        """Weight quantize → dequantize in front of ``linear``; returns the dequantize."""
        qd = torch.ops.quantized_decomposed
        tensor = get_attr(gm, weight.target)
        if scheme == "fp8":
            with gm.graph.inserting_before(linear):
                scales = add_buffer(gm, f"{weight.target}_scale", fp8_scale(tensor))  # (N, 1)
                q = gm.graph.call_function(torch.ops.passforge.quantize_fp8.default, (weight, scales))
                return gm.graph.call_function(torch.ops.passforge.dequantize_fp8.default, (q, scales, tensor.dtype))
        params = uint4_per_group(tensor, self.group_size) if scheme == "w4" else int8_per_channel(tensor)
        graph = gm.graph
        with graph.inserting_before(linear):
            scales = add_buffer(gm, f"{weight.target}_scale", params.scales)
            zero_points = add_buffer(gm, f"{weight.target}_zero_point", params.zero_points)
            common = (params.quant_min, params.quant_max, params.dtype)
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
        return dq


def linear_operands(node: fx.Node) -> tuple[object, object, object]:
    """``(x, weight, bias)`` of an ``aten.linear`` call, whether passed positionally or by keyword."""
    args = (*node.args, None, None)
    return (
        node.kwargs.get("input", args[0]),
        node.kwargs.get("weight", args[1]),
        node.kwargs.get("bias", args[2] if len(node.args) > 2 else None),
    )


def name_matches(name: str, pattern: str) -> bool:
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


def _fake_quantize_static(graph: fx.Graph, x: fx.Node, scale: float, zero_point: int) -> fx.Node:
    """x → quantize_per_tensor → dequantize_per_tensor with calibrated constants, right after x."""
    qd = torch.ops.quantized_decomposed
    common = (scale, zero_point, -128, 127, torch.int8)
    with graph.inserting_after(x):
        q = graph.call_function(qd.quantize_per_tensor.default, (x, *common))
    with graph.inserting_after(q):
        return graph.call_function(qd.dequantize_per_tensor.default, (q, *common), {"out_dtype": x.meta["val"].dtype})


def _fake_quantize_fp8_activation(graph: fx.Graph, linear: fx.Node) -> None:
    """x → e4m3 with one scale per token (amax / 448, chosen at run time) → back to x's dtype."""
    x = linear_operands(linear)[0]
    amax = graph.call_function(aten.amax.default, (graph.call_function(aten.abs.default, (x,)), [-1], True))
    scale = graph.call_function(aten.clamp_min.default, (graph.call_function(aten.div.Tensor, (amax, FP8_MAX)),
                                                         MIN_SCALE))
    q = graph.call_function(torch.ops.passforge.quantize_fp8.default, (x, scale))
    dq = graph.call_function(torch.ops.passforge.dequantize_fp8.default, (q, scale, x.meta["val"].dtype))
    linear.replace_input_with(x, dq)
