"""``lower-quant(guard=true, prefer=size|speed)``: dequantize → linear on stored int8, packed uint4 or e4m3 weights
becomes the fastest form this machine has for it — measured, not assumed.

Before → after (when the kernel wins)::

    %q = get_attr[wq.weight_int8]                              %q = get_attr[wq.weight_int8]
    %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, i8)  %y = passforge.int8_weight_linear(%x, %q, %s, %b)
    %y = aten.linear(%x, %d, %b)                         →

    %p = get_attr[wq.weight_int4]                # (N, K/2) u8    %p = get_attr[wq.weight_int4]
    %u = passforge.unpack_int4(%p)                                %y = passforge.int4_weight_linear(
    %d = dequantize_per_channel_group(%u, %s, %z, 0, 15, u8, g)  →         %x, %p, %s, %z, g, %b)
    %y = aten.linear(%x, %d, %b)

    w8a8-static (constants 0.0247 and 1 calibrated by quantize; one Q/DQ pair shared by the q/k/v linears):
    %qx = quantize_per_tensor(%x, 0.0247, 1, -128, 127, i8)       %y = passforge.int8_static_linear(
    %dx = dequantize_per_tensor(%qx, 0.0247, 1, -128, 127, i8)  →         %x, 0.0247, 1, %q, %s, %b)
    %y = aten.linear(%dx, dequantize_per_channel(%q, %s, ...), %b)

    fp8 (per-token scale computed in the graph; e4m3 weight and its (N, 1) scale stored by fold-quant):
    %a = amax(abs(%x), [-1], True); %sx = clamp_min(div(%a, 448.0), 2^-24)
    %dx = dequantize_fp8(quantize_fp8(%x, %sx), %sx, dtype)        →  %y = passforge.fp8_linear(%x, %w, %sw, %b)
    %y = aten.linear(%dx, dequantize_fp8(%w, %sw, dtype), %b)

Candidates per layer: the kernel — ``int8_weight_linear`` (CPU: PyTorch's ``_weight_int8pack_mm``; int8 weights
streamed, never materialised in float), ``int8_dynamic_linear`` for w8a8 layers, ``int8_static_linear`` for
w8a8-static ones (x quantized with the calibrated constants inside), ``int4_weight_linear`` for folded w4 (CPU:
PyTorch's ``_weight_int4pack_mm_for_cpu``), each a Triton kernel on CUDA (``passforge.kernels``), and
``fp8_linear`` for fp8 layers where ``torch._scaled_mm`` runs it (CUDA, compute capability 8.9+, bf16; elsewhere
it would only run the graph's own ops, so the layer is kept and the note says why) — then ``dequantize+linear``
(leave the graph as it is), and with ``prefer=speed`` also ``float weight`` for weight-only layers (dequantize
once, now, and store the float weight: the quantization error stays, the size win goes — for machines whose
integer kernels lose to float GEMMs). The speed guard times the candidates once per (shapes, dtype, device,
scheme) on the pipeline's device — medians, round-robin, cached for the process; "as is" is timed as the exact
ops the graph runs (a w8a8-static activation quantize shared by n linears counts 1/n to each) — and keeps the
fastest (once: a layer kept as it is keeps its decision in ``node.meta`` and a second guarded run leaves it
alone, so the pass is idempotent even though timings vary — and once some layers of a shared activation are
lowered, the rest time with fewer readers); every layer's choice, timings and the implementation its kernel op runs here
(``passforge.kernels.ops.backend``: "triton", an aten kernel or "reference") are in
``node.meta["passforge.kernel"]``, the counters and the pass's report notes. ``guard=false`` lowers every
eligible layer to the kernel. Verified against the graph before it with the bounds in
:meth:`LowerQuant.tolerance` (float reassociation in fp32; more for bf16 and for quantized activations).
Left alone: a w4 weight that is not folded (still ``quantize_per_channel_group`` on a float weight) or not uint4
0..15 (the int4 kernels read ``fold-quant``'s packed bytes); an unfolded fp8 weight; an activation Q/DQ pair
whose qparams differ between Q and DQ or whose range is not int8 -128..127 (its weight may still get the
weight-only kernel).
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import fx

from passforge.ir.graph import add_buffer, get_attr
from passforge.passes.base import BF16_ULP, Context, Pass, PassResult, computes_in_low_precision, output_scale
from passforge.passes.cleanup import eliminate_dead_code
from passforge.passes.quantize.insert import linear_operands
from passforge.passes.registry import register
from passforge.runtime.profile import interleaved_latency_ms

aten = torch.ops.aten
KERNEL_META = "passforge.kernel"


@register
@dataclass(frozen=True)
class LowerQuant(Pass):
    """Per layer, replace int8 / packed uint4 / e4m3 weight dequantize → linear (with its activation's fake quant
    for w8a8, w8a8-static and fp8) with the fastest measured form: the kernel, the graph as it is, or
    (``prefer=speed``, weight-only layers) a float weight dequantized once. ``guard=false``: always the kernel."""

    name: ClassVar[str] = "lower-quant"
    rtol: ClassVar[float] = 1e-4  # fp32: the kernel only sums in another order
    atol: ClassVar[float] = 1e-4
    guard: bool = True
    prefer: Literal["size", "speed"] = "size"

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """Relative to the largest output magnitude: in a bf16/fp16 graph the kernels round accumulations
        differently (allow 2 ulp of bf16, 2 * 2^-7); with int8 activations quantized in the graph (per token,
        or per tensor with calibrated constants) a last-bit difference upstream can flip one activation's
        rounding by one step (1/255 of its token's or tensor's range) in any layer (allow 2%, measured 0.5% on
        the bundled LM for w8a8; no flip in fp32 w8a8-static on the tests' two-layer llama, 3e-7 over 30
        inputs); with both, the graph before also rounds every dequantized activation to bf16, which the integer
        kernel does not (allow 4 ulp more; measured 3.1% in total on llama-100m for w8a8, 1.5% on the tests'
        llama for w8a8-static). fp8 activations: a flip moves one activation by one e4m3 step, up to 1/14 of
        its token's largest value (32 at 448), and ``torch._scaled_mm`` neither rounds the dequantized
        activations and weights to bf16 nor sums as a bf16 GEMM does (allow 6% more; measured 3.3% in total,
        the worst of 30 inputs, on the tests' bf16 llama through PyTorch's CPU ``_scaled_mm``: the same
        row-wise arithmetic up to summation order; not yet measured on a GPU). w4 in bf16: the
        CPU int4 kernel also takes its scales and zero offsets rounded to bf16, one rounding shared by a group's
        weights rather than one per weight (allow 4 ulp; measured 0.7% on the tests' two-layer llama and 1.5-1.7%
        on llama-100m's decode step after smooth-quant, six inputs, which the 2 ulp before rejected).
        Per-tensor (static) int8 steps are coarser than per-token ones — one range for all tokens — so a flip
        moves an activation further relative to its token: allow 4% instead of 2% (measured 5.8% in total with
        bf16 on llama-100m's 512-token prefill, 11 of 16M logits above 5%).
        fp32 weight-only: float reassociation only."""
        nodes, qd = before.graph.nodes, torch.ops.quantized_decomposed
        int8_activations = any(n.target in (qd.quantize_per_token.default, qd.quantize_per_tensor.default)
                               for n in nodes)
        per_tensor = any(n.target is qd.quantize_per_tensor.default for n in nodes)
        fp8_activations = any(n.target is torch.ops.passforge.quantize_fp8.default and n.all_input_nodes[0].op
                              != "get_attr" for n in nodes)
        int4_groups = any(n.target is qd.dequantize_per_channel_group.default for n in nodes)
        low = computes_in_low_precision(before)
        if not (int8_activations or fp8_activations or low):
            return self.rtol, self.atol
        activations = int8_activations or fp8_activations
        flips = 0.06 if fp8_activations else (0.04 if per_tensor else 0.02) if int8_activations else 0.0
        fraction = flips + ((4 if activations or int4_groups else 2) * BF16_ULP if low else 0.0)
        return 0.0, fraction * output_scale(expected)

    def _decided(self, node: fx.Node, lowering: Lowering) -> bool:
        """Whether an earlier guarded run already decided this layer with every candidate this run offers: it
        is not timed again (idempotent: timings vary). A ``prefer=speed`` run reconsiders a weight-only layer
        a ``prefer=size`` run kept, since it also offers the float weight there (and nowhere else)."""
        decision = node.meta.get(KERNEL_META)
        if decision is None:
            return False
        new_candidate = self.prefer == "speed" and decision.get("prefer", "size") == "size"
        return not (new_candidate and decision["kernel"] == KEEP and lowering.kind in WEIGHT_ONLY)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        from passforge.kernels.ops import backend, scaled_mm_unsupported  # importing it registers the ops

        eligible = [
            (node, lowering) for node in gm.graph.nodes
            if (lowering := _match(gm, node)) is not None and not (self.guard and self._decided(node, lowering))
        ]
        readers = Counter(lowering.x_quantize for _, lowering in eligible if lowering.x_quantize is not None)
        counts = dict.fromkeys(CANDIDATES, 0)
        notes: dict[str, str] = {}
        float_weights: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}  # (dequantize, dtype) -> stored weight
        for node, _ in eligible:
            # matched again: lowering an earlier linear replaced it, and it may be this one's activation
            lowering = _match(gm, node)
            if lowering is None:  # no longer the pattern: left as it is, which computes the same
                continue
            x, kind, kernel = lowering.x, lowering.kind, lowering.kernel
            shared = readers[lowering.x_quantize] if lowering.x_quantize is not None else 1
            weight_shape, group_size = lowering.weight_shape, lowering.group_size
            key = _shape_key(x, weight_shape, kind, group_size, shared)
            unsupported = scaled_mm_unsupported(x.meta["val"], weight_shape) if kind == "fp8" else None
            if not self.guard:
                decision = {"kernel": kernel}
            elif unsupported is not None:  # fp8_linear would run the graph's own ops: nothing to time
                decision = {"kernel": KEEP, "reason": f"{kernel} not offered: {unsupported}"}
                notes.setdefault(key, f"{key}: {KEEP} ({decision['reason']})")
            else:
                allow_float = self.prefer == "speed" and kind in WEIGHT_ONLY
                decision = _choose(x, weight_shape, ctx.device, kind, group_size, shared, allow_float=allow_float)
            decision["backend"] = backend(kernel, x.meta["val"], weight_shape, group_size)  # what the op runs here
            decision["prefer"] = self.prefer
            node.meta[KERNEL_META] = decision
            counts[decision["kernel"]] += 1
            if "timings_ms" in decision:
                named = {kernel: f"{kernel} [{decision['backend']}]"}
                timings = ", ".join(f"{named.get(k, k)} {v:.3f} ms" for k, v in decision["timings_ms"].items())
                notes.setdefault(key, f"{key}: {decision['kernel']} ({timings})")
            _rewrite(gm, node, lowering, decision["kernel"], float_weights)
        eliminate_dead_code(gm)
        gm.recompile()
        stats = {"lowered": sum(counts[k] for k in KERNELS), "kept": counts[KEEP], "float": counts[FLOAT]}
        modified = bool(stats["lowered"] or stats["float"])
        return PassResult(gm, modified=modified, stats=stats, notes=list(notes.values()))


KERNEL, DYNAMIC, STATIC = "int8_weight_linear", "int8_dynamic_linear", "int8_static_linear"  # the ops' names
INT4, FP8 = "int4_weight_linear", "fp8_linear"
KEEP, FLOAT = "dequantize+linear", "float weight"
KERNELS = (KERNEL, DYNAMIC, STATIC, INT4, FP8)
CANDIDATES = (*KERNELS, KEEP, FLOAT)
WEIGHT_ONLY = ("w8", "w4")  # the kinds a float weight can replace: the others also quantize x


class Lowering(NamedTuple):
    """A linear the pass can lower: its scheme (``kind``), the op that replaces it, that op's activation (the
    linear's input, or the float tensor in front of its fake quant) and its operands between x and the bias."""

    kind: Literal["w8", "w8a8", "w8a8-static", "w4", "fp8"]
    kernel: str
    x: fx.Node
    operands: tuple[object, ...]
    dq: fx.Node  # the weight's dequantize (what a float weight replaces)
    weight_shape: tuple[int, int]  # logical (N, K)
    int4: Int4Operands | None = None
    x_quantize: fx.Node | None = None  # w8a8-static: the activation's dequantize, shared by the linears reading x

    @property
    def group_size(self) -> int:
        return self.int4.group_size if self.int4 else 0


def _match(gm: fx.GraphModule, linear: fx.Node) -> Lowering | None:
    """What ``linear`` can be lowered to, or None: folded w4; symmetric int8 weights under a per-token
    (w8a8) or calibrated per-tensor (w8a8-static) activation fake quant, or none (w8); a folded e4m3 weight
    under the per-token fp8 activation fake quant."""
    if linear.target is not aten.linear.default:
        return None
    x, dq, _ = linear_operands(linear)
    if not (isinstance(x, fx.Node) and isinstance(dq, fx.Node)):
        return None
    int4 = _int4_operands(gm, dq, x)
    if int4 is not None:
        operands = (int4.packed, int4.scales, int4.zero_points, int4.group_size)
        rows, half = get_attr(gm, int4.packed.target).shape
        return Lowering("w4", INT4, x, operands, dq, (rows, half * 2), int4)
    if dq.target is torch.ops.quantized_decomposed.dequantize_per_channel.default and _is_symmetric_int8(gm, dq):
        weight, weight_shape = (dq.args[0], dq.args[1]), tuple(get_attr(gm, dq.args[0].target).shape)
        source = _dynamic_activation_source(x)
        if source is not None:  # the kernel quantizes x per token itself
            return Lowering("w8a8", DYNAMIC, source, weight, dq, weight_shape)
        static = _static_activation(x)
        if static is not None:  # the kernel quantizes x with the same constants
            source, scale, zero_point = static
            return Lowering("w8a8-static", STATIC, source, (scale, zero_point, *weight), dq, weight_shape,
                            x_quantize=x)
        return Lowering("w8", KERNEL, x, weight, dq, weight_shape)
    fp8 = _fp8_operands(gm, dq, x)
    if fp8 is not None:
        source, weight, scale = fp8
        return Lowering("fp8", FP8, source, (weight, scale), dq, tuple(get_attr(gm, weight.target).shape))
    return None


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


def _static_activation(x: fx.Node) -> tuple[fx.Node, float, int] | None:
    """``(source, scale, zero_point)`` when ``x`` is dequantize_per_tensor(quantize_per_tensor(source, s, z,
    -128, 127, int8), s, z, -128, 127, int8, out_dtype=source's dtype) with constant s and z (what
    ``quantize(scheme=w8a8-static)`` inserts); None otherwise."""
    qd = torch.ops.quantized_decomposed
    if x.target is not qd.dequantize_per_tensor.default:
        return None
    q = x.args[0]
    if not (isinstance(q, fx.Node) and q.target is qd.quantize_per_tensor.default):
        return None
    quantized, dequantized = _bound_args(q), _bound_args(x)
    source, scale, zero_point = quantized["input"], quantized["scale"], quantized["zero_point"]
    if (dequantized["scale"], dequantized["zero_point"]) != (scale, zero_point):
        return None  # dequantized with other qparams: not what the kernel computes
    int8 = (-128, 127, torch.int8)
    for args in (quantized, dequantized):
        if (args["quant_min"], args["quant_max"], args["dtype"]) != int8:
            return None  # another range: the kernel's GEMM reads int8 -128..127
    if not (isinstance(source, fx.Node) and isinstance(scale, float) and type(zero_point) is int):
        return None
    if (dequantized["out_dtype"] or torch.float32) != source.meta["val"].dtype:
        return None  # the kernel answers in x's dtype
    return source, scale, zero_point


def _fp8_operands(gm: fx.GraphModule, dq: fx.Node, x: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(source, weight, weight_scale)`` when ``dq`` is dequantize_fp8 of a stored e4m3 (N, K) weight with its
    (N, 1) scale and ``x`` is the per-token fp8 fake quant of ``source`` (what ``quantize(scheme=fp8)`` and
    ``fold-quant`` make), both dequantized to source's dtype; None otherwise."""
    from passforge.kernels.fp8 import FP8

    if dq.target is not torch.ops.passforge.dequantize_fp8.default:
        return None
    weight, scale, dtype = dq.args
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (weight, scale)):
        return None  # not folded: the weight is still quantized from a float tensor at run time
    tensor = get_attr(gm, weight.target)
    if tensor.dtype != FP8 or tensor.dim() != 2 or tuple(get_attr(gm, scale.target).shape) != (tensor.shape[0], 1):
        return None
    source = _fp8_activation_source(x)
    if source is None or dtype != source.meta["val"].dtype:
        return None
    return source, weight, scale


def _fp8_activation_source(x: fx.Node) -> fx.Node | None:
    """``source`` when ``x`` is dequantize_fp8(quantize_fp8(source, s), s, source's dtype) with s =
    clamp_min(amax(abs(source), [-1], True) / 448, 2^-24) computed in the graph; None otherwise."""
    from passforge.kernels.fp8 import FP8_MAX, MIN_SCALE

    passforge = torch.ops.passforge
    if x.target is not passforge.dequantize_fp8.default:
        return None
    q, scale, dtype = x.args
    if not (isinstance(q, fx.Node) and q.target is passforge.quantize_fp8.default and q.args[1] is scale):
        return None
    source = q.args[0]
    if not isinstance(source, fx.Node) or dtype != source.meta["val"].dtype:
        return None
    last = source.meta["val"].dim() - 1
    chain = scale
    for target, constants in ((aten.clamp_min.default, [(MIN_SCALE,)]), (aten.div.Tensor, [(FP8_MAX,)]),
                              (aten.amax.default, [([-1], True), ([last], True)]), (aten.abs.default, [()])):
        if not (isinstance(chain, fx.Node) and chain.target is target and not chain.kwargs
                and tuple(chain.args[1:]) in constants):
            return None
        chain = chain.args[0]
    return source if chain is source else None


def _rewrite(
    gm: fx.GraphModule, linear: fx.Node, lowering: Lowering, kernel: str,
    float_weights: dict[tuple[fx.Node, torch.dtype], fx.Node],
) -> None:
    if kernel == KEEP:
        return
    dq = lowering.dq
    if kernel == FLOAT:
        dtype = lowering.x.meta["val"].dtype
        if (dq, dtype) not in float_weights:  # a shared weight is dequantized and stored once
            with gm.graph.inserting_before(dq):
                float_weights[dq, dtype] = _store_float_weight(gm, dq, lowering.int4, dtype)
        linear.replace_input_with(dq, float_weights[dq, dtype])
        return
    args = (lowering.x, *lowering.operands, linear_operands(linear)[2])
    with gm.graph.inserting_before(linear):
        fused = gm.graph.call_function(getattr(torch.ops.passforge, kernel).default, args)
    fused.meta[KERNEL_META] = linear.meta[KERNEL_META]
    fused.meta["val"] = linear.meta["val"]  # the same result: a later linear reading it is matched on it
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


def _shape_key(x: fx.Node, weight_shape: tuple[int, int], kind: str, group_size: int, readers: int) -> str:
    rows, cols = weight_shape
    weight = {"w4": f"uint4[{rows}, {cols}] g{group_size}", "fp8": f"e4m3[{rows}, {cols}]"}.get(
        kind, f"int8[{rows}, {cols}]")
    scheme = f" ({kind}{f', x read by {readers}' if readers > 1 else ''})" if kind in ("w8a8", "w8a8-static") else ""
    return f"x{tuple(x.meta['val'].shape)} @ {weight}{scheme}"


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
    x: fx.Node, weight_shape: tuple[int, int], device: torch.device, kind: str, group_size: int, readers: int, *,
    allow_float: bool,
) -> dict[str, object]:
    val = x.meta["val"]
    shape = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in val.shape)
    timings = dict(_timings(shape, val.dtype, weight_shape, str(device), kind, group_size, readers))
    allowed = {k: v for k, v in timings.items() if allow_float or k != FLOAT}
    return {"kernel": min(allowed, key=allowed.get), "timings_ms": allowed}


