"""``smooth-quant(alpha=0.5, search=false)``: move activation outliers into the weights before int8
activations (SmoothQuant, Xiao et al. 2023), so per-tensor int8 has a useful step for every channel.

LLM activations have a few channels with 10-100x the magnitude of the rest; per-tensor int8 spends its 256
levels on them and rounds the other channels to a handful of values. For a linear whose input comes from a
norm's per-channel scale ``g`` (``x = n * g``), dividing ``g`` by ``s`` and multiplying the weight's input
columns by ``s`` computes exactly the same function, with ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``:
the outlier channels shrink in the activation and grow in the weight, which per-channel weight quantization
absorbs. The same works wherever the input is a per-channel product with a tensor we own: LLaMA's
down_proj reads ``silu(gate(h)) * up(h)``, so ``1/s`` goes into up_proj's output rows (this is where the
bundled LM's largest outliers are: 78 against ~5 elsewhere). Before → after (the norm's scale feeding q/k/v;
one ``s`` for all the linears reading it)::

    %g = get_attr[attention_norm.weight]            %g = get_attr[attention_norm.weight]      # now g / s
    %x = aten.mul(%n, %g)                     →     %x = aten.mul(%n, %g)
    %q = aten.linear(%x, %wq)  (and k, v)           %q = aten.linear(%x, %wq)                 # now wq * s

``max|x_j|`` comes from calibration data (``calib_windows`` windows). ``search=true`` chooses alpha per norm
from 0.05 .. 0.95: the one whose w8a8-static fake-quantized outputs (per-tensor min/max activations,
per-channel weights) are closest to the float outputs on up to 2048 calibration tokens of that norm's
output. Where the norm's output also reaches something other than linears (or a linear whose weight is
computed or shared elsewhere), that norm is left alone. Smoothed: q/k/v and gate/up (norms) and down_proj
(up_proj); not o_proj (its input comes through attention and grouped heads: no per-channel tensor of its
own to fold into). Idempotent: a
smoothed norm is marked (``node.meta["passforge.smoothed"]``) and not smoothed again. The prefill and
decode graphs of a model reuse the forward graph's ``s`` (``ctx.memo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from passforge.ir.graph import get_attr, set_tensor_attr
from passforge.passes.base import BF16_ULP, Context, Pass, PassResult, computes_in_low_precision, output_scale
from passforge.passes.quantize.calibrate import calibration_inputs, memo_get, memo_put, observe
from passforge.passes.quantize.insert import int8_per_channel, linear_operands
from passforge.passes.quantize.observers import int8_affine_qparams
from passforge.passes.registry import register

aten = torch.ops.aten
SMOOTHED_META = "passforge.smoothed"
ALPHAS = tuple(a / 100 for a in range(5, 100, 5))
SEARCH_TOKENS = 2048


@dataclass
class _Group:
    """A per-channel scale to fold ``1/s`` into — a norm's ``g`` (``source`` is its get_attr) or the output
    rows of a linear (``source`` is that linear) — and the linears reading the scaled value."""

    mul: fx.Node
    source: fx.Node
    x: fx.Node  # what the linears read: the mul, or a dtype cast of it
    linears: list[fx.Node]

    @property
    def name(self) -> str:
        """The tensor ``1/s`` goes into: the norm's weight, or the producing linear's weight."""
        return self.source.target if self.source.op == "get_attr" else linear_operands(self.source)[1].target


@register
@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Migrate activation outliers from norm outputs into the linears' weights (same function, better
    suited to int8 activations); run before ``quantize(scheme=w8a8-static|w8a8)``."""

    name: ClassVar[str] = "smooth-quant"
    lossy: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-4  # the function is unchanged; float rounding of the rescaled values only
    atol: ClassVar[float] = 1e-4
    alpha: float = 0.5
    search: bool = False
    calib_windows: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calib_windows < 1:
            raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")

    def tolerance(self, before: fx.GraphModule, expected: list[torch.Tensor]) -> tuple[float, float]:
        """fp32: reassociation only (relative 1e-4). A bf16 graph rounds the rescaled weights and norm scales
        to bf16 again (2^-8 each, compounding through the layers): allow 4 ulp of bf16 of the output scale."""
        if not computes_in_low_precision(before):
            return self.rtol, self.atol
        return 0.0, 4 * BF16_ULP * output_scale(expected)

    @property
    def needs_calibration(self) -> bool:
        return True

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        groups = _norm_groups(gm)
        if not groups:
            return PassResult(gm, modified=False, stats={"smoothed": 0})
        factors = {g.mul: memo_get(ctx.memo, f"{self.spec}:s", [g.name]) for g in groups}
        todo = [g for g in groups if factors[g.mul] is None]
        notes = []
        if todo:
            amax, samples = self._calibrate(gm, ctx, todo)
            for g in todo:
                alpha = self._best_alpha(gm, g, amax[g.x], samples[g.x]) if self.search else self.alpha
                factors[g.mul] = _factors(amax[g.x], _weight_amax(gm, g), alpha)
                memo_put(ctx.memo, f"{self.spec}:s", g.name, factors[g.mul])
                if self.search:
                    notes.append(f"{g.name}: alpha {alpha:.2f}")
        for g in groups:
            _apply(gm, g, factors[g.mul])
        gm.recompile()
        return PassResult(gm, modified=True, stats={"smoothed": len(groups)}, notes=notes)

    def _calibrate(
        self, gm: fx.GraphModule, ctx: Context, groups: list[_Group]
    ) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, list[torch.Tensor]]]:
        """Per group input: max |x_j| per channel, and (for the search) a sample of its rows."""
        amax: dict[fx.Node, torch.Tensor] = {}
        samples: dict[fx.Node, list[torch.Tensor]] = {g.x: [] for g in groups}

        def recorder(x: fx.Node):
            def record(value: torch.Tensor) -> None:
                rows = value.float().reshape(-1, value.shape[-1])
                current = rows.abs().amax(dim=0)
                amax[x] = current if x not in amax else torch.maximum(amax[x], current)
                if self.search and sum(len(s) for s in samples[x]) < SEARCH_TOKENS:
                    samples[x].append(rows)

            return record

        inputs = calibration_inputs(ctx, self.spec, self.calib_windows)
        observe(gm, inputs, {g.x: recorder(g.x) for g in groups}, label=f"{self.name}: activation maxima")
        return amax, samples

    def _best_alpha(self, gm: fx.GraphModule, group: _Group, amax: torch.Tensor, rows: list[torch.Tensor]) -> float:
        import passforge.kernels.ops  # noqa: F401 - registers torch's Q/DQ ops the search fake-quantizes with

        x = torch.cat(rows)[:SEARCH_TOKENS]  # (T, C)
        weights = [get_attr(gm, linear_operands(n)[1].target).float() for n in group.linears]
        w = torch.cat(weights)  # (N_total, C)
        reference = x @ w.T
        w_amax = w.abs().amax(dim=0)
        errors = {}
        for alpha in ALPHAS:
            s = _factors(amax, w_amax, alpha)
            errors[alpha] = float(((_fake_quant_x(x / s) @ _fake_quant_w(w * s).T) - reference).pow(2).mean())
        return min(errors, key=errors.get)


