"""``gptq(damp=0.01, calib_windows=32)``: choose the integer weights that ``quantize`` rounds to by GPTQ
(Frantar et al. 2023) instead of round-to-nearest, so int4 costs far less accuracy.

Round-to-nearest makes each weight's error independently; GPTQ quantizes a row's weights one input column at
a time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
of the layer's Hessian ``H = X^T X`` (X: the linear's inputs on calibration data) — minimising
``||X W^T - X Q^T||`` rather than ``||W - Q||``. Column blocks of 128 with lazy updates; dampening
``damp * mean(diag H)``; for groups, each group's scale and zero point are chosen when the group's first column
is reached, from the already error-compensated weights (as the reference implementation does).

Runs after ``quantize(scheme=w8|w4|w8a8|w8a8-static)`` on the weights it fake-quantized: the graph keeps its
quantize → dequantize nodes; the weight tensor becomes the GPTQ-dequantized values (exact grid points, so the
quantize node rounds them to exactly GPTQ's integers) and, for groups, the scale and zero-point buffers the new
ones. ``fold-quant`` and ``lower-quant`` work unchanged. Before → after::

    %w = get_attr[wq.weight]                      %w = get_attr[wq.weight]        # now GPTQ's dequantized W
    %q = quantize_per_channel_group(%w, %s, %z)   %q = quantize_per_channel_group(%w, %s, %z)   # s, z: GPTQ's
    %d = dequantize_per_channel_group(%q, ...)    (unchanged)

The Hessians come from one calibration pass over the graph as ``quantize`` left it: every linear's input as it
arrives through the round-to-nearest fake-quantized layers before it (and, for w8a8 schemes, the fake-quantized
activation itself) — not layer by layer through GPTQ's own earlier results. A weight whose quantize node shows
GPTQ's mark (``node.meta["passforge.gptq"]``) is not quantized again (idempotent); the prefill and decode graphs
reuse the forward graph's result (``ctx.memo``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from passforge.ir.graph import get_attr, set_tensor_attr
from passforge.passes.base import Context, Pass, PassError, PassResult
from passforge.passes.quantize.calibrate import calibration_inputs, memo_get, memo_put, observe
from passforge.passes.quantize.insert import linear_operands
from passforge.passes.registry import register

aten = torch.ops.aten
GPTQ_META = "passforge.gptq"
BLOCK = 128


@dataclass
class _Target:
    linear: fx.Node
    quantize: fx.Node  # quantize_per_channel[_group](get_attr w, get_attr scales, get_attr zero points, ...)
    group_size: int | None  # None: per output channel

    @property
    def weight_name(self) -> str:
        return self.quantize.args[0].target


@register
@dataclass(frozen=True)
class GPTQ(Pass):
    """Error-compensating rounding of the weights ``quantize`` fake-quantized (int8 per channel, uint4 per
    group), from the layer Hessians on calibration data."""

    name: ClassVar[str] = "gptq"
    lossy: ClassVar[bool] = True
    max_rel_err: ClassVar[float | None] = 0.5  # collapse guard only; the profile measures the real cost
    damp: float = 0.01
    calib_windows: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.calib_windows < 1:
            raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")

    @property
    def needs_calibration(self) -> bool:
        return True

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        targets = _targets(gm)
        if not targets:
            return PassResult(gm, modified=False, stats={"gptq": 0})
        results = {t.weight_name: memo_get(ctx.memo, _memo_kind(self, t), [t.weight_name]) for t in targets}
        todo = [t for t in targets if results[t.weight_name] is None]
        if todo:
            hessians = self._hessians(gm, ctx, todo)
            for t in todo:
                x = linear_operands(t.linear)[0]
                dtype = get_attr(gm, t.weight_name).dtype
                weight, scales, zero_points = self._quantize(gm, t, hessians[x])
                results[t.weight_name] = (weight.to(dtype), scales, zero_points)  # memo: the weight's own dtype
                memo_put(ctx.memo, _memo_kind(self, t), t.weight_name, results[t.weight_name])
        for t in targets:
            weight, scales, zero_points = results[t.weight_name]
            w_node, s_node, z_node = t.quantize.args[:3]
            old = get_attr(gm, w_node.target)
            set_tensor_attr(gm, w_node.target, weight.to(old.dtype))
            if t.group_size is not None:
                set_tensor_attr(gm, s_node.target, scales.to(get_attr(gm, s_node.target).dtype))
                set_tensor_attr(gm, z_node.target, zero_points.to(get_attr(gm, z_node.target).dtype))
            t.quantize.meta[GPTQ_META] = True
        gm.recompile()
        return PassResult(gm, modified=True, stats={"gptq": len(targets)})

    def _hessians(self, gm: fx.GraphModule, ctx: Context, targets: list[_Target]) -> dict[fx.Node, torch.Tensor]:
        """``X^T X / tokens`` (fp32) for each distinct linear input."""
        sums: dict[fx.Node, torch.Tensor] = {}
        tokens: dict[fx.Node, int] = {}

        def accumulate(x: fx.Node):
            def add(value: torch.Tensor) -> None:
                rows = value.float().reshape(-1, value.shape[-1])  # (T, K)
                sums[x] = sums[x] + rows.T @ rows if x in sums else rows.T @ rows
                tokens[x] = tokens.get(x, 0) + rows.shape[0]

            return add

        inputs = {linear_operands(t.linear)[0] for t in targets}
        windows = calibration_inputs(ctx, self.spec, self.calib_windows)
        observe(gm, windows, {x: accumulate(x) for x in inputs}, label=f"{self.name}: Hessians")
        return {x: sums[x] / tokens[x] for x in inputs}

    def _quantize(self, gm: fx.GraphModule, target: _Target, hessian: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = target.quantize
        w = get_attr(gm, target.weight_name).float()
        if target.group_size is None:
            scales = get_attr(gm, q.args[1].target).float()
            quant_min, quant_max = q.args[4], q.args[5]
            return (*gptq_per_channel(w, hessian, scales, quant_min, quant_max, self.damp, target.weight_name), None)
        quant_min, quant_max = q.args[3], q.args[4]
        return gptq_per_group(w, hessian, target.group_size, quant_min, quant_max, self.damp, target.weight_name)


def _memo_kind(gptq: GPTQ, target: _Target) -> str:
    """What a remembered result depends on besides the weight: the pass's options and the quantization it
    rounds to (a decode graph with another ``decode_scheme`` must not take the forward graph's grid)."""
    q = target.quantize
    return f"{gptq.spec}:w:{q.target}:{q.args[3:]}"  # axis or group size, range, dtype


def _targets(gm: fx.GraphModule) -> list[_Target]:
    qd = torch.ops.quantized_decomposed
    found = []
    for node in gm.graph.nodes:
        if node.target is not aten.linear.default:
            continue
        dq = linear_operands(node)[1]
        if not (isinstance(dq, fx.Node) and dq.target in (qd.dequantize_per_channel.default,
                                                           qd.dequantize_per_channel_group.default)):
            continue
        q = dq.args[0]
        if not (isinstance(q, fx.Node) and q.target in (qd.quantize_per_channel.default,
                                                         qd.quantize_per_channel_group.default)):
            continue
        if q.meta.get(GPTQ_META) or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in q.args[:3]):
            continue
        if any(u is not dq for u in q.users) or any(_linear_of(u) is None for u in dq.users):
            continue
        per_group = q.target is qd.quantize_per_channel_group.default
        if not per_group and q.args[3] != 0:
            continue  # per-channel along another axis: not a row-wise weight quantization
        if any(t.quantize is q for t in found):
            continue  # a weight shared by several linears: its Hessian is the first reader's
        found.append(_Target(node, q, int(q.args[6]) if per_group else None))
    return found


