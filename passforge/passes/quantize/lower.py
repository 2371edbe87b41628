"""``lower-quant(guard=true, prefer=size|speed)``: dequantize → linear on stored int8 weights becomes the
fastest form this machine has for it — measured, not assumed.

Before → after (when the kernel wins)::

    %q = get_attr[wq.weight_int8]                              %q = get_attr[wq.weight_int8]
    %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, i8)  %y = passforge.int8_weight_linear(%x, %q, %s, %b)
    %y = aten.linear(%x, %d, %b)                         →

Candidates per layer: ``int8_weight_linear`` (the kernel: on CPU PyTorch's ``_weight_int8pack_mm``; int8
weights streamed, never materialised in float), ``dequantize+linear`` (leave the graph as it is), and with
``prefer=speed`` also ``float weight`` (dequantize once, now, and store the float weight: the quantization
error stays, the size win goes — for machines whose int8 kernels lose to float GEMMs). The speed guard times
the candidates once per (shape, dtype, device) on the pipeline's device — medians, round-robin, cached for
the process; "as is" is timed as the exact ops the graph runs — and keeps the fastest; every layer's choice
and timings are in ``node.meta["passforge.kernel"]``, the counters and the pass's report notes.
``guard=false`` lowers every eligible layer to the kernel. Verified against the graph before it with the
bounds in :meth:`LowerQuant.tolerance` (float reassociation in fp32; more for bf16 and for w8a8).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from passforge.ir.graph import add_buffer, get_attr
from passforge.passes.base import Context, Pass, PassResult
from passforge.passes.cleanup import eliminate_dead_code
from passforge.passes.quantize.insert import linear_operands
from passforge.passes.registry import register
from passforge.runtime.profile import interleaved_latency_ms

aten = torch.ops.aten
KERNEL_META = "passforge.kernel"


@register
@dataclass(frozen=True)
class LowerQuant(Pass):
    """Per layer, replace int8 weight dequantize → linear with the fastest measured form: the int8
    weight-only kernel, the graph as it is, or (``prefer=speed``) a float weight dequantized once.
    ``guard=false``: always the kernel."""

    name: ClassVar[str] = "lower-quant"
    rtol: ClassVar[float] = 1e-4  # fp32: the kernel only sums in another order
    atol: ClassVar[float] = 1e-4
    guard: bool = True
    prefer: Literal["size", "speed"] = "size"

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """Relative to the largest output magnitude: in a bf16/fp16 graph the kernels round accumulations
        differently (allow 2 ulp of bf16, 2 * 2^-7); with dynamic int8 activations a last-bit difference
        upstream can flip one activation's rounding by one step (1/255 of its token's range) in any layer
        (allow 2%, measured 0.5% on the bundled LM); with both, the graph before also rounds every dequantized
        activation to bf16, which the integer kernel does not (allow 4 ulp more; measured 3.1% in total on
        llama-100m). fp32 weight-only: float reassociation only."""
        nodes = before.graph.nodes
        dynamic = any(n.target is torch.ops.quantized_decomposed.quantize_per_token.default for n in nodes)
        low = any(getattr(n.meta.get("val"), "dtype", None) in (torch.bfloat16, torch.float16) for n in nodes)
        if not (dynamic or low):
            return self.rtol, self.atol
        scale = max((float(t.abs().max()) for t in expected if t.is_floating_point() and t.numel()), default=1.0)
        fraction = (0.02 if dynamic else 0.0) + ((4 if dynamic else 2) * 2**-7 if low else 0.0)
        return 0.0, fraction * scale

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        import passforge.kernels.ops  # noqa: F401 - registers the ops

        dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
        counts = dict.fromkeys(CANDIDATES, 0)
        notes: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.target is not aten.linear.default:
                continue
            x, dq, _ = linear_operands(node)
            if not (isinstance(dq, fx.Node) and dq.target is dequantize and _is_symmetric_int8(gm, dq)):
                continue
            source = _dynamic_activation_source(x)
            if source is not None:  # w8a8: x is fake-quantized per token
                x = source
                decision = _choose(gm, x, dq.args[0], ctx.device, allow_float=False, dynamic=True) if self.guard \
                    else {"kernel": DYNAMIC}
            elif self.guard:
                decision = _choose(gm, x, dq.args[0], ctx.device, allow_float=self.prefer == "speed")
            else:
                decision = {"kernel": KERNEL}
            node.meta[KERNEL_META] = decision
            counts[decision["kernel"]] += 1
            if "timings_ms" in decision:
                key = f"{_shape_key(gm, x, dq)}{' (w8a8)' if source is not None else ''}"
                timings = ", ".join(f"{k} {v:.3f} ms" for k, v in decision["timings_ms"].items())
                notes.setdefault(key, f"{key}: {decision['kernel']} ({timings})")
            _rewrite(gm, node, x, dq, decision["kernel"])
        eliminate_dead_code(gm)
        gm.recompile()
        stats = {"lowered": counts[KERNEL] + counts[DYNAMIC], "kept": counts[KEEP], "float": counts[FLOAT]}
        modified = bool(stats["lowered"] or stats["float"])
        return PassResult(gm, modified=modified, stats=stats, notes=list(notes.values()))


KERNEL, DYNAMIC, KEEP, FLOAT = "int8_weight_linear", "int8_dynamic_linear", "dequantize+linear", "float weight"
CANDIDATES = (KERNEL, DYNAMIC, KEEP, FLOAT)


def _dynamic_activation_source(x: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is dequantize_per_token(quantize_per_token(x, s, z), s, z) with (s, z) chosen from
    x at run time (what ``quantize(scheme=w8a8)`` inserts); None otherwise."""
    qd = torch.ops.quantized_decomposed
    if not (isinstance(x, fx.Node) and x.target is qd.dequantize_per_token.default):
        return None
    q = x.args[0]
    if not (isinstance(q, fx.Node) and q.target is qd.quantize_per_token.default):
        return None
    source, scales, zero_points = q.args[0], q.args[1], q.args[2]
    if tuple(x.args[1:3]) != (scales, zero_points) or tuple(q.args[3:6]) != (-128, 127, torch.int8):
        return None  # dequantized with other qparams, or another range: not what the kernel computes
    if tuple(x.args[3:6]) != (-128, 127, torch.int8):
        return None
    chooser = scales.args[0] if isinstance(scales, fx.Node) and scales.target is operator.getitem else None
    if not (isinstance(chooser, fx.Node) and chooser.target is qd.choose_qparams_per_token_asymmetric.default):
        return None
    expected = [(operator.getitem, (chooser, 0)), (operator.getitem, (chooser, 1))]
    found = [(n.target, tuple(n.args)) if isinstance(n, fx.Node) else None for n in (scales, zero_points)]
    if found != expected or chooser.args[0] is not source:
        return None
    return source