SHARED_FAKE_QUANT = "activation fake quant"  # timed on its own: "as is" pays 1/readers of it


@functools.cache
def _timings(
    x_shape: tuple[int, ...], dtype: torch.dtype, w_shape: tuple[int, int], device: str, kind: str, group_size: int,
    readers: int,
) -> tuple[tuple[str, float], ...]:
    """Median ms of each candidate on random data of these shapes, timed round-robin (once per process; the
    key holds what changes the answer: shapes, dtype, device, scheme, group size and how many linears share a
    w8a8-static activation quantize — thread count is fixed per process). Kernels that prepack a weight (the
    CPU int4 tile layout, int8 row sums) do it in the untimed warm-up, as a lowered graph does it on its first
    call. w8a8-static "as is" is its linear plus 1/readers of the activation quantize → dequantize the graph
    runs once for all the linears reading x (each lowered linear quantizes x itself)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    calls = _candidate_calls(x, w_shape, kind, group_size, generator)
    medians = interleaved_latency_ms(
        list(calls.values()), device=torch.device(device), repeats=10, warmup=2, min_total_s=0.02
    )
    timings = dict(zip(calls, medians))
    if SHARED_FAKE_QUANT in timings:
        timings[KEEP] += timings.pop(SHARED_FAKE_QUANT) / readers
    return tuple((name, round(ms, 4)) for name, ms in timings.items())


def _candidate_calls(
    x: torch.Tensor, w_shape: tuple[int, int], kind: str, group_size: int, generator: torch.Generator
) -> dict[str, Callable[[], torch.Tensor]]:
    """The kernel, "as is" (exactly the ops the graph runs when it is left alone) and, for weight-only kinds, the
    float weight, on random weights of ``kind`` for an activation like ``x``."""
    from passforge.kernels.fp8 import fp8_scale, quantize_fp8
    from passforge.kernels.ops import fp8_linear_reference
    from passforge.passes.quantize.observers import int8_affine_qparams

    qd, passforge, linear = torch.ops.quantized_decomposed, torch.ops.passforge, torch.nn.functional.linear
    device, dtype = x.device, x.dtype
    rows, cols = w_shape
    if kind == "fp8":
        weight = torch.randn(w_shape, generator=generator).to(device)
        w_scale = fp8_scale(weight)
        w = quantize_fp8(weight, w_scale)
        return {FP8: lambda: passforge.fp8_linear.default(x, w, w_scale, None),
                KEEP: lambda: fp8_linear_reference(x, w, w_scale, None)}  # the graph's ops, one for one
    if kind == "w4":
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
        scales = (torch.rand(rows, generator=generator) / 100).to(device)

        def dequantized() -> torch.Tensor:
            return qd.dequantize_per_channel(w, scales, None, 0, -128, 127, torch.int8, out_dtype=dtype)

        if kind == "w8a8":
            def as_is() -> torch.Tensor:
                x_scales, x_zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
                qx = qd.quantize_per_token(x, x_scales, x_zero_points, -128, 127, torch.int8)
                dqx = qd.dequantize_per_token(qx, x_scales, x_zero_points, -128, 127, torch.int8, dtype)
                return linear(dqx, dequantized())

            return {DYNAMIC: lambda: passforge.int8_dynamic_linear.default(x, w, scales, None), KEEP: as_is}
        if kind == "w8a8-static":
            x_scale, x_zero_point = int8_affine_qparams(min(float(x.min()), 0.0), max(float(x.max()), 0.0))

            def fake_quant() -> torch.Tensor:
                qx = qd.quantize_per_tensor(x, x_scale, x_zero_point, -128, 127, torch.int8)
                return qd.dequantize_per_tensor(qx, x_scale, x_zero_point, -128, 127, torch.int8, out_dtype=dtype)

            dqx = fake_quant()
            return {STATIC: lambda: passforge.int8_static_linear.default(x, x_scale, x_zero_point, w, scales, None),
                    KEEP: lambda: linear(dqx, dequantized()), SHARED_FAKE_QUANT: fake_quant}
        kernel = {KERNEL: lambda: passforge.int8_weight_linear.default(x, w, scales, None)}
    float_weight = dequantized()
    return {**kernel, KEEP: lambda: linear(x, dequantized()), FLOAT: lambda: linear(x, float_weight)}
