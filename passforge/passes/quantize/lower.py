"""``lower-quant(guard=true, prefer=size|speed)``: dequantize → linear on stored int8 or packed uint4 weights
becomes the fastest form this machine has for it — measured, not assumed.

Before → after (when the kernel wins)::

    %q = get_attr[wq.weight_int8]                              %q = get_attr[wq.weight_int8]
    %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, i8)  %y = passforge.int8_weight_linear(%x, %q, %s, %b)
    %y = aten.linear(%x, %d, %b)                         →

    %p = get_attr[wq.weight_int4]                # (N, K/2) u8    %p = get_attr[wq.weight_int4]
    %u = passforge.unpack_int4(%p)                                %y = passforge.int4_weight_linear(
    %d = dequantize_per_channel_group(%u, %s, %z, 0, 15, u8, g)  →         %x, %p, %s, %z, g, %b)
    %y = aten.linear(%x, %d, %b)

Candidates per layer: the kernel — ``int8_weight_linear`` (CPU: PyTorch's ``_weight_int8pack_mm``; int8 weights
streamed, never materialised in float), ``int8_dynamic_linear`` for w8a8 layers, ``int4_weight_linear`` for
folded w4 (CPU: PyTorch's ``_weight_int4pack_mm_for_cpu``), each a Triton kernel on CUDA (``passforge.kernels``)
— then ``dequantize+linear`` (leave the graph as it is), and with ``prefer=speed`` also ``float weight``
(dequantize once, now, and store the float weight: the quantization error stays, the size win goes — for
machines whose integer kernels lose to float GEMMs). The speed guard times the candidates once per (shapes,
dtype, device, scheme) on the pipeline's device — medians, round-robin, cached for the process; "as is" is
timed as the exact ops the graph runs — and keeps the fastest; every layer's choice, timings and the
implementation its kernel op runs here (``passforge.kernels.ops.backend``: "triton", an aten kernel or
"reference") are in ``node.meta["passforge.kernel"]``, the counters and the pass's report notes.
``guard=false`` lowers every eligible layer to the kernel. Verified against the graph before it with the
bounds in :meth:`LowerQuant.tolerance` (float reassociation in fp32; more for bf16 and for w8a8).
A w4 weight that is not folded (still ``quantize_per_channel_group`` on a float weight) or not uint4 0..15 is
left alone: the int4 kernels read ``fold-quant``'s packed bytes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

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
    """Per layer, replace int8 / packed uint4 weight dequantize → linear with the fastest measured form: the
    integer kernel, the graph as it is, or (``prefer=speed``) a float weight dequantized once.
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
        llama-100m). w4 in bf16: the CPU int4 kernel also takes its scales and zero offsets rounded to bf16
        (measured 0.7% on the tests' two-layer llama, inside the 2 ulp). fp32 weight-only: float
        reassociation only."""
        nodes = before.graph.nodes
        dynamic = any(n.target is torch.ops.quantized_decomposed.quantize_per_token.default for n in nodes)
        low = any(getattr(n.meta.get("val"), "dtype", None) in (torch.bfloat16, torch.float16) for n in nodes)
        if not (dynamic or low):
            return self.rtol, self.atol
        scale = max((float(t.abs().max()) for t in expected if t.is_floating_point() and t.numel()), default=1.0)
        fraction = (0.02 if dynamic else 0.0) + ((4 if dynamic else 2) * 2**-7 if low else 0.0)
        return 0.0, fraction * scale

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        from passforge.kernels.ops import backend  # importing it registers the ops

        dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
        counts = dict.fromkeys(CANDIDATES, 0)
        notes: dict[str, str] = {}
        float_weights: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}  # (dequantize, dtype) -> stored weight
        for node in list(gm.graph.nodes):
            if node.target is not aten.linear.default:
                continue
            x, dq, _ = linear_operands(node)
            if not isinstance(dq, fx.Node):
                continue
            int4 = _int4_operands(gm, dq, x)
            if int4 is not None:
                kind, kernel = "w4", INT4
            elif dq.target is dequantize and _is_symmetric_int8(gm, dq):
                source = _dynamic_activation_source(x)
                kind, kernel = ("w8", KERNEL) if source is None else ("w8a8", DYNAMIC)
                x = x if source is None else source  # w8a8: the kernel quantizes x per token itself
            else:
                continue
            weight_shape, group_size = _weight_shape(gm, dq, int4), int4.group_size if int4 else 0
            if self.guard:
                allow_float = self.prefer == "speed" and kind != "w8a8"
                decision = _choose(x, weight_shape, ctx.device, kind, group_size, allow_float=allow_float)
            else:
                decision = {"kernel": kernel}
            decision["backend"] = backend(kernel, x.meta["val"], weight_shape, group_size)  # what the op runs here
            node.meta[KERNEL_META] = decision
            counts[decision["kernel"]] += 1
            if "timings_ms" in decision:
                key = _shape_key(x, weight_shape, kind, group_size)
                named = {kernel: f"{kernel} [{decision['backend']}]"}
                timings = ", ".join(f"{named.get(k, k)} {v:.3f} ms" for k, v in decision["timings_ms"].items())
                notes.setdefault(key, f"{key}: {decision['kernel']} ({timings})")
            _rewrite(gm, node, x, dq, decision["kernel"], int4, float_weights)
        eliminate_dead_code(gm)
        gm.recompile()
        lowered = counts[KERNEL] + counts[DYNAMIC] + counts[INT4]
        stats = {"lowered": lowered, "kept": counts[KEEP], "float": counts[FLOAT]}
        modified = bool(stats["lowered"] or stats["float"])
        return PassResult(gm, modified=modified, stats=stats, notes=list(notes.values()))


KERNEL, DYNAMIC, INT4 = "int8_weight_linear", "int8_dynamic_linear", "int4_weight_linear"  # the ops' names
KEEP, FLOAT = "dequantize+linear", "float weight"
CANDIDATES = (KERNEL, DYNAMIC, INT4, KEEP, FLOAT)


class Int4Operands(NamedTuple):
    """fold-quant's w4 weight: packed (N, K/2) uint8, scales and zero points (N, K/g), g."""

    packed: fx.Node
    scales: fx.Node
    zero_points: fx.Node
    group_size: int


def _int4_operands(gm: fx.GraphModule, dq: fx.Node, x: object) -> Int4Operands | None:
    """The operands when ``dq`` is dequantize_per_channel_group(unpack_int4(packed), s, z, 0, 15, uint8, g, x's
    dtype) on stored tensors of matching shapes (what ``fold-quant`` makes of w4); None otherwise."""
    qd = torch.ops.quantized_decomposed
    if dq.target is not qd.dequantize_per_channel_group.default or not isinstance(x, fx.Node):
        return None
    args = _bound_args(dq)
    unpack = args["input"]
    if not (isinstance(unpack, fx.Node) and unpack.target is torch.ops.passforge.unpack_int4.default):
        return None
    packed, scales, zero_points = unpack.args[0], args["scales"], args["zero_points"]
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (packed, scales, zero_points)):
        return None
    if (args["quant_min"], args["quant_max"], args["dtype"]) != (0, 15, torch.uint8):
        return None  # another group scheme: the int4 kernels read uint4 0..15
    if args.get("output_dtype") != getattr(x.meta.get("val"), "dtype", None):
        return None
    tensor, group_size = get_attr(gm, packed.target), args["group_size"]
    if tensor.dtype != torch.uint8 or tensor.dim() != 2 or (tensor.shape[1] * 2) % group_size:
        return None
    groups = (tensor.shape[0], tensor.shape[1] * 2 // group_size)
    if tuple(get_attr(gm, scales.target).shape) != groups or tuple(get_attr(gm, zero_points.target).shape) != groups:
        return None
    return Int4Operands(packed, scales, zero_points, group_size)


def _bound_args(node: fx.Node) -> dict[str, object]:
    """An ATen call's arguments by schema name, positional or keyword, defaults filled in."""
    schema = node.target._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in schema.arguments), node.args))
    bound.update(node.kwargs)
    return bound


