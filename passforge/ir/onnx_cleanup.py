"""Clean-ups of a model ``torch.onnx`` exported from a passforge graph, that keep (and complete) the QDQ form.

Run by :mod:`passforge.ir.onnx_export`, on the ``onnx_ir`` model, in this order:

- :func:`fold_packed_int4` (before the optimizer, which would fold small unpacks but not large ones):
  ``Cast(unpack_int4(initializer), to=uint4)`` → one uint4 initializer with the same bytes;
- :func:`drop_lossless_cast_pairs` (after it: needs value types): the uint4 → uint8 → uint4 round trip
  torch's uint8 storage leaves between Q and DQ;
- :func:`transpose_weights_into_dq`: weights stored (K, N) so DequantizeLinear feeds MatMul directly.

Each returns how many places it changed.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from passforge.ir.onnx_qdq import INT_RANGES, UNPACK_INT4_MARK


def _packed_source(node: ir.Node) -> ir.Value | None:
    """The packed input of an unpack emitted by ``onnx_qdq.unpack_int4``, when ``node`` ends one."""
    if node.op_type != "Reshape" or UNPACK_INT4_MARK not in node.metadata_props:
        return None
    concat = node.inputs[0].producer()
    unsqueeze = concat.inputs[0].producer() if concat is not None else None
    bitwise_and = unsqueeze.inputs[0].producer() if unsqueeze is not None else None
    return bitwise_and.inputs[0] if bitwise_and is not None else None


def fold_packed_int4(model: ir.Model) -> int:
    """``Cast(unpack_int4(initializer), to=uint4)`` → one uint4 initializer with the packed bytes as they
    are (ONNX stores 4-bit tensors two per byte, low nibble first — the layout ``fold-quant`` wrote), so the
    file keeps int4 weights at half a byte each and DequantizeLinear reads a constant (what runtimes fuse).
    Returns how many were folded."""
    graph = model.graph
    unpacked: dict[ir.Value, ir.Value] = {}  # a packed weight read twice becomes one initializer
    for node in list(graph):
        if node.op_type != "Cast" or node.attributes["to"].as_int() != ir.DataType.UINT4:
            continue
        source = node.inputs[0].producer()
        packed = _packed_source(source) if source is not None else None
        if packed is None or packed.const_value is None or not packed.is_initializer():
            continue
        if packed not in unpacked:
            shape = [*packed.shape[:-1], packed.shape[-1] * 2]
            value = ir.Value(name=f"{packed.name}_uint4", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.UINT4))
            value.const_value = ir.PackedTensor(packed.const_value.numpy().reshape(-1), ir.DataType.UINT4, shape=shape)
            graph.register_initializer(value)
            unpacked[packed] = value
        node.outputs[0].replace_all_uses_with(unpacked[packed])
    return len(unpacked)


def _sole_user(value: ir.Value) -> ir.Node | None:
    users = value.uses()
    return users[0].node if len(users) == 1 and not value.is_graph_output() else None


def transpose_weights_into_dq(model: ir.Model) -> int:
    """``[Q →] DQ → Transpose(perm=[1, 0])`` on constant 2-D weights → the same chain on transposed
    constants (axis flipped), so DQ feeds MatMul directly: linear exports as ``MatMul(x, Transpose(W))``,
    and ONNX Runtime fuses only ``DQ(W^T) → MatMul`` into its MatMulNBits int4 / int8 kernels. A layout
    change: the values are identical. Returns how many weights moved."""
    graph = model.graph
    transposed: dict[ir.Value, ir.Value] = {}  # constants shared by several chains are transposed once

    def transpose(value: ir.Value) -> ir.Value:
        if value not in transposed:
            array = np.ascontiguousarray(value.const_value.numpy().T)
            new = ir.Value(name=f"{value.name}_t", shape=ir.Shape(array.shape), type=value.type)
            new.const_value = ir.Tensor(array, dtype=value.dtype)
            graph.register_initializer(new)
            transposed[value] = new
        return transposed[value]

    moved = 0
    for node in list(graph):
        if node.op_type != "Transpose" or list(node.attributes["perm"].as_ints()) != [1, 0]:
            continue
        dq = node.inputs[0].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or _sole_user(dq.outputs[0]) is not node:
            continue
        q = dq.inputs[0].producer()
        if q is not None and (q.op_type != "QuantizeLinear" or _sole_user(q.outputs[0]) is not dq):
            continue
        chain = [n for n in (q, dq) if n is not None]
        constants = {v for n in chain for v in n.inputs if v is not None and v.producer() not in chain}
        weight = chain[0].inputs[0]
        if node.outputs[0].is_graph_output() or weight.shape is None or len(weight.shape) != 2:
            continue
        if not all(v.is_initializer() and v.const_value is not None and len(v.shape) <= 2 for v in constants):
            continue
        rows, cols = weight.shape
        for chain_node in chain:  # 2-D operands (weight; blocked scales and zero points) transpose, 1-D stay
            for i, value in enumerate(chain_node.inputs):
                if value in constants and len(value.shape) == 2:
                    chain_node.replace_input_with(i, transpose(value))
            axis = chain_node.attributes.get("axis")
            old_axis = axis.as_int() % 2 if axis is not None else 1  # ONNX's default axis is 1
            chain_node.attributes["axis"] = ir.AttrInt64("axis", 1 - old_axis)
            chain_node.outputs[0].shape = ir.Shape([cols, rows])
        node.outputs[0].replace_all_uses_with(dq.outputs[0])
        graph.remove(node, safe=True)
        moved += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return moved


_FLOAT_WIDTH = {ir.DataType.BFLOAT16: 1, ir.DataType.FLOAT16: 1, ir.DataType.FLOAT: 2, ir.DataType.DOUBLE: 3}


def _holds(wide: ir.DataType, narrow: ir.DataType) -> bool:
    """True when every value of ``narrow`` is exactly representable in ``wide``."""
    if wide in INT_RANGES and narrow in INT_RANGES:
        return INT_RANGES[wide][0] <= INT_RANGES[narrow][0] and INT_RANGES[narrow][1] <= INT_RANGES[wide][1]
    if wide in _FLOAT_WIDTH and narrow in _FLOAT_WIDTH:
        return wide == narrow or _FLOAT_WIDTH[wide] > _FLOAT_WIDTH[narrow]
    return False


def drop_lossless_cast_pairs(model: ir.Model) -> int:
    """``Cast(Cast(x, to=wide), to=type(x))`` → ``x`` when ``wide`` holds every value of x's type: the
    uint4 → uint8 → uint4 round trip torch's uint8 storage leaves between Q and DQ. Needs value types, so
    it runs after the optimizer has inferred them. Returns how many."""
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain != "":
            continue
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Cast" or inner.domain != "":
            continue
        source = inner.inputs[0]
        target = ir.DataType(node.attributes["to"].as_int())
        wide = ir.DataType(inner.attributes["to"].as_int())
        if source.dtype == target and _holds(wide, target) and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(source)
            removed += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return removed
