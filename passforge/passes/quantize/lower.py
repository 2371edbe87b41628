"""``lower-quant(guard=true)``: dequantize → linear on stored int8 weights becomes a real int8 kernel —
when it is faster.

Before → after::

    %q = get_attr[wq.weight_int8]                              %q = get_attr[wq.weight_int8]
    %d = dequantize_per_channel(%q, %s, %z, 0, -128, 127, i8)  %y = passforge.int8_weight_linear(%x, %q, %s, %b)
    %y = aten.linear(%x, %d, %b)                         →

The kernel (``passforge::int8_weight_linear``; on CPU PyTorch's ``_weight_int8pack_mm``) streams int8
weights and never materialises the float weight. The speed guard times both forms once per (shape, dtype,
device) on the device the pipeline targets — median of repeats, cached for the process — and keeps the
faster: each layer's choice and timings are in ``node.meta["passforge.kernel"]`` and the pass's counters
(``lowered``, ``kept``). ``guard=false`` lowers every eligible layer. Lossless up to float reassociation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from passforge.ir.graph import get_attr
from passforge.passes.base import Context, Pass, PassResult
from passforge.passes.cleanup import eliminate_dead_code
from passforge.passes.registry import register
from passforge.runtime.profile import interleaved_latency_ms

aten = torch.ops.aten
KERNEL_META = "passforge.kernel"


@register
@dataclass(frozen=True)
class LowerQuant(Pass):
    """Replace int8 weight dequantize → linear with the int8 weight-only kernel, per layer, when the speed
    guard measures it faster on the target device (``guard=false``: always)."""

    name: ClassVar[str] = "lower-quant"
    rtol: ClassVar[float] = 1e-4  # fp32: the kernel only sums in another order
    atol: ClassVar[float] = 1e-4
    guard: bool = True

    def tolerance(self, before: fx.GraphModule, expected: Sequence[torch.Tensor]) -> tuple[float, float]:
        """In a bf16/fp16 graph the kernel rounds its accumulations differently; after a few layers outputs
        differ by a few units in the last place of their scale: allow 2 ulp of bf16 (2 * 2^-7) at the largest
        output magnitude."""
        low = {torch.bfloat16, torch.float16}
        if not any(getattr(n.meta.get("val"), "dtype", None) in low for n in before.graph.nodes):
            return self.rtol, self.atol
        scale = max((float(t.abs().max()) for t in expected if t.is_floating_point() and t.numel()), default=1.0)
        return 0.0, 2 * 2**-7 * scale

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        import passforge.kernels.ops  # noqa: F401 - registers the ops

        dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
        lowered = kept = 0
        for node in list(gm.graph.nodes):
            if node.target is not aten.linear.default or not isinstance(node.args[1], fx.Node):
                continue
            dq = node.args[1]
            if dq.target is not dequantize or not _is_symmetric_int8(gm, dq):
                continue
            x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
            weight, scales = dq.args[0], dq.args[1]
            decision = _choose(gm, x, weight, scales, ctx.device) if self.guard else {"kernel": "int8_weight_linear"}
            node.meta[KERNEL_META] = decision
            if decision["kernel"] != "int8_weight_linear":
                kept += 1
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(
                    torch.ops.passforge.int8_weight_linear.default, (x, weight, scales, bias)
                )
            fused.meta[KERNEL_META] = decision
            node.replace_all_uses_with(fused)
            lowered += 1
        eliminate_dead_code(gm)
        gm.recompile()
        return PassResult(gm, modified=lowered > 0, stats={"lowered": lowered, "kept": kept})


def _is_symmetric_int8(gm: fx.GraphModule, dq: fx.Node) -> bool:
    weight, scales, zero_points = dq.args[0], dq.args[1], dq.args[2]
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (weight, scales)):
        return False
    if get_attr(gm, weight.target).dtype != torch.int8 or dq.args[3] != 0:
        return False
    if zero_points is None:
        return True
    return isinstance(zero_points, fx.Node) and zero_points.op == "get_attr" and not get_attr(
        gm, zero_points.target
    ).any()


def _choose(
    gm: fx.GraphModule, x: fx.Node, weight: fx.Node, scales: fx.Node, device: torch.device
) -> dict[str, object]:
    val = x.meta["val"]
    shape = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in val.shape)
    w = get_attr(gm, weight.target)
    return dict(_timed_choice(shape, val.dtype, tuple(w.shape), str(device)))


@functools.cache
def _timed_choice(
    x_shape: tuple[int, ...], dtype: torch.dtype, w_shape: tuple[int, int], device: str
) -> tuple[tuple[str, object], ...]:
    """Time dequantize+linear against the int8 kernel on random data of these shapes (once per process)."""
    from passforge.kernels.ops import int8_weight_linear_reference

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    w = torch.randint(-127, 128, w_shape, generator=generator, dtype=torch.int8).to(device)
    scales = (torch.rand(w_shape[0], generator=generator) / 100).to(device)
    kernel = torch.ops.passforge.int8_weight_linear.default
    reference_ms, kernel_ms = interleaved_latency_ms(
        [lambda: int8_weight_linear_reference(x, w, scales, None), lambda: kernel(x, w, scales, None)],
        device=torch.device(device), repeats=10, warmup=2, min_total_s=0.02,
    )
    winner = "int8_weight_linear" if kernel_ms < reference_ms else "dequantize+linear"
    return (("kernel", winner), ("kernel_ms", round(kernel_ms, 4)), ("reference_ms", round(reference_ms, 4)))