def _weight_shape(gm: fx.GraphModule, dq: fx.Node, int4: Int4Operands | None) -> tuple[int, int]:
    """The weight's logical (N, K)."""
    if int4 is None:
        return tuple(get_attr(gm, dq.args[0].target).shape)
    rows, half = get_attr(gm, int4.packed.target).shape
    return rows, half * 2


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


def _rewrite(
    gm: fx.GraphModule, linear: fx.Node, x: fx.Node, dq: fx.Node, kernel: str, int4: Int4Operands | None,
    float_weights: dict[tuple[fx.Node, torch.dtype], fx.Node],
) -> None:
    if kernel == KEEP:
        return
    if kernel == FLOAT:
        dtype = x.meta["val"].dtype
        if (dq, dtype) not in float_weights:  # a shared weight is dequantized and stored once
            with gm.graph.inserting_before(dq):
                float_weights[dq, dtype] = _store_float_weight(gm, dq, int4, dtype)
        linear.replace_input_with(dq, float_weights[dq, dtype])
        return
    bias = linear_operands(linear)[2]
    if kernel == INT4:
        args = (x, int4.packed, int4.scales, int4.zero_points, int4.group_size, bias)
    else:
        args = (x, dq.args[0], dq.args[1], bias)
    with gm.graph.inserting_before(linear):
        fused = gm.graph.call_function(getattr(torch.ops.passforge, kernel).default, args)
    fused.meta[KERNEL_META] = linear.meta[KERNEL_META]
    linear.replace_all_uses_with(fused)