def _rewrite(gm: fx.GraphModule, linear: fx.Node, x: fx.Node, dq: fx.Node, kernel: str) -> None:
    bias = linear_operands(linear)[2]
    weight, scales = dq.args[0], dq.args[1]
    if kernel == KEEP:
        return
    with gm.graph.inserting_before(linear):
        if kernel in (KERNEL, DYNAMIC):
            op = torch.ops.passforge.int8_weight_linear if kernel == KERNEL else torch.ops.passforge.int8_dynamic_linear
            fused = gm.graph.call_function(op.default, (x, weight, scales, bias))
            fused.meta[KERNEL_META] = linear.meta[KERNEL_META]
            linear.replace_all_uses_with(fused)
            return
        dtype = x.meta["val"].dtype
        value = get_attr(gm, weight.target).to(dtype) * get_attr(gm, scales.target).to(dtype)[:, None]
        float_weight = add_buffer(gm, weight.target.removesuffix("_int8") + "_dequantized", value)
    linear.replace_input_with(dq, float_weight)


def _shape_key(gm: fx.GraphModule, x: fx.Node, dq: fx.Node) -> str:
    rows, cols = get_attr(gm, dq.args[0].target).shape
    return f"x{tuple(x.meta['val'].shape)} @ int8[{rows}, {cols}]"


def _is_symmetric_int8(gm: fx.GraphModule, dq: fx.Node) -> bool:
    weight, scales, zero_points = dq.args[0], dq.args[1], dq.args[2]
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (weight, scales)):
        return False
    if get_attr(gm, weight.target).dtype != torch.int8 or tuple(dq.args[3:7]) != (0, -128, 127, torch.int8):
        return False  # per output channel (axis 0), full int8 range: what the kernels assume
    if get_attr(gm, scales.target).shape != (get_attr(gm, weight.target).shape[0],):
        return False
    if zero_points is None:
        return True
    return isinstance(zero_points, fx.Node) and zero_points.op == "get_attr" and not get_attr(
        gm, zero_points.target
    ).any()


def _choose(
    gm: fx.GraphModule, x: fx.Node, weight: fx.Node, device: torch.device, *, allow_float: bool,
    dynamic: bool = False,
) -> dict[str, object]:
    val = x.meta["val"]
    shape = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in val.shape)
    timings = dict(_timings(shape, val.dtype, tuple(get_attr(gm, weight.target).shape), str(device), dynamic))
    allowed = {k: v for k, v in timings.items() if allow_float or k != FLOAT}
    return {"kernel": min(allowed, key=allowed.get), "timings_ms": allowed}


@functools.cache
def _timings(
    x_shape: tuple[int, ...], dtype: torch.dtype, w_shape: tuple[int, int], device: str, dynamic: bool
) -> tuple[tuple[str, float], ...]:
    """Median ms of each candidate on random data of these shapes, timed round-robin (once per process; the
    key holds what changes the answer: shapes, dtype, device, activation quantization — thread count is
    fixed per process)."""
    qd = torch.ops.quantized_decomposed

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    w = torch.randint(-127, 128, w_shape, generator=generator, dtype=torch.int8).to(device)
    scales = (torch.rand(w_shape[0], generator=generator) / 100).to(device)
    float_weight = w.to(dtype) * scales.to(dtype)[:, None]
    def as_is() -> torch.Tensor:  # exactly the ops the graph runs when it is left alone
        weight = qd.dequantize_per_channel(w, scales, None, 0, -128, 127, torch.int8, out_dtype=dtype)
        if not dynamic:
            return torch.nn.functional.linear(x, weight)
        x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        qx = qd.quantize_per_token(x, x_scales, x_zero_points, -128, 127, torch.int8)
        dqx = qd.dequantize_per_token(qx, x_scales, x_zero_points, -128, 127, torch.int8, dtype)
        return torch.nn.functional.linear(dqx, weight)

    if dynamic:
        candidates = {DYNAMIC: lambda: torch.ops.passforge.int8_dynamic_linear.default(x, w, scales, None)}
    else:
        candidates = {
            KERNEL: lambda: torch.ops.passforge.int8_weight_linear.default(x, w, scales, None),
            FLOAT: lambda: torch.nn.functional.linear(x, float_weight),
        }
    candidates[KEEP] = as_is
    medians = interleaved_latency_ms(
        list(candidates.values()), device=torch.device(device), repeats=10, warmup=2, min_total_s=0.02
    )
    return tuple((name, round(ms, 4)) for name, ms in zip(candidates, medians))