def _norm_groups(gm: fx.GraphModule) -> list[_Group]:
    """Per-channel products read only by linears (directly or through a dtype cast) whose weights are
    parameters read nowhere else: ``n * g`` with ``g`` a 1-D parameter (a norm's scale), or ``a * b`` with
    ``b`` a linear read only there (LLaMA's ``silu(gate(h)) * up(h)``, down_proj's input: ``1/s`` goes into
    up's output rows)."""
    groups = []
    for node in gm.graph.nodes:
        if node.target is not aten.mul.Tensor or node.meta.get(SMOOTHED_META):
            continue
        source = next((a for a in node.args if _is_vector_param(gm, a, node)), None)
        if source is None:
            source = next((a for a in node.args if _is_private_linear(gm, a, node)), None)
        if source is None or len(source.users) != 1:
            continue
        x = node
        if len(x.users) == 1 and _is_cast(next(iter(x.users))):
            x = next(iter(x.users))
        linears = list(x.users)
        if not linears or not all(_smoothable_linear(gm, n, x) for n in linears):
            continue
        groups.append(_Group(node, source, x, linears))
    return groups


def _is_private_linear(gm: fx.GraphModule, arg: object, mul: fx.Node) -> bool:
    """A linear read only by ``mul`` (and not by its own other operand), with a parameter weight of its own."""
    if not (isinstance(arg, fx.Node) and arg.target is aten.linear.default and set(arg.users) == {mul}
            and mul.args.count(arg) == 1 and _has_private_weight(gm, arg)):
        return False
    out, product = arg.meta.get("val"), mul.meta.get("val")  # a width-1 output would broadcast, not scale
    return out is not None and product is not None and out.shape[-1] == product.shape[-1] and out.shape[-1] > 1