def _store_float_weight(gm: fx.GraphModule, dq: fx.Node, int4: Int4Operands | None, dtype: torch.dtype) -> fx.Node:
    """The weight ``dq`` computes, evaluated now and stored as a ``dtype`` buffer."""
    if int4 is None:
        weight, scales = dq.args[0], dq.args[1]
        value = get_attr(gm, weight.target).to(dtype) * get_attr(gm, scales.target).to(dtype)[:, None]
        return add_buffer(gm, weight.target.removesuffix("_int8") + "_dequantized", value)
    value = torch.ops.quantized_decomposed.dequantize_per_channel_group(  # the graph's own ops, once
        torch.ops.passforge.unpack_int4(get_attr(gm, int4.packed.target)),
        get_attr(gm, int4.scales.target), get_attr(gm, int4.zero_points.target),
        0, 15, torch.uint8, int4.group_size, dtype,
    )
    return add_buffer(gm, int4.packed.target.removesuffix("_int4") + "_dequantized", value)


def _shape_key(x: fx.Node, weight_shape: tuple[int, int], kind: str, group_size: int) -> str:
    weight = f"uint4[{weight_shape[0]}, {weight_shape[1]}] g{group_size}" if kind == "w4" else \
        f"int8[{weight_shape[0]}, {weight_shape[1]}]"
    return f"x{tuple(x.meta['val'].shape)} @ {weight}{' (w8a8)' if kind == 'w8a8' else ''}"


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
    x: fx.Node, weight_shape: tuple[int, int], device: torch.device, kind: str, group_size: int, *,
    allow_float: bool,
) -> dict[str, object]:
    val = x.meta["val"]
    shape = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in val.shape)
    timings = dict(_timings(shape, val.dtype, weight_shape, str(device), kind, group_size))
    allowed = {k: v for k, v in timings.items() if allow_float or k != FLOAT}
    return {"kernel": min(allowed, key=allowed.get), "timings_ms": allowed}


@functools.cache
def _timings(
    x_shape: tuple[int, ...], dtype: torch.dtype, w_shape: tuple[int, int], device: str, kind: str, group_size: int
) -> tuple[tuple[str, float], ...]:
    """Median ms of each candidate on random data of these shapes, timed round-robin (once per process; the
    key holds what changes the answer: shapes, dtype, device, scheme and group size — thread count is fixed per
    process). Kernels that prepack a weight (the CPU int4 tile layout) do it in the untimed warm-up, as a
    lowered graph does it on its first call."""
    qd = torch.ops.quantized_decomposed
    passforge = torch.ops.passforge

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    if kind == "w4":
        rows, cols = w_shape
        packed = torch.randint(0, 256, (rows, cols // 2), generator=generator, dtype=torch.uint8).to(device)
        scales = (torch.rand(rows, cols // group_size, generator=generator) / 100).to(device)
        zero_points = torch.randint(0, 16, scales.shape, generator=generator, dtype=torch.int32).to(device)

        def dequantized() -> torch.Tensor:
            return qd.dequantize_per_channel_group(
                passforge.unpack_int4(packed), scales, zero_points, 0, 15, torch.uint8, group_size, dtype
            )

        kernel = {INT4: lambda: passforge.int4_weight_linear.default(x, packed, scales, zero_points, group_size, None)}
    else:
        w = torch.randint(-127, 128, w_shape, generator=generator, dtype=torch.int8).to(device)
        scales = (torch.rand(w_shape[0], generator=generator) / 100).to(device)

        def dequantized() -> torch.Tensor:
            return qd.dequantize_per_channel(w, scales, None, 0, -128, 127, torch.int8, out_dtype=dtype)

        op = passforge.int8_dynamic_linear if kind == "w8a8" else passforge.int8_weight_linear
        kernel = {DYNAMIC if kind == "w8a8" else KERNEL: lambda: op.default(x, w, scales, None)}
    float_weight = dequantized()

    def as_is() -> torch.Tensor:  # exactly the ops the graph runs when it is left alone
        if kind != "w8a8":
            return torch.nn.functional.linear(x, dequantized())
        x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        qx = qd.quantize_per_token(x, x_scales, x_zero_points, -128, 127, torch.int8)
        dqx = qd.dequantize_per_token(qx, x_scales, x_zero_points, -128, 127, torch.int8, dtype)
        return torch.nn.functional.linear(dqx, dequantized())

    candidates = {**kernel, KEEP: as_is}
    if kind != "w8a8":
        candidates[FLOAT] = lambda: torch.nn.functional.linear(x, float_weight)
    medians = interleaved_latency_ms(
        list(candidates.values()), device=torch.device(device), repeats=10, warmup=2, min_total_s=0.02
    )
    return tuple((name, round(ms, 4)) for name, ms in zip(candidates, medians))