def _linear_of(node: fx.Node) -> fx.Node | None:
    return node if node.target is aten.linear.default else None


def inverse_hessian_factor(
    hessian: torch.Tensor, w: torch.Tensor, damp: float, where: str, *, pass_name: str, fix: str
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (GPTQ's and SparseGPT's column sweep);
    dead inputs (never non-zero) get weight 0 (in ``w``) and a unit diagonal. ``fix``: the spec to suggest
    when ``H`` is not positive definite."""
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise PassError(
            f"{pass_name}: the Hessian of '{where}' is not positive definite even with dampening {damp}; raise "
            f"damp ({fix}) or give more calibration data"
        ) from exc


def _gptq(
    w: torch.Tensor,
    hinv: torch.Tensor,
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor],
    on_group_start: Callable[[int, torch.Tensor], None] | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """The GPTQ column loop with lazy block updates (``w`` is updated in place); returns the dequantized
    weights. Blocks are a multiple of ``group_size``, so a group's columns are all in the current block when
    ``on_group_start(column, group's current weights)`` chooses its parameters."""
    cols = w.shape[1]
    out = torch.zeros_like(w)
    block = max(BLOCK, group_size) // group_size * group_size if group_size else BLOCK
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        errors = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if on_group_start is not None and (i1 + i) % group_size == 0:
                on_group_start(i1 + i, w1[:, i:i + group_size])
            column = w1[:, i]
            dequantized = quantize_column(i1 + i, column)
            out[:, i1 + i] = dequantized
            error = (column - dequantized) / h1[i, i]
            w1[:, i:] -= error[:, None] @ h1[i, i:][None, :]
            errors[:, i] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return out


def gptq_per_channel(
    w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, quant_min: int, quant_max: int, damp: float,
    where: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weights (the scales ``quantize`` chose): GPTQ-dequantized ``w`` and the
    scales."""
    w = w.clone()
    hinv = inverse_hessian_factor(hessian, w, damp, where, pass_name="gptq", fix="gptq(damp=0.1)")

    def quantize_column(_: int, column: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(column / scales), quant_min, quant_max) * scales

    return _gptq(w, hinv, quantize_column), scales


def gptq_per_group(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int, quant_min: int, quant_max: int, damp: float,
    where: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group weights: GPTQ-dequantized ``w`` and the groups' scales and zero points (N, K/g),
    each chosen min/max over the group's error-compensated weights when the group starts."""
    w = w.clone()
    hinv = inverse_hessian_factor(hessian, w, damp, where, pass_name="gptq", fix="gptq(damp=0.1)")
    rows, cols = w.shape
    scales = torch.ones(rows, cols // group_size, device=w.device)
    zero_points = torch.zeros(rows, cols // group_size, dtype=torch.int32, device=w.device)

    def on_group_start(col: int, group: torch.Tensor) -> None:
        low = group.amin(dim=1).clamp(max=0)
        high = group.amax(dim=1).clamp(min=0)
        span = high - low
        s = torch.where(span > 0, span / (quant_max - quant_min), torch.ones_like(span))
        scales[:, col // group_size] = s
        zero_points[:, col // group_size] = torch.clamp(torch.round(quant_min - low / s), quant_min, quant_max).int()

    def quantize_column(col: int, column: torch.Tensor) -> torch.Tensor:
        s, z = scales[:, col // group_size], zero_points[:, col // group_size].float()
        return (torch.clamp(torch.round(column / s) + z, quant_min, quant_max) - z) * s

    return _gptq(w, hinv, quantize_column, on_group_start, group_size), scales, zero_points