def _has_private_weight(gm: fx.GraphModule, linear: fx.Node) -> bool:
    _, weight, bias = linear_operands(linear)
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and len(weight.users) == 1):
        return False
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1):
        return False
    return get_attr(gm, weight.target).dim() == 2


def _is_vector_param(gm: fx.GraphModule, arg: object, mul: fx.Node) -> bool:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return False
    tensor = get_attr(gm, arg.target)
    val = mul.meta.get("val")
    return (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() == 1
            and val is not None and val.dim() >= 1 and tensor.shape[0] == val.shape[-1])


def _is_cast(node: fx.Node) -> bool:
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"} and len(node.args) == 1


def _smoothable_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    return node.target is aten.linear.default and linear_operands(node)[0] is x and _has_private_weight(gm, node)


def _weight_amax(gm: fx.GraphModule, group: _Group) -> torch.Tensor:
    weights = [get_attr(gm, linear_operands(n)[1].target).float().abs().amax(dim=0) for n in group.linears]
    return torch.stack(weights).amax(dim=0)


def _factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``; 1 where a channel is all zero (nothing to move)."""
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))


def _apply(gm: fx.GraphModule, group: _Group, s: torch.Tensor) -> None:
    """g / s (or the producing linear's rows and bias / s) and W * s, as new tensors under the same names;
    the product is marked smoothed."""
    if group.source.op == "get_attr":
        g = get_attr(gm, group.source.target)
        set_tensor_attr(gm, group.source.target, (g.float() / s).to(g.dtype))
    else:
        _, weight, bias = linear_operands(group.source)
        w = get_attr(gm, weight.target)
        set_tensor_attr(gm, weight.target, (w.float() / s[:, None]).to(w.dtype))
        if bias is not None:
            b = get_attr(gm, bias.target)
            set_tensor_attr(gm, bias.target, (b.float() / s).to(b.dtype))
    for linear in group.linears:
        name = linear_operands(linear)[1].target
        w = get_attr(gm, name)
        set_tensor_attr(gm, name, (w.float() * s).to(w.dtype))
    group.mul.meta[SMOOTHED_META] = True


def _fake_quant_x(x: torch.Tensor) -> torch.Tensor:
    """What w8a8-static with the minmax observer makes of ``x``: per-tensor asymmetric int8, torch's Q/DQ."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:
        return x  # all zero: exact
    qd = torch.ops.quantized_decomposed
    common = (*int8_affine_qparams(lo, hi), -128, 127, torch.int8)
    return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *common), *common)


def _fake_quant_w(w: torch.Tensor) -> torch.Tensor:
    """What ``quantize`` makes of a weight: symmetric int8 per output channel, torch's Q/DQ."""
    qd = torch.ops.quantized_decomposed
    params = int8_per_channel(w)
    q = qd.quantize_per_channel(w, params.scales, params.zero_points, 0, -128, 127, torch.int8)
    return qd.dequantize_per_channel(q, params.scales, None, 0, -128, 127, torch.int8)
