"""Hand a passforge graph to inductor: what the torch.compile backend and the compiled decode step share.

Three things make passforge's graphs compile well on CPU:

- ``INDUCTOR_DECOMPOSITIONS`` (``kernels.ops``): the int8 ops reach inductor as the ATen ops their CPU
  implementations run, so quantizers and epilogues fuse with their neighbours and the GEMMs are extern calls
  from inductor's generated code, without a custom op's Python dispatch around each one. On CUDA the ops
  stay (their Triton kernels fuse all of this).
- int8 weight-only scales stored in the activations' dtype (:func:`scales_in_activation_dtype`): inductor's
  lowering of ``aten._weight_int8pack_mm`` takes the scales only as a stored tensor, not as the cast that the
  decomposition computes, and fails otherwise ("LoweringException: AssertionError: Pointwise").
- int4 weights repacked into this CPU's layout for the build (:func:`int4_in_cpu_layout`), so the int4 linears
  are ``_weight_int4pack_mm_for_cpu`` calls from the generated code, not custom ops dispatched in Python.

On every device, per-channel Q/DQ without zero points (what the lowering keeps for a layer it does not lower)
gets explicit zeros (:func:`zero_points_spelled_out`): inductor's lowering of it fails on ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx

import passforge.kernels.ops  # noqa: F401 - registers passforge::int8_weight_linear
from passforge.ir.graph import add_buffer, copy_graph_module, get_attr

INT8_WEIGHT_LINEAR = torch.ops.passforge.int8_weight_linear.default
INT4_WEIGHT_LINEAR = torch.ops.passforge.int4_weight_linear.default
PER_CHANNEL = (torch.ops.quantized_decomposed.quantize_per_channel.default,
               torch.ops.quantized_decomposed.dequantize_per_channel.default)


def computes_on_cpu(graph: fx.GraphModule, targets: Mapping[object, object]) -> bool:
    """Whether every call of one of ``targets`` in ``graph`` computes on the CPU, by its first operand: where
    the int8 ops are decomposed for inductor and passforge's ops are called directly (on CUDA the ops run
    their Triton kernels)."""
    values = [n.args[0].meta.get("val") for n in graph.graph.nodes if n.target in targets]
    return bool(values) and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in values)


def scales_in_activation_dtype(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy whose ``int8_weight_linear`` scales are stored in their activations' dtype::

        %s = get_attr[q_proj_weight_scale]                 # fp32
        int8_weight_linear(%x: bf16, %w, %s, None)    →    int8_weight_linear(%x, %w, %s_bf16, None)

    The op casts the scales to x's dtype first on CPU (``_weight_int8pack_mm`` takes them so), so the result is
    the same; the new tensor is the cast done once. A scale read by layers of different activation dtypes gets
    one copy per dtype; ``gm`` itself is not changed."""
    casts = [
        node for node in gm.graph.nodes
        if node.target is INT8_WEIGHT_LINEAR and node.args[2].op == "get_attr"
        and isinstance(node.args[0].meta.get("val"), torch.Tensor)
        and get_attr(gm, node.args[2].target).dtype != node.args[0].meta["val"].dtype
    ]  # fmt: skip
    if not casts:
        return gm
    copied = copy_graph_module(gm)
    nodes = dict(zip(gm.graph.nodes, copied.graph.nodes))
    made: dict[tuple[str, torch.dtype], fx.Node] = {}
    for node in (nodes[n] for n in casts):
        scale, dtype = node.args[2], node.args[0].meta["val"].dtype
        key = (scale.target, dtype)
        if key not in made:
            stem = f"{scale.target.replace('.', '_')}_{str(dtype).removeprefix('torch.')}"
            with copied.graph.inserting_after(scale):
                made[key] = add_buffer(copied, stem, get_attr(copied, scale.target).to(dtype))
            made[key].meta["val"] = scale.meta["val"].to(dtype)
        node.replace_input_with(scale, made[key])
    copied.graph.eliminate_dead_code()
    copied.recompile()
    return copied


