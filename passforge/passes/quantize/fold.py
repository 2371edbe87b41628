"""``fold-quant``: weight quantize nodes become stored integer tensors, so the saved model is really smaller.

Before → after (w8; the fp32 weight is gone from the module)::

    %w = get_attr[wq.weight]                                       # f32 (N, K)
    %q = quantize_per_channel(%w, %s, %z, 0, -128, 127, int8)  →   %q = get_attr[wq.weight_int8]   # i8 (N, K)
    %d = dequantize_per_channel(%q, %s, %z, ...)                   %d = dequantize_per_channel(%q, %s, %z, ...)

w4 weights are packed two per byte and unpacked in the graph (``passforge::unpack_int4``), so the stored
tensor is (N, K/2) uint8: 1/8 of fp32 plus scales and zero points. fp8 weights are stored as e4m3 (1 byte).
Lossless (the graph computes exactly what it did) and idempotent (a folded weight has no quantize node left).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from passforge.ir.graph import add_buffer, get_attr
from passforge.passes.base import Context, Pass, PassResult
from passforge.passes.cleanup import eliminate_dead_code
from passforge.passes.registry import register


def _quantize_targets() -> tuple[object, object, object]:
    import passforge.kernels.ops  # noqa: F401 - registers the Q/DQ ops
    from passforge.kernels.fp8 import quantize_fp8

    qd = torch.ops.quantized_decomposed
    return qd.quantize_per_channel.default, qd.quantize_per_channel_group.default, quantize_fp8._opoverload


@register
@dataclass(frozen=True)
class FoldQuant(Pass):
    """Store quantized weights as integers (int8, or int4 packed two per byte) instead of float weights
    with a quantize node in front of them."""

    name: ClassVar[str] = "fold-quant"
    rtol: ClassVar[float] = 0.0
    atol: ClassVar[float] = 0.0

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        from passforge.kernels.ops import pack_int4

        per_channel, per_group, fp8 = _quantize_targets()
        folded = 0
        for node in list(gm.graph.nodes):
            if node.target not in (per_channel, per_group, fp8):
                continue
            if not all(arg.op == "get_attr" for arg in node.all_input_nodes):
                continue  # an activation quantize: computed at run time
            if node.target is per_group and tuple(node.args[3:6]) != (0, 15, torch.uint8):
                continue  # only uint4 (0..15) packs two per byte; other group schemes stay as they are
            args = fx.node.map_arg(node.args, lambda n: get_attr(gm, n.target))
            with torch.no_grad():
                values = node.target(*args)
            weight_name = node.args[0].target
            with gm.graph.inserting_before(node):
                if node.target is per_group:  # uint4 values 0..15: two per byte
                    stored = add_buffer(gm, f"{weight_name}_int4", pack_int4(values))
                    replacement = gm.graph.call_function(torch.ops.passforge.unpack_int4.default, (stored,))
                else:
                    suffix = "_fp8" if node.target is fp8 else "_int8"
                    replacement = add_buffer(gm, f"{weight_name}{suffix}", values)
            node.replace_all_uses_with(replacement)
            folded += 1
        eliminate_dead_code(gm)  # the float weights and their quantize nodes
        gm.recompile()
        return PassResult(gm, modified=folded > 0, stats={"folded": folded})