def zero_points_spelled_out(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy whose per-channel ``quantize`` / ``dequantize`` calls without zero points (symmetric
    weights, e.g. after ``fold-quant`` in a layer the lowering kept) get a zeros tensor instead::

        dequantize_per_channel(%w_int8, %s, None, 0, ...)   →   dequantize_per_channel(%w_int8, %s, %zeros, 0, ...)

    ``(q - 0) * s`` is ``q * s`` exactly. inductor's lowerings of the ops fail on ``None`` zero points ("'NoneType'
    object has no attribute 'get_size'"); computing the product in ATen ops instead would let ``freezing`` fold
    it into an fp32 copy of the weight (4× the bytes, read every step), which the op's own lowering does not."""
    calls = [n for n in gm.graph.nodes if n.target in PER_CHANNEL and n.args[2] is None]
    if not calls:
        return gm
    copied = copy_graph_module(gm)
    nodes = dict(zip(gm.graph.nodes, copied.graph.nodes))
    for node in (nodes[n] for n in calls):
        channels = node.args[1].meta["val"].shape[0]
        with copied.graph.inserting_before(node):
            zeros = add_buffer(copied, "zero_points", torch.zeros(channels, dtype=torch.int64,
                                                                  device=node.args[1].meta["val"].device))
        zeros.meta["val"] = node.args[1].meta["val"].new_zeros(channels, dtype=torch.int64)
        node.args = (*node.args[:2], zeros, *node.args[3:])
    copied.recompile()
    return copied


def int4_in_cpu_layout(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy whose CPU ``int4_weight_linear`` calls are the ``_weight_int4pack_mm_for_cpu`` call the
    op makes, on weights already in that kernel's layout::

        int4_weight_linear(%x, %packed, %s, %z, 128, None)
            →   int4pack_linear(%x, %tiles, 128, %scales_and_zeros, None)   # _weight_int4pack_mm_for_cpu

    The layout depends on this CPU (``kernels.prepack``), so it is made here, for a build that is never saved,
    not in the IR. Then inductor calls the kernel from its generated code instead of dispatching the custom
    op in Python each time, with the same result (the op computes exactly this)."""
    from passforge.kernels.ops import backend, int4pack_linear
    from passforge.kernels.prepack import cpu_int4_layout

    def lowered(node: fx.Node) -> bool:
        x = node.args[0].meta.get("val")
        n, k = node.args[1].meta["val"].shape[0], node.args[1].meta["val"].shape[1] * 2
        return (isinstance(x, torch.Tensor) and all(a.op == "get_attr" for a in node.args[1:4])
                and backend("int4_weight_linear", x, (n, k), node.args[4]) == "aten._weight_int4pack_mm_for_cpu")

    calls = [n for n in gm.graph.nodes if n.target is INT4_WEIGHT_LINEAR and lowered(n)]
    if not calls:
        return gm
    copied = copy_graph_module(gm)
    nodes = dict(zip(gm.graph.nodes, copied.graph.nodes))
    graph = copied.graph
    for node in (nodes[n] for n in calls):
        x, packed, scales, zero_points, group_size, bias = node.args
        tiles, scales_and_zeros = cpu_int4_layout(get_attr(copied, packed.target), get_attr(copied, scales.target),
                                                  get_attr(copied, zero_points.target), x.meta["val"].dtype)
        with graph.inserting_before(node):
            stem = packed.target.replace(".", "_")
            tiles_node = add_buffer(copied, f"{stem}_cpu_tiles", tiles)
            sz_node = add_buffer(copied, f"{stem}_cpu_scales_and_zeros", scales_and_zeros)
            out = graph.call_function(int4pack_linear, (x, tiles_node, group_size, sz_node, bias))
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    copied.recompile()
    return copied


def inductor_compile(graph: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[..., Sequence[torch.Tensor]]:
    """inductor's build of ``graph`` for ``inputs``' sizes. ``freezing``: inductor folds the (already frozen)
    weights into its kernels and prepacks them for oneDNN / MKL, as torch.compile's own CPU inference setting
    does; on CPU passforge's int8 ops are decomposed (module docstring)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    from passforge.kernels.ops import INDUCTOR_DECOMPOSITIONS

    decompositions = select_decomp_table()
    graph = int4_in_cpu_layout(zero_points_spelled_out(graph))
    if computes_on_cpu(graph, INDUCTOR_DECOMPOSITIONS):
        decompositions = {**decompositions, **INDUCTOR_DECOMPOSITIONS}
        graph = scales_in_activation_dtype(graph)
    return compile_fx(graph, list(inputs), config_patches={"freezing": True}, decompositions=decompositions)
