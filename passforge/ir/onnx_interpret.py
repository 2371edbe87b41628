"""Run an ONNX graph with torch ops: the ``nn.Module`` that :mod:`passforge.ir.onnx_import` captures.

    module = OnnxModule(graph)        # an onnx-graphsurgeon Graph: cleaned, topologically sorted
    gm = capture(module, example_inputs, dynamic_shapes=...)

``forward`` walks the nodes in order and calls one handler per op (:data:`OPS`, keyed by domain and op
type), so torch.export records the ATen ops a PyTorch model of the same computation produces. Two choices
make the result read as captured rather than translated:

- **Shape arithmetic stays in Python.** ``Shape`` returns a :class:`ShapeValue` (ints, or SymInts for
  dynamic dims) and Gather/Slice/Concat/Unsqueeze/Squeeze/Add/Sub/Mul/Div/Cast/Range... compute on shape
  values in Python, so Reshape/Expand/ConstantOfShape receive sizes, never tensors: torch.export sees no
  data-dependent size and dynamic dims stay symbolic. Small integer constants (up to 64 elements) and
  one-element constants are shape values too, so a scale or an epsilon becomes a Python scalar
  (``aten.mul(x, 0.125)``), as in a captured model.
- **Weights are parameters.** Every other constant is registered on the module (floating as a frozen
  parameter, the rest as buffers, under its ONNX name), so the captured graph reads it with ``get_attr``.
  ``MatMul`` by a constant 2-D weight, or by ``Transpose`` of one, and ``Gemm`` become ``aten.linear``
  with the weight stored (out, in), the layout passforge's passes (quantize, fuse-linears, smooth-quant)
  read; a bias added right after is folded into it::

      MatMul(x, W[K, N]) → Add(·, b[N])        →   aten.linear(x, W_t[N, K], b)

- **QDQ is torch's Q/DQ.** QuantizeLinear/DequantizeLinear become ``quantized_decomposed``'s per-tensor and
  per-channel ops, what passforge's ``quantize`` inserts, so ``fold-quant`` and ``lower-quant`` read an
  imported QDQ model as their own; a dequantized weight stays integers, stored (out, in) like a float one::

      DQ(W_q[K, N], s[N], 0, axis=1) → MatMul    →   aten.linear(x, dequantize_per_channel(W_q_t[N, K], s, None, 0))

  A blocked int4/uint4 weight (ONNX Runtime's 4-bit QDQ, passforge's w4 export) becomes passforge's w4 as
  ``fold-quant`` stores it, so ``lower-quant`` lowers it to ``int4_weight_linear`` (int4 shifted by 8)::

      DQ(W_q[K, N]:uint4, s[K/g, N], z, axis=0, block_size=g) → MatMul
          →   aten.linear(x, dequantize_per_channel_group(unpack_int4(W_p[N, K/2]), s_t, z_t, 0, 15, uint8, g))

  float8e4m3fn Q/DQ become passforge's own fp8 ops (``quantize(scheme=fp8)``'s), the scale shaped to broadcast
  — a weight's per output channel (N, 1), an activation's per token (..., 1) as export_onnx writes it, blocked
  along the last axis with the whole row as the block — so ``lower-quant`` lowers them to ``fp8_linear``::

      DQ(W_q[K, N]:e4m3, s[N], axis=1) → MatMul    →   aten.linear(x, dequantize_fp8(W_q_t[N, K], s_rows[N, 1], dtype))
      DQ(Q(x, s[..., 1], axis=-1, block_size=K))    →   dequantize_fp8(quantize_fp8(x, s), s, dtype)

The ops are listed in :data:`OPS` and docs/onnx.md. Imports onnx-graphsurgeon: import it only when
importing a model.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import keyword
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn

from passforge.ir.graph import set_tensor_attr
from passforge.ir.onnx_import import ONNX_TO_TORCH, OnnxImportError, normalize_domain, torch_dtype
from passforge.kernels.ops import pack_int4  # also registers passforge::unpack_int4

MAX_SHAPE_VALUE = 64
"""Integer constants with at most this many elements are held in Python (see :class:`ShapeValue`)."""
DEFAULT_DOMAIN = ""
MS_DOMAIN = "com.microsoft"
INTERNAL_DOMAIN = "passforge.internal"
"""Ops the planner writes itself (:data:`LINEAR`); never read from a file."""
FLOAT8_TYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2, "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}  # fmt: skip
"""ml_dtypes' float8 types (how onnx reads FLOAT8* tensors) by name, as torch's: the bytes are reinterpreted, so
each must map to its own format (e4m3fnuz read as e4m3fn would be off by a factor of 2)."""


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array (ml_dtypes' bfloat16 / float8 included) as a torch tensor sharing its memory; ml_dtypes'
    int4 / uint4 (how onnx reads 4-bit tensors: unpacked, one value per byte) as an int8 / uint8 copy — their
    bytes hold the nibble only, not sign-extended, so a view would read -1 as 15."""
    array = array if array.flags.c_contiguous else array.copy()  # (np.ascontiguousarray would make 0-d 1-d)
    name = array.dtype.name
    if name in ("int4", "uint4"):
        return torch.from_numpy(array.astype(np.int8 if name == "int4" else np.uint8))
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    if name.startswith("float8"):
        if name not in FLOAT8_TYPES:
            raise OnnxImportError(f"{name} tensors are not supported (torch has {', '.join(FLOAT8_TYPES)})")
        return torch.from_numpy(array.view(np.uint8)).view(FLOAT8_TYPES[name])
    if array.dtype == object:
        raise OnnxImportError("string tensors are not supported (tokenizers inside the graph are not imported)")
    return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------------------
# Shape values


@dataclass(frozen=True)
class ShapeValue:
    """A rank-0 or rank-1 tensor held in Python: sizes (ints, SymInts) and small constants.

    Shape arithmetic on these stays Python arithmetic, so a size computed from ``Shape`` reaches
    ``Reshape`` as a SymInt instead of a tensor whose value torch.export would have to guess.
    """

    values: tuple[object, ...]
    dtype: torch.dtype
    scalar: bool = False

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ShapeValue:
        return cls(tuple(tensor.reshape(-1).tolist()), tensor.dtype, scalar=tensor.dim() == 0)

    @property
    def rank(self) -> int:
        return 0 if self.scalar else 1

    @property
    def concrete(self) -> bool:
        """No symbolic value (Python arithmetic on it needs no guard)."""
        return not any(isinstance(v, torch.SymInt) for v in self.values)

    def tensor(self) -> torch.Tensor:
        """As a tensor: a constant, or built from the sizes (``aten.scalar_tensor`` + ``aten.stack``)."""
        if self.concrete:
            value = torch.tensor(self.values, dtype=self.dtype)
        else:
            value = torch.stack([torch.scalar_tensor(v, dtype=self.dtype) for v in self.values])
        return value.reshape(()) if self.scalar else value


Value = torch.Tensor | ShapeValue | None


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype is not torch.bool


def _small(tensor: torch.Tensor) -> bool:
    """Held as a :class:`ShapeValue`: integer constants up to :data:`MAX_SHAPE_VALUE` elements, and any
    one-element constant (a scale, an epsilon, a fill value)."""
    if tensor.dim() > 1:
        return False
    integer = _is_int(tensor.dtype) or tensor.dtype is torch.bool
    return tensor.numel() == 1 or (integer and tensor.numel() <= MAX_SHAPE_VALUE)


def as_tensor(value: Value) -> torch.Tensor:
    return value.tensor() if isinstance(value, ShapeValue) else value


def _operand(value: Value, other: Value) -> object:
    """``value`` as an elementwise operand next to ``other``: a one-element shape value becomes a Python
    scalar when ``other`` is a tensor whose rank keeps the result's shape; anything else a tensor."""
    one = isinstance(value, ShapeValue) and len(value.values) == 1
    if one and isinstance(other, torch.Tensor) and other.dim() >= value.rank:
        return value.values[0]
    return as_tensor(value)


# ---------------------------------------------------------------------------------------------------------
# Nodes and the op table


@dataclass(frozen=True)
class OnnxNode:
    """One ONNX node as the interpreter runs it: names only (values live in forward's environment)."""

    name: str
    op: str
    domain: str
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict[str, object] = field(default_factory=dict)
    wanted: tuple[bool, ...] = ()  # which outputs something reads

    def attr(self, name: str, default: object = None) -> object:
        return self.attrs.get(name, default)

    def wants(self, index: int) -> bool:
        return index < len(self.wanted) and self.wanted[index]

    def fail(self, message: str) -> OnnxImportError:
        return OnnxImportError(f"node '{self.name}' ({self.op}): {message}")


Handler = Callable[..., object]
OPS: dict[tuple[str, str], Handler] = {}
"""``(domain, op_type) → handler(node, *inputs)``: every op the importer reads."""


def _op(*names: str, domain: str = DEFAULT_DOMAIN) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            OPS[(domain, name)] = fn
        return fn

    return register


def ints(node: OnnxNode, value: Value, what: str) -> list[object]:
    """A shape-like input (sizes, axes, starts...) as Python ints / SymInts."""
    if isinstance(value, ShapeValue):
        return list(value.values)
    raise node.fail(
        f"its {what} input is computed from tensor values at run time; passforge imports sizes that derive "
        "from input shapes and constants only (a data-dependent size cannot be captured)"
    )


def scalar(node: OnnxNode, value: Value, what: str) -> object:
    values = ints(node, value, what)
    if len(values) != 1:
        raise node.fail(f"its {what} input must hold one value, got {len(values)}")
    return values[0]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------------------------------------
# Elementwise


def _trunc_div(a: int, b: int) -> int:
    """C-style integer division (ONNX Div on integers truncates toward zero)."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    ref = a if isinstance(a, torch.Tensor) else b
    if _is_int(ref.dtype):
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


def _py_div(a: object, b: object) -> object:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return a // b  # sizes are non-negative: floor is truncation
    return _trunc_div(a, b)


def _pow(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """ONNX Pow keeps the base's type (an int exponent on a float base, or the reverse)."""
    out = torch.pow(a, b)
    ref = a if isinstance(a, torch.Tensor) else None
    return out.to(ref.dtype) if ref is not None and out.dtype != ref.dtype else out


_SYMBOLIC_SAFE = {operator.add, operator.sub, operator.mul, _py_div, operator.mod}
"""Python operations on SymInts that need no guard (comparisons would specialise the dim)."""
_COMPARISONS = {operator.eq, operator.lt, operator.le, operator.gt, operator.ge}

_BINARY: dict[str, tuple[Callable[..., torch.Tensor], Callable[[object, object], object] | None]] = {
    "Add": (torch.add, operator.add),
    "Sub": (torch.sub, operator.sub),
    "Mul": (torch.mul, operator.mul),
    "Div": (_div, _py_div),
    "Pow": (_pow, None),
    "Equal": (torch.eq, operator.eq),
    "Less": (torch.lt, operator.lt),
    "LessOrEqual": (torch.le, operator.le),
    "Greater": (torch.gt, operator.gt),
    "GreaterOrEqual": (torch.ge, operator.ge),
    "And": (torch.logical_and, operator.and_),
    "Or": (torch.logical_or, operator.or_),
    "Xor": (torch.logical_xor, operator.xor),
    "BitwiseAnd": (torch.bitwise_and, operator.and_),
    "BitwiseOr": (torch.bitwise_or, operator.or_),
    "BitwiseXor": (torch.bitwise_xor, operator.xor),
}


def _python_elementwise(fn: Callable[..., object], values: Sequence[ShapeValue], dtype: torch.dtype) -> Value:
    """``fn`` over shape values in Python (broadcasting ranks 0 and 1); None when it would need a guard."""
    symbolic = not all(v.concrete for v in values)
    if (symbolic and fn not in _SYMBOLIC_SAFE) or not (_is_int(dtype) or dtype is torch.bool):
        return None
    length = max(len(v.values) for v in values)
    if any(len(v.values) not in (1, length) for v in values):
        return None
    columns = [v.values * length if len(v.values) == 1 else v.values for v in values]
    out = tuple(fn(*row) for row in zip(*columns))
    return ShapeValue(out, dtype, scalar=all(v.scalar for v in values))


def _binary(name: str) -> Handler:
    tensor_fn, python_fn = _BINARY[name]
    result_dtype = torch.bool if python_fn in _COMPARISONS else None

    def run(node: OnnxNode, a: Value, b: Value) -> Value:
        if isinstance(a, ShapeValue) and isinstance(b, ShapeValue) and python_fn is not None:
            out = _python_elementwise(python_fn, (a, b), result_dtype or a.dtype)
            if out is not None:
                return out
        return tensor_fn(_operand(a, b), _operand(b, a))

    return run


for _name in _BINARY:
    OPS[(DEFAULT_DOMAIN, _name)] = _binary(_name)


@_op("Mod")
def _mod(node: OnnxNode, a: Value, b: Value) -> Value:
    fmod = node.attr("fmod", 0)
    if isinstance(a, ShapeValue) and isinstance(b, ShapeValue) and not fmod:
        out = _python_elementwise(operator.mod, (a, b), a.dtype)
        if out is not None:
            return out
    return (torch.fmod if fmod else torch.remainder)(_operand(a, b), _operand(b, a))


def _variadic(tensor_fn: Callable[..., torch.Tensor], python_fn: Callable[..., object] | None) -> Handler:
    def run(node: OnnxNode, *args: Value) -> Value:
        if python_fn is not None and all(isinstance(a, ShapeValue) for a in args):
            out = _python_elementwise(python_fn, args, args[0].dtype)
            if out is not None:
                return out
        result = as_tensor(args[0])
        for other in args[1:]:
            result = tensor_fn(result, as_tensor(other))
        return result

    return run


OPS[(DEFAULT_DOMAIN, "Max")] = _variadic(torch.maximum, torch.sym_max)
OPS[(DEFAULT_DOMAIN, "Min")] = _variadic(torch.minimum, torch.sym_min)
OPS[(DEFAULT_DOMAIN, "Sum")] = _variadic(torch.add, None)


@_op("Mean")
def _mean(node: OnnxNode, *args: Value) -> torch.Tensor:
    return OPS[(DEFAULT_DOMAIN, "Sum")](node, *args) / len(args)


_UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[object], object] | None]] = {
    "Neg": (torch.neg, operator.neg),
    "Abs": (torch.abs, abs),
    "Not": (torch.logical_not, operator.not_),
    "Sqrt": (torch.sqrt, None),
    "Reciprocal": (torch.reciprocal, None),
    "Exp": (torch.exp, None),
    "Log": (torch.log, None),
    "Tanh": (torch.tanh, None),
    "Sigmoid": (torch.sigmoid, None),
    "Relu": (torch.relu, None),
    "Erf": (torch.erf, None),
    "Sin": (torch.sin, None),
    "Cos": (torch.cos, None),
    "Tan": (torch.tan, None),
    "Atan": (torch.atan, None),
    "Floor": (torch.floor, None),
    "Ceil": (torch.ceil, None),
    "Round": (torch.round, None),  # half to even, as ONNX
    "Sign": (torch.sign, None),
    "IsNaN": (torch.isnan, None),
    "Softplus": (F.softplus, None),
    "Softsign": (F.softsign, None),
    "Mish": (F.mish, None),
    "HardSwish": (F.hardswish, None),
}


def _unary(name: str) -> Handler:
    tensor_fn, python_fn = _UNARY[name]

    def run(node: OnnxNode, x: Value) -> Value:
        if isinstance(x, ShapeValue) and python_fn is not None and x.concrete and _is_int(x.dtype):
            return ShapeValue(tuple(python_fn(v) for v in x.values), x.dtype, x.scalar)
        if isinstance(x, ShapeValue) and name == "Not" and x.concrete:
            return ShapeValue(tuple(not v for v in x.values), x.dtype, x.scalar)
        return tensor_fn(as_tensor(x))

    return run


for _name in _UNARY:
    OPS[(DEFAULT_DOMAIN, _name)] = _unary(_name)


@_op("LeakyRelu")
def _leaky_relu(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.leaky_relu(as_tensor(x), node.attr("alpha", 0.01))


@_op("Elu")
def _elu(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.elu(as_tensor(x), node.attr("alpha", 1.0))


@_op("HardSigmoid")
def _hard_sigmoid(node: OnnxNode, x: Value) -> torch.Tensor:
    return torch.clamp(as_tensor(x) * node.attr("alpha", 0.2) + node.attr("beta", 0.5), 0.0, 1.0)


@_op("PRelu")
def _prelu(node: OnnxNode, x: Value, slope: Value) -> torch.Tensor:
    x = as_tensor(x)
    return torch.where(x < 0, x * _operand(slope, x), x)


@_op("Clip")
def _clip(node: OnnxNode, x: Value, low: Value = None, high: Value = None) -> torch.Tensor:
    x = as_tensor(x)
    low, high = (None if v is None else _operand(v, x) for v in (low, high))
    if low is None and high is None:
        return x
    if high is None and not isinstance(low, torch.Tensor):  # as torch writes it (lower-quant's fp8 token scale)
        return torch.clamp_min(x, low)
    return torch.clamp(x, low, high)


@_op("Where")
def _where(node: OnnxNode, cond: Value, x: Value, y: Value) -> Value:
    if all(isinstance(v, ShapeValue) and v.concrete for v in (cond, x, y)):
        out = _python_elementwise(lambda c, a, b: a if c else b, (cond, x, y), x.dtype)
        if out is not None:
            return out
    cond = as_tensor(cond)
    dtype = x.dtype
    if isinstance(x, ShapeValue) and isinstance(y, ShapeValue):  # two scalars: one becomes a tensor for dtype
        x = x.tensor()
    out = torch.where(cond, _operand(x, cond), _operand(y, cond))
    return out if out.dtype == dtype else out.to(dtype)


@_op("Gelu")
def _gelu(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.gelu(as_tensor(x), approximate=node.attr("approximate", "none"))


# ---------------------------------------------------------------------------------------------------------
# Types and shapes


@_op("Identity")
def _identity(node: OnnxNode, x: Value) -> Value:
    return x


@_op("Dropout")
def _dropout(node: OnnxNode, x: Value, ratio: Value = None, training: Value = None) -> tuple[Value, ...]:
    """Inference: the identity, and an all-true mask if something reads it."""
    if training is not None and not (isinstance(training, ShapeValue) and not any(training.values)):
        raise node.fail("training_mode must be a constant false; passforge imports inference graphs")
    mask = torch.ones_like(as_tensor(x), dtype=torch.bool) if node.wants(1) else None
    return x, mask


@_op("Cast")
def _cast(node: OnnxNode, x: Value) -> Value:
    dtype = torch_dtype(node.attr("to"), f"node '{node.name}' (Cast)")
    if isinstance(x, ShapeValue):
        if _is_int(dtype) and _is_int(x.dtype):
            return ShapeValue(x.values, dtype, x.scalar)
        if x.concrete:
            convert = bool if dtype is torch.bool else int if _is_int(dtype) else float
            if convert is not int or all(math.isfinite(v) for v in x.values):
                return ShapeValue(tuple(convert(v) for v in x.values), dtype, x.scalar)
        x = x.tensor()
    return x if x.dtype == dtype else x.to(dtype)


@_op("CastLike")
def _cast_like(node: OnnxNode, x: Value, like: Value) -> Value:
    dtype = like.dtype
    onnx_type = next(k for k, v in ONNX_TO_TORCH.items() if v == dtype)
    return _cast(OnnxNode(node.name, "Cast", node.domain, node.inputs, node.outputs, {"to": onnx_type}), x)


@_op("Shape")
def _shape(node: OnnxNode, x: Value) -> ShapeValue:
    if isinstance(x, ShapeValue):
        sizes: tuple[object, ...] = () if x.scalar else (len(x.values),)
    else:
        sizes = tuple(x.shape)
    return ShapeValue(sizes[slice(node.attr("start", 0), node.attr("end", len(sizes)))], torch.int64)


@_op("Size")
def _size(node: OnnxNode, x: Value) -> ShapeValue:
    count = len(x.values) if isinstance(x, ShapeValue) else x.numel()
    return ShapeValue((count,), torch.int64, scalar=True)


def _target_shape(node: OnnxNode, x: Value, shape: Value) -> list[object]:
    """Reshape's target: 0 copies the input's dim (unless ``allowzero``); -1 is left to torch."""
    sizes = ints(node, shape, "shape")
    dims = x.shape if isinstance(x, torch.Tensor) else (len(x.values),) if not x.scalar else ()
    if not node.attr("allowzero", 0):
        sizes = [dims[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(sizes)]
    return sizes


@_op("Reshape")
def _reshape(node: OnnxNode, x: Value, shape: Value) -> Value:
    sizes = _target_shape(node, x, shape)
    if isinstance(x, ShapeValue) and len(sizes) <= 1:
        return ShapeValue(x.values, x.dtype, scalar=not sizes)
    return as_tensor(x).reshape(sizes)


@_op("Flatten")
def _flatten(node: OnnxNode, x: Value) -> torch.Tensor:
    x = as_tensor(x)
    axis = _axis(node.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(node: OnnxNode, x: Value) -> torch.Tensor:
    x = as_tensor(x)
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _axes_input(node: OnnxNode, axes: Value) -> list[int] | None:
    """Axes given as an input (opset 13+ for Squeeze/Unsqueeze/ReduceSum, 18+ for the other reductions) or
    as the older attribute."""
    if axes is not None:
        return [int(a) for a in ints(node, axes, "axes")]
    attr = node.attr("axes")
    return list(attr) if attr is not None else None


@_op("Unsqueeze")
def _unsqueeze(node: OnnxNode, x: Value, axes: Value = None) -> Value:
    axes = _axes_input(node, axes)
    if isinstance(x, ShapeValue) and x.scalar and axes in ([0], [-1]):
        return ShapeValue(x.values, x.dtype)
    x = as_tensor(x)
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Squeeze")
def _squeeze(node: OnnxNode, x: Value, axes: Value = None) -> Value:
    axes = _axes_input(node, axes)
    if isinstance(x, ShapeValue) and not x.scalar and len(x.values) == 1 and axes in (None, [0], [-1]):
        return ShapeValue(x.values, x.dtype, scalar=True)
    x = as_tensor(x)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _broadcast(shape: Sequence[object], target: Sequence[object]) -> list[object]:
    """ONNX Expand broadcasts both ways: a 1 on either side takes the other's size."""
    rank = max(len(shape), len(target))
    shape = [1] * (rank - len(shape)) + list(shape)
    target = [1] * (rank - len(target)) + list(target)
    out = []
    for have, want in zip(shape, target):
        if isinstance(want, int) and want == 1:
            out.append(have)
        else:
            out.append(want)
    return out


@_op("Expand")
def _expand(node: OnnxNode, x: Value, shape: Value) -> torch.Tensor:
    sizes = ints(node, shape, "shape")
    if isinstance(x, ShapeValue) and len(x.values) == 1:  # a constant filled to a shape: aten.full
        return torch.full(_broadcast([1] * x.rank, sizes), x.values[0], dtype=x.dtype)
    x = as_tensor(x)
    return torch.broadcast_to(x, _broadcast(x.shape, sizes))


@_op("Concat")
def _concat(node: OnnxNode, *args: Value) -> Value:
    parts = [a for a in args if a is not None]
    if all(isinstance(p, ShapeValue) and not p.scalar for p in parts):
        return ShapeValue(tuple(v for p in parts for v in p.values), parts[0].dtype)
    return torch.cat([as_tensor(p) for p in parts], dim=node.attr("axis"))


@_op("Split")
def _split(node: OnnxNode, x: Value, split: Value = None) -> tuple[Value, ...]:
    axis = node.attr("axis", 0)
    count = node.attr("num_outputs") or len(node.outputs)
    sizes = ints(node, split, "split") if split is not None else node.attr("split")
    if isinstance(x, ShapeValue) and axis in (0, -1) and not x.scalar:
        if sizes is None:
            chunk = -(-len(x.values) // count)
            sizes = [min(chunk, len(x.values) - i * chunk) for i in range(count)]
        offsets = np.cumsum([0, *sizes]).tolist()
        return tuple(ShapeValue(x.values[a:b], x.dtype) for a, b in itertools.pairwise(offsets))
    x = as_tensor(x)
    if sizes is not None:
        return tuple(torch.split(x, list(sizes), dim=axis))
    size = x.shape[axis]
    chunk = (size + count - 1) // count  # ONNX: parts of ceil(size / count), the last one smaller
    if isinstance(size, int):
        return tuple(torch.split(x, [min(chunk, size - i * chunk) for i in range(count)], dim=axis))
    return tuple(torch.split(x, [chunk] * (count - 1) + [size - chunk * (count - 1)], dim=axis))  # symbolic


@_op("Slice")
def _slice(node: OnnxNode, x: Value, starts: Value, ends: Value, axes: Value = None, steps: Value = None) -> Value:
    starts, ends = ints(node, starts, "starts"), ints(node, ends, "ends")
    axes = ints(node, axes, "axes") if axes is not None else list(range(len(starts)))
    steps = ints(node, steps, "steps") if steps is not None else [1] * len(starts)
    if isinstance(x, ShapeValue):
        bounds = (*starts, *ends, *steps)
        if axes in ([0], [-1]) and all(isinstance(v, int) for v in bounds):  # slicing sizes: Python
            return ShapeValue(x.values[slice(starts[0], ends[0], steps[0])], x.dtype)
        x = x.tensor()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(int(axis), x.dim())
        if isinstance(step, int) and step < 0:
            x = _reverse_slice(node, x, axis, start, end, step)
            continue
        x = x[(slice(None),) * axis + (slice(start, end, step),)]
    return x


INT32_MAX = 2**31 - 1


def _reverse_slice(node: OnnxNode, x: torch.Tensor, axis: int, start: object, end: object, step: int) -> torch.Tensor:
    """A slice with a negative step: the whole dim reversed (``flip``, also for a dynamic dim), or on a
    static dim the picked indices."""
    size = x.shape[axis]
    from_last = isinstance(start, int) and (start == -1 or start >= INT32_MAX)
    to_first = isinstance(end, int) and end <= -INT32_MAX
    if from_last and to_first and step == -1:
        return x.flip(axis)
    if not isinstance(size, int):
        raise node.fail("a negative step on a dynamic dimension is supported only to reverse the whole dim")
    picked = list(range(size))[slice(start, end, step)]
    return x.index_select(axis, torch.tensor(picked, dtype=torch.int64))


@_op("Gather")
def _gather(node: OnnxNode, data: Value, indices: Value) -> Value:
    axis = node.attr("axis", 0)
    if isinstance(data, ShapeValue) and isinstance(indices, ShapeValue) and indices.concrete:
        picked = tuple(data.values[int(i)] for i in indices.values)
        return ShapeValue(picked, data.dtype, scalar=indices.scalar)
    data = as_tensor(data)
    axis = _axis(axis, data.dim())
    if isinstance(indices, ShapeValue) and indices.concrete:
        if indices.scalar:
            return data.select(axis, int(indices.values[0]))
        size = data.shape[axis]
        if any(i < 0 for i in indices.values) and not isinstance(size, int):
            raise node.fail("negative constant indices into a dynamic dimension are not supported")
        wrapped = [i + size if i < 0 else i for i in indices.values]
        return data.index_select(axis, torch.tensor(wrapped, dtype=torch.int64))
    indices = as_tensor(indices)
    if axis == 0 and data.dim() == 2:  # an embedding lookup (ONNX allows negative ids: wrapped)
        return F.embedding(torch.remainder(indices, data.shape[0]), data)
    flat = torch.remainder(indices.reshape(-1), data.shape[axis])  # ONNX allows negative indices
    picked = data.index_select(axis, flat)
    return picked.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])


@_op("GatherElements")
def _gather_elements(node: OnnxNode, data: Value, indices: Value) -> torch.Tensor:
    data, indices = as_tensor(data), as_tensor(indices)
    axis = _axis(node.attr("axis", 0), data.dim())
    return torch.gather(data, axis, torch.remainder(indices, data.shape[axis]))


@_op("Tile")
def _tile(node: OnnxNode, x: Value, repeats: Value) -> torch.Tensor:
    return as_tensor(x).repeat(*ints(node, repeats, "repeats"))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@_op("Pad")
def _pad(node: OnnxNode, x: Value, pads: Value, value: Value = None, axes: Value = None) -> torch.Tensor:
    x = as_tensor(x)
    pads = ints(node, pads, "pads")
    axes = [_axis(int(a), x.dim()) for a in ints(node, axes, "axes")] if axes is not None else list(range(x.dim()))
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    widths = {axis: (b, e) for axis, b, e in zip(axes, begins, ends)}
    flat: list[object] = []
    for axis in range(x.dim() - 1, -1, -1):  # F.pad: last dim first
        flat.extend(widths.get(axis, (0, 0)))
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    mode = _PAD_MODES.get(node.attr("mode", "constant"))
    if mode is None:
        raise node.fail(f"mode {node.attr('mode')!r} is not supported (constant, reflect, edge, wrap are)")
    fill = scalar(node, value, "constant_value") if value is not None and mode == "constant" else None
    return F.pad(x, flat, mode=mode, value=fill) if mode == "constant" else F.pad(x, flat, mode=mode)


# ---------------------------------------------------------------------------------------------------------
# Generators


@_op("Constant")
def _constant(node: OnnxNode) -> Value:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            tensor = to_torch(np.asarray(value.values if isinstance(value, gs.Constant) else value))
            if key in ("value_float", "value_floats"):
                tensor = tensor.float()
            return ShapeValue.of(tensor) if _small(tensor) else tensor.clone()
    raise node.fail(f"attribute {sorted(node.attrs)} is not supported (value, value_float(s), value_int(s) are)")


@_op("ConstantOfShape")
def _constant_of_shape(node: OnnxNode, shape: Value) -> Value:
    sizes = ints(node, shape, "shape")
    fill = node.attr("value")
    tensor = to_torch(np.asarray(fill.values if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)))
    value, dtype = tensor.reshape(-1)[0].item(), tensor.dtype
    small = len(sizes) <= 1 and all(isinstance(s, int) for s in sizes) and math.prod(sizes) <= MAX_SHAPE_VALUE
    if small and (_is_int(dtype) or dtype is torch.bool):
        return ShapeValue((value,) * math.prod(sizes), dtype, scalar=not sizes)
    return torch.full(sizes, value, dtype=dtype)


@_op("Range")
def _range(node: OnnxNode, start: Value, limit: Value, delta: Value) -> Value:
    values = [scalar(node, v, name) for v, name in ((start, "start"), (limit, "limit"), (delta, "delta"))]
    dtype = start.dtype
    if all(isinstance(v, int) for v in values) and _is_int(dtype):
        count = max(0, -(-(values[1] - values[0]) // values[2]))
        if count <= MAX_SHAPE_VALUE:
            return ShapeValue(tuple(range(*values)), dtype)
    return torch.arange(*values, dtype=dtype)


@_op("Trilu")
def _trilu(node: OnnxNode, x: Value, k: Value = None) -> torch.Tensor:
    diagonal = scalar(node, k, "k") if k is not None else 0
    return (torch.triu if node.attr("upper", 1) else torch.tril)(as_tensor(x), diagonal)


@_op("CumSum")
def _cumsum(node: OnnxNode, x: Value, axis: Value) -> torch.Tensor:
    x = as_tensor(x)
    dim = _axis(int(scalar(node, axis, "axis")), x.dim())
    if node.attr("reverse", 0):
        x = x.flip(dim)
    out = torch.cumsum(x, dim).to(x.dtype)
    if node.attr("exclusive", 0):
        out = out - x
    return out.flip(dim) if node.attr("reverse", 0) else out


# ---------------------------------------------------------------------------------------------------------
# Reductions, normalizations, matmuls


def _reduce_dims(node: OnnxNode, x: torch.Tensor, axes: Value) -> list[int] | None:
    """The dims to reduce; None means "the input unchanged" (empty axes with ``noop_with_empty_axes``)."""
    dims = _axes_input(node, axes)
    if not dims:
        return None if node.attr("noop_with_empty_axes", 0) else list(range(x.dim()))
    return [_axis(d, x.dim()) for d in dims]


def _reduction(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Handler:
    def run(node: OnnxNode, x: Value, axes: Value = None) -> torch.Tensor:
        x = as_tensor(x)
        dims = _reduce_dims(node, x, axes)
        return x if dims is None else fn(x, dims, bool(node.attr("keepdims", 1)))

    return run


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim, keepdim=keep)
    return x


_REDUCTIONS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}
for _name, _fn in _REDUCTIONS.items():
    OPS[(DEFAULT_DOMAIN, _name)] = _reduction(_fn)


def _arg(fn: Callable[..., torch.Tensor]) -> Handler:
    def run(node: OnnxNode, x: Value) -> torch.Tensor:
        x = as_tensor(x)
        axis = _axis(node.attr("axis", 0), x.dim())
        keep = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return run


OPS[(DEFAULT_DOMAIN, "ArgMax")] = _arg(torch.argmax)
OPS[(DEFAULT_DOMAIN, "ArgMin")] = _arg(torch.argmin)


@_op("TopK")
def _topk(node: OnnxNode, x: Value, k: Value) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_tensor(x)
    values, indices = torch.topk(
        x, scalar(node, k, "k"), dim=node.attr("axis", -1), largest=bool(node.attr("largest", 1)),
        sorted=bool(node.attr("sorted", 1)),
    )  # fmt: skip
    return values, indices


@_op("Softmax")
def _softmax(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.softmax(as_tensor(x), dim=node.attr("axis", -1))


@_op("LogSoftmax")
def _log_softmax(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.log_softmax(as_tensor(x), dim=node.attr("axis", -1))


def _normalized_dims(x: torch.Tensor, axis: int) -> list[int]:
    return list(range(_axis(axis, x.dim()), x.dim()))


def _stash(node: OnnxNode, x: torch.Tensor) -> torch.Tensor:
    """Normalizations compute in float32 (``stash_type=1``, the default) whatever the input's type."""
    wide = node.attr("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    return x.float() if wide else x


def _layer_norm(
    node: OnnxNode, x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, eps: float, axis: int
) -> tuple[torch.Tensor, ...]:
    dims = _normalized_dims(x, axis)
    shape = [x.shape[d] for d in dims]
    static = all(isinstance(s, int) for s in shape)
    fits = all(t is None or (static and list(t.shape) == shape) for t in (scale, bias))
    if fits and not (node.wants(1) or node.wants(2)):
        return (F.layer_norm(x, shape, scale, bias, eps),)
    wide = _stash(node, x)
    mean = wide.mean(dims, keepdim=True)
    centered = wide - mean
    inv_std = torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    y = (centered * inv_std).to(x.dtype)
    y = y * scale if scale is not None else y
    y = y + bias if bias is not None else y
    return y, mean, inv_std


def _rms_norm(
    node: OnnxNode, x: torch.Tensor, scale: torch.Tensor | None, eps: float, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / sqrt(mean(x²) + eps) · scale``, the primitive ops a captured RMSNorm has."""
    dims = _normalized_dims(x, axis)
    wide = _stash(node, x)
    inv_std = torch.rsqrt(wide.pow(2).mean(dims, keepdim=True) + eps)
    y = (wide * inv_std).to(x.dtype)
    return (y * scale if scale is not None else y), inv_std


@_op("LayerNormalization")
def _layer_normalization(node: OnnxNode, x: Value, scale: Value, bias: Value = None) -> tuple[torch.Tensor, ...]:
    x = as_tensor(x)
    scale, bias = (None if v is None else as_tensor(v) for v in (scale, bias))
    return _layer_norm(node, x, scale, bias, node.attr("epsilon", 1e-5), node.attr("axis", -1))


@_op("RMSNormalization")
@_op("SimplifiedLayerNormalization")
def _rms_normalization(node: OnnxNode, x: Value, scale: Value) -> tuple[torch.Tensor, torch.Tensor]:
    y, inv_std = _rms_norm(node, as_tensor(x), as_tensor(scale), node.attr("epsilon", 1e-5), node.attr("axis", -1))
    return y, inv_std


@_op("MatMul")
def _matmul(node: OnnxNode, a: Value, b: Value) -> torch.Tensor:
    return torch.matmul(as_tensor(a), as_tensor(b))


LINEAR = "Linear"
"""Internal op the planner writes for MatMul/Gemm by a constant weight (+ bias): ``F.linear``."""


@_op(LINEAR, domain=INTERNAL_DOMAIN)
def _linear(node: OnnxNode, x: Value, weight: torch.Tensor, bias: Value = None) -> torch.Tensor:
    return F.linear(as_tensor(x), weight, None if bias is None else as_tensor(bias))


@_op("Gemm")
def _gemm(node: OnnxNode, a: Value, b: Value, c: Value = None) -> torch.Tensor:
    a, b = as_tensor(a), as_tensor(b)
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    y = a @ b
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    y = y * alpha if alpha != 1.0 else y
    if c is not None:
        c = _operand(c, y)
        y = y + (c * beta if beta != 1.0 else c)
    return y


@_op("Einsum")
def _einsum(node: OnnxNode, *args: Value) -> torch.Tensor:
    return torch.einsum(node.attr("equation").replace(" ", ""), *(as_tensor(a) for a in args))


# ---------------------------------------------------------------------------------------------------------
# Quantization: QuantizeLinear / DequantizeLinear as torch's quantized_decomposed ops


qd = torch.ops.quantized_decomposed
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANTIZED_TYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "uint16": torch.uint16}
"""The integer types QuantizeLinear writes and DequantizeLinear reads, by numpy name (``torch.iinfo`` gives
their ranges: int8 -128..127, uint8 0..255 — ONNX saturates to the type, torch clamps to quant_min/max)."""
DEQUANTIZED_ONLY_TYPES = {"int32": torch.int32}
"""DequantizeLinear also reads int32: ONNX Runtime's quantizer stores Gemm biases so."""
QDQ_SUPPORTED = (
    "passforge imports QuantizeLinear/DequantizeLinear to and from int8, uint8, int16 and uint16 (DequantizeLinear "
    "also int32), per tensor or per axis; float8e4m3fn with no or a zero zero point, per tensor, per axis, or "
    "blocked along the last axis with block_size the whole row (per token); and int4/uint4 blocked along K "
    "(block_size > 0) on a constant MatMul/Gemm weight; other float8 types, 4-bit per tensor or per axis, and other "
    "blocked forms are not supported"
)
FP8 = "float8_e4m3fn"
"""The float8 type passforge has ops for: ``passforge::quantize_fp8`` / ``dequantize_fp8``."""
GROUPED_TYPES = ("uint4", "int4")
"""The types a blocked weight may have: they become ``quantize_per_channel_group`` / ``dequantize_per_channel_group``
in uint4 (0..15), passforge's w4, int4 shifted by 8 (see :meth:`OnnxModule._group_out_in`)."""
INT4_SHIFT = 8
"""int4 (-8..7) + 8 is uint4 (0..15); the zero point shifts too, so ``q - z`` is unchanged."""


def _type_name(tensor: gs.Tensor) -> str | None:
    """numpy's name for a graph tensor's element type (``int8``, ``int4``, ``float8_e4m3fn``), None if unknown;
    onnx-graphsurgeon keeps the ONNX enum for types numpy lacks."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return (onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else np.dtype(dtype)).name
    return str(dtype)


def _quantized_type_name(node: gs.Node) -> str | None:
    """The integer side's type: DequantizeLinear's input; QuantizeLinear's zero point, else its
    ``output_dtype``, else uint8 (the spec's default)."""
    if node.op == "DequantizeLinear":
        return _type_name(node.inputs[0])
    if len(node.inputs) > 2 and node.inputs[2].name:
        return _type_name(node.inputs[2])
    declared = node.attrs.get("output_dtype", 0)
    return onnx.helper.tensor_dtype_to_np_dtype(declared).name if declared else "uint8"


def _integer_types(op: str) -> dict[str, torch.dtype]:
    """The integer types ``op`` may quantize to (QuantizeLinear) or read (DequantizeLinear: int32 too)."""
    return {**QUANTIZED_TYPES, **(DEQUANTIZED_ONLY_TYPES if op == "DequantizeLinear" else {})}


def _unsupported_type(op: str, name: str) -> str:
    return f"{'quantizes to' if op == 'QuantizeLinear' else 'dequantizes'} {name}; {QDQ_SUPPORTED}"


def qdq_refusal(node: gs.Node, weight: WeightRead | None = None) -> str | None:
    """Why a QuantizeLinear/DequantizeLinear cannot be imported as torch's Q/DQ ops, or None when it can (or
    is another op). ``weight``: the linear whose constant weight the node quantizes (:func:`weight_reads`),
    the only place blocked and 4-bit forms are read. Checked while planning, before any constant is read."""
    if node.op not in QDQ_OPS or normalize_domain(node.domain):
        return None
    block = node.attrs.get("block_size", 0)
    name = _quantized_type_name(node)
    if name in FLOAT8_TYPES:
        return _fp8_refusal(node, name)
    if block or name in GROUPED_TYPES:
        return _grouped_refusal(node, name, block, weight)
    return None if name is None or name in _integer_types(node.op) else _unsupported_type(node.op, name)


def _fp8_refusal(node: gs.Node, name: str) -> str | None:
    """float8 Q/DQ: read as passforge's fp8 ops, which are e4m3fn, saturating and offset-free; otherwise the
    reason. The layout (per tensor, per axis, or blocks of whole rows) is checked on the traced shapes
    (:func:`_fp8_scale`)."""
    if name != FP8:
        return _unsupported_type(node.op, name)
    zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zero is not None and not (isinstance(zero, gs.Constant) and not zero.values.astype(np.float32).any()):
        return (f"a float8 zero point other than a constant 0 ('{zero.name}'): ONNX's float8 quantization has no "
                f"offset (the zero point must be 0) and passforge's fp8 ops none; {QDQ_SUPPORTED}")  # fmt: skip
    if node.op == "QuantizeLinear" and not node.attrs.get("saturate", 1):
        return "saturate=0 (out-of-range values become NaN) is not supported: passforge's quantize_fp8 saturates"
    return None


def _grouped_refusal(node: gs.Node, name: str | None, block: int, weight: WeightRead | None) -> str | None:
    """Blocked or 4-bit Q/DQ: read only as passforge's w4 weight — int4/uint4, blocks of ``block_size`` along
    the weight's input dim K (axis 0 of MatMul's (K, N), axis 1 of Gemm(transB=1)'s (N, K)), K a multiple of
    the block and even (two values per byte); otherwise the reason."""
    form = f"blocked quantization (block_size={block})" if block else f"{name} per tensor or per axis"
    if weight is None:
        return (f"{form} is read only on a constant weight that a single MatMul/Gemm reads (not on activations, "
                f"nor on a weight several nodes read); {QDQ_SUPPORTED}")
    if name not in GROUPED_TYPES:
        return f"{form} of {name} is not supported; {QDQ_SUPPORTED}"
    if not block:
        return f"{form} is not supported: 4-bit weights are read blocked along K; {QDQ_SUPPORTED}"
    k_axis, linear = weight.k_axis, weight.linear.name or weight.linear.outputs[0].name  # named as _record names it
    shape = tuple(weight.source.values.shape)
    axis = _axis(node.attrs.get("axis", 1), 2)
    if axis != k_axis:
        return (f"blocks run along axis {axis} of the {list(shape)} weight of '{linear}' ({weight.linear.op}), "
                f"its output dim; passforge's dequantize_per_channel_group groups input "
                f"channels, so blocks must run along axis {k_axis}; {QDQ_SUPPORTED}")  # fmt: skip
    k = shape[k_axis]
    if block < 2 or k % block or k % 2:
        return (f"block_size={block} on the {list(shape)} weight of '{linear}': passforge reads blocks "
                f"of at least 2 that divide K={k}, K even (two 4-bit values per byte); {QDQ_SUPPORTED}")  # fmt: skip
    groups = tuple(k // block if i == k_axis else size for i, size in enumerate(shape))
    qparams = [t for t in node.inputs[1:] if t.name]
    if any(tuple(t.values.shape) != groups for t in qparams):
        found = [list(t.values.shape) for t in qparams]
        return f"blocked scale/zero point of shapes {found} for a {list(shape)} weight: expected {list(groups)}"
    return None


def _qdq_range(node: OnnxNode, dtype: torch.dtype) -> tuple[int, int]:
    """``(quant_min, quant_max)`` of an integer type the node may use (checked again on the traced values: a
    type shape inference did not know is known now)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _integer_types(node.op):
        raise node.fail(_unsupported_type(node.op, name))
    info = torch.iinfo(dtype)
    return info.min, info.max


def _along_axis(value: Value, axis: int | None, rank: int) -> torch.Tensor:
    """A qparam shaped to broadcast against a rank-``rank`` input: per tensor 0-d, per axis its 1-D values
    along ``axis``."""
    tensor = as_tensor(value)
    return tensor.reshape(()) if axis is None else tensor.reshape([-1 if d == axis else 1 for d in range(rank)])


def _fp8_scale(node: OnnxNode, x: torch.Tensor, scale: Value) -> torch.Tensor:
    """A float8 Q/DQ's scale shaped to broadcast against ``x``, as passforge's fp8 ops take it: per tensor 0-d,
    per axis a 1-D scale reshaped along its axis ((N, 1) for axis 0 of a 2-D weight), blocked only along the
    last axis with ``block_size`` the whole row — one scale per token, (..., 1), what passforge's export writes
    for its per-token activation scales (and what :meth:`OnnxModule._dequantize_out_in` writes for a weight's
    per-output-channel scales)."""
    block = node.attr("block_size", 0)
    if not block:
        return _along_axis(scale, _qdq_axis(node, x, scale), x.dim())
    scale = as_tensor(scale)
    row = (*x.shape[:-1], 1)
    if _axis(node.attr("axis", 1), x.dim()) != x.dim() - 1 or block != x.shape[-1] or tuple(scale.shape) != row:
        raise node.fail(
            f"float8 blocks of {block} along axis {node.attr('axis', 1)} of an input of shape {list(x.shape)} with "
            f"a scale of shape {list(scale.shape)}: passforge reads float8 blocks only along the last axis with "
            f"block_size the whole row (one scale per row, shape {list(row)}); {QDQ_SUPPORTED}"
        )
    return scale


def _check_unblocked(node: OnnxNode) -> None:
    """Blocked Q/DQ passed planning as a linear's weight (:func:`qdq_refusal`) but its reader did not become a
    linear (a Gemm with transA or alpha != 1, or a bias it cannot fold): the weight would stay float math."""
    if node.attr("block_size", 0):
        raise node.fail(
            f"blocked quantization (block_size={node.attr('block_size')}) is read only on the weight of a MatMul/Gemm "
            f"that becomes a linear (not a Gemm with transA or alpha != 1, or a bias it cannot fold); {QDQ_SUPPORTED}"
        )


def _qdq_axis(node: OnnxNode, x: torch.Tensor, scale: Value) -> int | None:
    """None for per-tensor qparams (one scale: a scalar, or a 1-element 1-D tensor as ONNX Runtime also
    reads it), else the axis a 1-D scale runs along."""
    if isinstance(scale, ShapeValue) or scale.numel() == 1:
        return None
    axis = _axis(node.attr("axis", 1), x.dim())
    if scale.dim() != 1 or not 0 <= axis < x.dim() or scale.shape[0] != x.shape[axis]:
        raise node.fail(
            f"a scale of shape {list(scale.shape)} for an input of shape {list(x.shape)} along axis "
            f"{node.attr('axis', 1)} is neither per tensor nor per axis; {QDQ_SUPPORTED}"
        )
    return axis


def _tensor_qparams(scale: Value, zero_point: Value) -> tuple[object, object]:
    """Per-tensor qparams: Python scalars when constant (the ops' default overload, what passforge's quantize
    writes and lower-quant reads), else 0-d tensors (their ``.tensor`` overload)."""
    if isinstance(scale, ShapeValue) and (zero_point is None or isinstance(zero_point, ShapeValue)):
        return float(scale.values[0]), int(zero_point.values[0]) if zero_point is not None else 0
    zero = as_tensor(zero_point) if zero_point is not None else torch.zeros((), dtype=torch.int64)
    return as_tensor(scale).reshape(()), zero.reshape(())


@_op("QuantizeLinear")
def _quantize_linear(node: OnnxNode, x: Value, scale: Value, zero_point: Value = None) -> torch.Tensor:
    """``saturate(round(x / scale) + zero_point)``, rounding half to even, as ``quantize_per_tensor`` or
    ``quantize_per_channel``. torch multiplies by ``1 / scale`` where ONNX divides, so a value within an ulp
    of a rounding boundary can land one step apart from ONNX Runtime (the inverse of onnx_qdq's note).
    float8e4m3fn: ``passforge::quantize_fp8(x, s)``, ``clamp(x / s, ±448)`` rounded to nearest even — the same
    float32 division and saturating cast ONNX specifies, so exact (a zero point, checked 0, is dropped)."""
    x = as_tensor(x)
    declared = node.attr("output_dtype", 0)
    dtype = zero_point.dtype if zero_point is not None else torch_dtype(declared) if declared else torch.uint8
    if dtype == torch.float8_e4m3fn:
        return torch.ops.passforge.quantize_fp8(x, _fp8_scale(node, x, scale))
    _check_unblocked(node)
    quant_min, quant_max = _qdq_range(node, dtype)
    axis = _qdq_axis(node, x, scale)
    if axis is None:
        scale, zero_point = _tensor_qparams(scale, zero_point)
        per_tensor = qd.quantize_per_tensor.default if isinstance(scale, float) else qd.quantize_per_tensor.tensor
        return per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    zero_points = as_tensor(zero_point) if zero_point is not None else torch.zeros(scale.shape, dtype=torch.int64)
    return qd.quantize_per_channel(x, scale, zero_points, axis, quant_min, quant_max, dtype)


def _widened(zero_points: Value) -> torch.Tensor:
    """Per-channel zero points as int32: torch subtracts them in the integers' own type (int8 - int8 wraps)."""
    if isinstance(zero_points, ShapeValue):
        return replace(zero_points, dtype=torch.int32).tensor()
    return zero_points.to(torch.int32)


def _dequantize_wide(
    x: torch.Tensor, scale: Value, zero_point: Value, axis: int | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """int16 / uint16 / int32 as ONNX Runtime computes them: ``float32(q - z) * float32(s)``, then the output
    type. torch's Q/DQ ops convert q to the output type before subtracting, which rounds 16-bit values in
    float16 / bfloat16 and int32 values beyond 2^24 in float32, and cannot subtract an int32 zero point from
    uint16; lower-quant lowers none of these types, so plain ATen arithmetic loses nothing."""
    difference = x.to(torch.int64)
    if zero_point is not None:
        difference = difference - _along_axis(zero_point, axis, x.dim()).to(torch.int64)
    return (difference.to(torch.float32) * _along_axis(scale, axis, x.dim()).to(torch.float32)).to(out_dtype)


@_op("DequantizeLinear")
def _dequantize_linear(node: OnnxNode, x: Value, scale: Value, zero_point: Value = None) -> torch.Tensor:
    """``(x - zero_point) * scale`` in the scale's float type (or ``output_dtype``), as
    ``dequantize_per_tensor`` or ``dequantize_per_channel`` for int8 / uint8: exact, the same products ONNX
    Runtime computes (wider integers: :func:`_dequantize_wide`).
    A constant all-zero zero point arrives dropped (see ``_record``): symmetric weights then read as
    passforge's quantize writes them, ``dequantize_per_channel(q, s, None, 0, ...)``. float8e4m3fn:
    ``passforge::dequantize_fp8(q, s, dtype)``, ``q * s`` in float32 (exact), then cast to ``dtype``."""
    x = as_tensor(x)
    declared = node.attr("output_dtype", 0)
    out_dtype = torch_dtype(declared) if declared else scale.dtype
    if x.dtype == torch.float8_e4m3fn:
        return torch.ops.passforge.dequantize_fp8(x, _fp8_scale(node, x, scale), out_dtype)
    _check_unblocked(node)
    quant_min, quant_max = _qdq_range(node, x.dtype)
    axis = _qdq_axis(node, x, scale)
    if x.dtype not in (torch.int8, torch.uint8):
        return _dequantize_wide(x, scale, zero_point, axis, out_dtype)
    if axis is None:
        scale, zero_point = _tensor_qparams(scale, zero_point)
        per_tensor = qd.dequantize_per_tensor.default if isinstance(scale, float) else qd.dequantize_per_tensor.tensor
        return per_tensor(x, scale, zero_point, quant_min, quant_max, x.dtype, out_dtype=out_dtype)
    zero_points = None if zero_point is None else _widened(zero_point)
    return qd.dequantize_per_channel(x, scale, zero_points, axis, quant_min, quant_max, x.dtype, out_dtype=out_dtype)


GROUP_QUANTIZE, GROUP_DEQUANTIZE = "QuantizeGroups", "DequantizeGroups"
"""Blocked Q/DQ of a linear's 4-bit weight as the planner re-writes them (out, in), uint4 (see
:meth:`OnnxModule._group_out_in`)."""


@_op(GROUP_QUANTIZE, domain=INTERNAL_DOMAIN)
def _quantize_groups(
    node: OnnxNode, weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    """passforge's w4 quantize, ``quantize_per_channel_group(w, s, z, 0, 15, uint8, g)``, which ``fold-quant``
    stores packed. torch rounds ``w * (1 / s) + z`` where ONNX rounds ``w / s`` and then adds ``z``: a weight
    within an ulp of a rounding boundary, or exactly halfway with an odd zero point, lands one step apart
    (the inverse of onnx_qdq's note; ``fold-quant`` before exporting stores the integers instead)."""
    return qd.quantize_per_channel_group(weight, scales, zero_points, 0, 15, torch.uint8, node.attr("group_size"))


@_op(GROUP_DEQUANTIZE, domain=INTERNAL_DOMAIN)
def _dequantize_groups(
    node: OnnxNode, q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    """``dequantize_per_channel_group(q, s, z, 0, 15, uint8, g, dtype)`` — on ``unpack_int4`` of the stored
    bytes when ``packed``, as ``fold-quant`` writes it, so ``lower-quant`` reads it as its own. Exact: the same
    ``(q - z) * s`` ONNX Runtime computes."""
    q = torch.ops.passforge.unpack_int4(q) if node.attr("packed") else q
    group, dtype = node.attr("group_size"), node.attr("output_dtype")
    return qd.dequantize_per_channel_group(q, scales, zero_points, 0, 15, torch.uint8, group, dtype)


# ---------------------------------------------------------------------------------------------------------
# com.microsoft fused ops (ONNX Runtime's transformer optimizer) and opset 23's RotaryEmbedding


def _skip_sum(x: Value, skip: Value, bias: Value) -> torch.Tensor:
    total = as_tensor(x) + as_tensor(skip)
    return total + as_tensor(bias) if bias is not None else total


@_op("SkipLayerNormalization", domain=MS_DOMAIN)
def _skip_layer_norm(
    node: OnnxNode, x: Value, skip: Value, gamma: Value, beta: Value = None, bias: Value = None
) -> tuple[Value, ...]:
    """``LayerNorm(x + skip + bias) · gamma + beta``; outputs (y, mean, inv_std, x + skip + bias)."""
    total = _skip_sum(x, skip, bias)
    beta = None if beta is None else as_tensor(beta)
    y, *stats = _layer_norm(node, total, as_tensor(gamma), beta, node.attr("epsilon", 1e-12), -1)
    mean, inv_std = stats or (None, None)
    return y, mean, inv_std, total


@_op("SkipSimplifiedLayerNormalization", domain=MS_DOMAIN)
def _skip_simplified_layer_norm(
    node: OnnxNode, x: Value, skip: Value, gamma: Value, bias: Value = None
) -> tuple[Value, ...]:
    """``RMSNorm(x + skip + bias) · gamma``; outputs (y, mean (unused), inv_std, x + skip + bias)."""
    total = _skip_sum(x, skip, bias)
    y, inv_std = _rms_norm(node, total, as_tensor(gamma), node.attr("epsilon", 1e-12), -1)
    return y, None, inv_std, total


@_op("FastGelu", domain=MS_DOMAIN)
def _fast_gelu(node: OnnxNode, x: Value, bias: Value = None) -> torch.Tensor:
    x = as_tensor(x) if bias is None else as_tensor(x) + as_tensor(bias)
    return F.gelu(x, approximate="tanh")


@_op("BiasGelu", domain=MS_DOMAIN)
def _bias_gelu(node: OnnxNode, x: Value, bias: Value) -> torch.Tensor:
    return F.gelu(as_tensor(x) + as_tensor(bias))


@_op("Gelu", domain=MS_DOMAIN)
def _ms_gelu(node: OnnxNode, x: Value) -> torch.Tensor:
    return F.gelu(as_tensor(x))


@_op("QuickGelu", domain=MS_DOMAIN)
def _quick_gelu(node: OnnxNode, x: Value) -> torch.Tensor:
    x = as_tensor(x)
    return x * torch.sigmoid(x * node.attr("alpha", 1.702))


def _rotary(
    node: OnnxNode, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None
) -> torch.Tensor:
    """Rotate the first ``rotary_embedding_dim`` features of each head by the cached angles.

    ``x``: (B, S, N·H) with ``num_heads``, or (B, N, S, H); ``cos``/``sin``: (max_pos, R/2), indexed by
    ``positions`` (B, S), or already (B, S, R/2). Halves (``interleaved=0``) or even/odd pairs.
    """
    four_d = x.dim() == 4
    if four_d:
        heads = x.transpose(1, 2)  # (B, S, N, H)
    else:
        n_heads = node.attr("num_heads", 0)
        if not n_heads:
            raise node.fail("a 3-D input needs the num_heads attribute")
        heads = x.reshape(x.shape[0], x.shape[1], n_heads, -1)
    head_size = heads.shape[-1]
    rot = node.attr("rotary_embedding_dim", 0) or head_size
    if positions is not None:
        cos, sin = F.embedding(positions, cos), F.embedding(positions, sin)  # (B, S, R/2)
    cos, sin = cos[..., : rot // 2].unsqueeze(2), sin[..., : rot // 2].unsqueeze(2)  # (B, S, 1, R/2)
    turn, keep = heads[..., :rot], heads[..., rot:]
    if node.attr("interleaved", 0):
        x1, x2 = turn[..., 0::2], turn[..., 1::2]
        real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        turned = torch.stack((real, imag), dim=-1).flatten(-2)
    else:
        x1, x2 = turn[..., : rot // 2], turn[..., rot // 2 :]
        turned = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    out = torch.cat((turned, keep), dim=-1) if rot < head_size else turned
    return out.transpose(1, 2) if four_d else out.reshape(x.shape)


@_op("RotaryEmbedding")
def _rotary_embedding(node: OnnxNode, x: Value, cos: Value, sin: Value, positions: Value = None) -> torch.Tensor:
    """Opset 23: inputs (X, cos_cache, sin_cache, position_ids?)."""
    return _rotary(
        node, as_tensor(x), as_tensor(cos), as_tensor(sin), None if positions is None else as_tensor(positions)
    )


@_op("RotaryEmbedding", domain=MS_DOMAIN)
def _ms_rotary_embedding(node: OnnxNode, x: Value, positions: Value, cos: Value, sin: Value) -> torch.Tensor:
    """ONNX Runtime's: inputs (input, position_ids, cos_cache, sin_cache); position_ids of one element is the
    first position of every sequence."""
    x = as_tensor(x)
    positions = as_tensor(positions)
    if positions.numel() == 1 and positions.dim() <= 1:
        seq = x.shape[2] if x.dim() == 4 else x.shape[1]
        positions = (torch.arange(seq) + positions.reshape(())).expand(x.shape[0], seq)
    if node.attr("is_packed_batching", 0):
        raise node.fail("is_packed_batching=1 is not supported")
    return _rotary(node, x, as_tensor(cos), as_tensor(sin), positions)


# ---------------------------------------------------------------------------------------------------------
# The module


_ATTR_NAME = re.compile(r"[^0-9A-Za-z_]")
EXPORTER_TEMPORARY = re.compile(r"val_\d+")
"""torch.onnx names the values it creates ``val_N`` without avoiding parameters named so, and its optimizer
then fails on re-export ("Initializer 'val_N' is already registered"); imported constants with such names
(torch.onnx's own folded weights) are stored as ``onnx_val_N``."""


def module_scopes(proto: onnx.ModelProto) -> dict[str, str]:
    """``{node name: module path}`` from the ``pkg.torch.onnx.name_scopes`` torch.onnx writes on each node
    (``['', 'lm_head', 'linear_28']`` → ``lm_head``): a linear's folded weight is then stored as
    ``lm_head.weight`` instead of the exporter's temporary ``val_632``, so name selections such as
    ``quantize(skip=lm_head*)`` work on imported graphs as on captured ones. Other exporters: empty."""
    scopes: dict[str, str] = {}
    for node in proto.graph.node:
        for entry in node.metadata_props:
            if entry.key != "pkg.torch.onnx.name_scopes":
                continue
            with contextlib.suppress(ValueError, SyntaxError):
                path = ast.literal_eval(entry.value)
                if isinstance(path, list) and len(path) >= 2 and isinstance(path[-2], str) and path[-2]:
                    scopes[node.name] = path[-2]
    return scopes


class OnnxModule(nn.Module):
    """An ONNX graph as an ``nn.Module``: constants registered as parameters/buffers, ``forward`` interprets
    the nodes (see the module docstring). Built from a cleaned, topologically sorted onnx-graphsurgeon graph
    whose ops are all in :data:`OPS` (``onnx_import`` checks that first)."""

    def __init__(self, graph: gs.Graph, scopes: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._scopes = dict(scopes or {})  # node name → the exporting module's path (see module_scopes)
        self._input_names = [t.name for t in graph.inputs]
        self._output_names = [t.name for t in graph.outputs]
        self.forward = _named_forward(self, self._input_names)
        self._shape_values: dict[str, ShapeValue] = {}
        self._tensors: dict[str, str] = {}  # name in forward's environment → qualified attribute name
        self._taken: set[str] = set()
        consumers = _consumers(graph)
        skipped: set[int] = set()
        plan: list[OnnxNode] = []
        reads = weight_reads(graph, consumers)
        read_by_step = {id(step): read for read in reads.values() for step in read.chain}
        for node in graph.nodes:
            if (refusal := qdq_refusal(node, read_by_step.get(id(node)))) is not None:  # before constants are read
                raise _record(node).fail(refusal)
            if id(node) not in skipped:
                plan.append(self._as_linear(node, consumers, graph, skipped, plan, reads) or _record(node))
        used = {name for node in plan for name in node.inputs if name} | set(self._output_names)
        self._plan = [replace(node, wanted=tuple(name in used for name in node.outputs)) for node in plan]
        quantized = _quantized_data(self._plan)
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in used and tensor.name not in self._tensors:
                value = to_torch(tensor.values)
                if tensor.name in quantized and value.numel() > 1:
                    self._tensors[tensor.name] = self._register(tensor.name, value)
                else:
                    self._add_constant(tensor.name, value)

    def _add_constant(self, name: str, value: torch.Tensor) -> None:
        if _small(value):
            self._shape_values[name] = ShapeValue.of(value)
        else:
            self._tensors[name] = self._register(name, value)

    def _register(self, name: str, value: torch.Tensor) -> str:
        """Store ``value`` as a parameter (floating) or buffer under ``name`` made a valid attribute path:
        ``layers.0.attention.wq.weight`` stays as it is, ``onnx::MatMul_12`` becomes ``onnx__MatMul_12``."""
        parts = [_ATTR_NAME.sub("_", part) or "_" for part in name.split(".")]
        parts = [f"c_{p}" if p.startswith("_") or hasattr(nn.Module, p) else p for p in parts]
        parts = [f"onnx_{p}" if EXPORTER_TEMPORARY.fullmatch(p) else p for p in parts]
        qualname = ".".join(parts)
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts))}
        clash = qualname in self._taken or any(t.startswith(qualname + ".") for t in self._taken)
        if clash or prefixes & self._taken:
            qualname = "_".join(parts)
            while qualname in self._taken or any(t.startswith(qualname + ".") for t in self._taken):
                qualname += "_"
        self._taken.add(qualname)
        set_tensor_attr(self, qualname, value.detach())
        return qualname

    def _as_linear(
        self,
        node: gs.Node,
        consumers: dict[str, list[gs.Node]],
        graph: gs.Graph,
        skipped: set[int],
        plan: list[OnnxNode],
        reads: Mapping[int, WeightRead],
    ) -> OnnxNode | None:
        """MatMul/Gemm by a constant 2-D weight, or a dequantized one (``reads``: :func:`weight_reads`), as
        ``F.linear`` with the weight stored (out, in), and a following bias Add folded in (see the module
        docstring); None when the node is not one. A ``Transpose`` feeding only this node is dropped from
        ``plan``, a dequantized weight's Q/DQ records are re-planned, an Add folded in goes to ``skipped``."""
        if node.op not in ("MatMul", "Gemm") or normalize_domain(node.domain) or len(node.inputs) < 2:
            return None
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0):
            return None
        b = node.inputs[1]
        stored_out_in = node.op == "Gemm" and bool(node.attrs.get("transB", 0))  # (N, K) already
        source, transpose = b, None
        producer = b.inputs[0] if isinstance(b, gs.Variable) and len(b.inputs) == 1 else None
        if transposes_constant(producer) and len(consumers.get(b.name, [])) == 1 and b not in graph.outputs:
            source, transpose, stored_out_in = producer.inputs[0], producer, not stored_out_in
        chain = reads[id(node)].chain if transpose is None and id(node) in reads else []
        source = chain[0].inputs[0] if chain else source
        if not isinstance(source, gs.Constant) or source.values.ndim != 2:
            return None
        weight = to_torch(source.values)
        dtype = _dequantized_dtype(chain[-1]) if chain else weight.dtype  # what the linear computes in
        if not dtype.is_floating_point:
            return None
        out_features = weight.shape[0] if stored_out_in else weight.shape[1]
        bias, output = None, node.outputs[0]
        if node.op == "Gemm":
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if bias is not None and not _is_bias(bias, out_features, node.attrs.get("beta", 1.0), dtype):
                return None
        else:
            users = consumers.get(output.name, [])
            add = users[0] if len(users) == 1 and output not in graph.outputs else None
            if add is not None and add.op == "Add" and not normalize_domain(add.domain):
                other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
                if _is_bias(other, out_features, 1.0, dtype):
                    bias, output = other, add.outputs[0]
                    skipped.add(id(add))
        if transpose is not None:
            plan[:] = [n for n in plan if n.outputs != (b.name,)]
        stored_name = source.name
        if EXPORTER_TEMPORARY.fullmatch(stored_name) and node.name in self._scopes:
            stored_name = f"{self._scopes[node.name]}.weight"  # lm_head.weight, not the exporter's val_632
        if chain:
            weight_key = self._dequantize_out_in(chain, weight, stored_out_in, stored_name, plan)
        else:
            weight_key = self._add_out_in(source.name, weight, stored_out_in, stored_name)
        bias_key = ""
        if bias is not None:
            flat = to_torch(bias.values)
            bias_key = self._add_tensor(
                bias.name if flat.dim() == 1 else f"{bias.name}::flat", flat.reshape(-1), name=bias.name
            )
        return OnnxNode(node.name or output.name, LINEAR, INTERNAL_DOMAIN, (node.inputs[0].name, weight_key, bias_key),
                        (output.name,), {}, (True,))  # fmt: skip

    def _dequantize_out_in(
        self, chain: list[gs.Node], weight: torch.Tensor, stored_out_in: bool, stored_name: str, plan: list[OnnxNode]
    ) -> str:
        """Re-plan a dequantized weight's ``[Q →] DQ`` records so that they produce the weight (out, in): a
        (K, N) constant is stored transposed and the per-axis ``axis`` flipped (per tensor: unchanged), the
        layout ``transpose_weights_into_dq`` undid on export::

            DQ(W_q[K, N], s[N], axis=1) → MatMul    →   dequantize_per_channel(W_q_t[N, K], s, None, 0, ...) → linear

        float8e4m3fn per output channel: the scale is stored (N, 1) as passforge's ``quantize(scheme=fp8)`` writes
        it — and as ``lower-quant`` reads it — and read as the equivalent whole-row blocks (axis 1, block_size K)::

            DQ(W_q[K, N]:e4m3, s[N], axis=1) → MatMul    →   dequantize_fp8(W_q_t[N, K], s_rows[N, 1], dtype) → linear

        Returns the name the linear reads the dequantized weight under. Blocked: :meth:`_group_out_in`."""
        if chain[-1].attrs.get("block_size", 0):
            return self._group_out_in(chain, weight, stored_out_in, stored_name, plan)
        source = chain[0].inputs[0]
        key = self._add_out_in(source.name, weight, stored_out_in, stored_name)
        fp8 = _quantized_type_name(chain[0]) == FP8
        replanned = {}
        for step in chain:
            record = _record(step)
            inputs = tuple(key if name == source.name else name for name in record.inputs)
            attrs = dict(record.attrs)
            if not stored_out_in:
                attrs["axis"] = 1 - _axis(attrs.get("axis", 1), 2)
            scale = step.inputs[1]
            if fp8 and attrs.get("axis", 1) == 0 and scale.values.size > 1:
                rows = self._add_tensor(f"{scale.name}::rows", to_torch(scale.values).reshape(-1, 1),
                                        name=f"{stored_name}_scale")  # fmt: skip
                inputs = (inputs[0], rows, *inputs[2:])
                attrs.update(axis=1, block_size=weight.shape[1 if stored_out_in else 0])  # K
            replanned[record.outputs] = replace(record, inputs=inputs, attrs=attrs)
        plan[:] = [replanned.get(n.outputs, n) for n in plan]
        return chain[-1].outputs[0].name

    def _group_out_in(
        self, chain: list[gs.Node], weight: torch.Tensor, stored_out_in: bool, stored_name: str, plan: list[OnnxNode]
    ) -> str:
        """Re-plan a blocked 4-bit weight's ``[Q →] DQ`` (checked by :func:`qdq_refusal`) as passforge's w4: the
        weight, scales and zero points stored (out, in) — groups along the input dim — a constant 4-bit weight
        packed two per byte as ``fold-quant`` stores it, a float one quantized as ``quantize`` does::

            DQ(W_q[K, N]:uint4, s[K/g, N], z[K/g, N], axis=0, block_size=g) → MatMul    →
                linear(x, dequantize_per_channel_group(unpack_int4(W_p[N, K/2]), s_t[N, K/g], z_t, 0, 15, u8, g))
            Q(W[K, N], s, z, axis=0, block_size=g) → DQ → MatMul    →
                quantize_per_channel_group(W_t[N, K], s_t, z_t, 0, 15, u8, g) → dequantize_per_channel_group → linear

        int4 (-8..7) becomes uint4 (0..15): values and zero points + 8 (an absent zero point: 0 + 8), so
        ``q - z`` and every dequantized value are unchanged and the quantize saturates to the same -8..7.
        Zero points are stored as int32 even when absent (``quantize`` writes them so; ``lower-quant`` reads
        them). Returns the name the linear reads the dequantized weight under."""
        source = chain[0].inputs[0]
        shift = INT4_SHIFT if _quantized_type_name(chain[-1]) == "int4" else 0

        def out_in(value: torch.Tensor) -> torch.Tensor:
            return value if stored_out_in else value.t().contiguous()

        stored = chain[0].op == "DequantizeLinear"  # integers in the file, not a float weight quantized here
        if stored:
            nibbles = out_in((weight.to(torch.int16) + shift).to(torch.uint8))
            key = self._add_tensor(f"{source.name}::int4", pack_int4(nibbles), name=stored_name)
        else:
            key = self._add_out_in(source.name, weight, stored_out_in, stored_name)
        replanned = {}
        for step in chain:
            scale, zero = step.inputs[1], step.inputs[2] if len(step.inputs) > 2 and step.inputs[2].name else None
            scales = out_in(to_torch(scale.values))
            scale_key = self._add_tensor(f"{scale.name}::groups", scales, name=f"{stored_name}_scale")
            zeros = torch.zeros(scales.shape, dtype=torch.int32) if zero is None else out_in(to_torch(zero.values))
            zero_key = self._add_tensor(f"{zero.name if zero else key}::zero_points", zeros.to(torch.int32) + shift,
                                        name=f"{stored_name}_zero_point")  # fmt: skip
            record = _record(step)
            group = {"group_size": step.attrs["block_size"]}
            if step.op == "QuantizeLinear":
                replanned[record.outputs] = replace(record, op=GROUP_QUANTIZE, domain=INTERNAL_DOMAIN,
                                                    inputs=(key, scale_key, zero_key), attrs=group)  # fmt: skip
            else:
                q = key if stored else record.inputs[0]
                attrs = {**group, "packed": stored, "output_dtype": _dequantized_dtype(step)}
                replanned[record.outputs] = replace(record, op=GROUP_DEQUANTIZE, domain=INTERNAL_DOMAIN,
                                                    inputs=(q, scale_key, zero_key), attrs=attrs)  # fmt: skip
        plan[:] = [replanned.get(n.outputs, n) for n in plan]
        return chain[-1].outputs[0].name

    def _add_out_in(self, key: str, weight: torch.Tensor, stored_out_in: bool, name: str) -> str:
        """Register a linear's 2-D weight (out, in): as it is when the file stores it so, else transposed under
        ``key::T``; returns the key forward reads it under."""
        if stored_out_in:
            return self._add_tensor(key, weight, name=name)
        return self._add_tensor(f"{key}::T", weight.t().contiguous(), name=name)

    def _add_tensor(self, key: str, value: torch.Tensor, *, name: str | None = None) -> str:
        """Register ``value`` once under ``key`` (in forward's environment), stored as ``name`` (default:
        ``key``); returns ``key``."""
        if key not in self._tensors:
            self._tensors[key] = self._register(name or key, value)
        return key

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph; the instance's ``forward`` has the ONNX input names as its parameters (see
        ``_named_forward``), so the captured placeholders carry them."""
        env: dict[str, Value] = dict(self._shape_values)
        for name, qualname in self._tensors.items():
            owner: nn.Module = self
            for part in qualname.split("."):
                owner = getattr(owner, part)
            env[name] = owner
        env.update(zip(self._input_names, inputs))
        for node in self._plan:
            args = [env[name] if name else None for name in node.inputs]
            while args and args[-1] is None:
                args.pop()
            try:
                out = OPS[(node.domain, node.op)](node, *args)
            except OnnxImportError:
                raise
            except Exception as exc:  # named by the ONNX node, not by a line of this interpreter
                raise node.fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        results = tuple(as_tensor(env[name]) for name in self._output_names)
        return results[0] if len(results) == 1 else results


def _is_bias(tensor: gs.Tensor, out_features: int, beta: float, dtype: torch.dtype) -> bool:
    """A constant that ``F.linear`` can take as its bias: (N,) or (1, N) of the weight's dtype, ``beta == 1``."""
    if not isinstance(tensor, gs.Constant) or beta != 1.0:
        return False
    shape = tuple(tensor.values.shape)
    return shape in ((out_features,), (1, out_features)) and to_torch(tensor.values).dtype == dtype


def _named_forward(module: OnnxModule, names: Sequence[str]) -> Callable[..., object]:
    """``module.forward`` with one parameter per graph input, named after it (``input_ids``, ``input_1`` for
    ``input.1``): torch.export names placeholders after forward's parameters."""
    params, taken = [], set()
    for name in names:
        ident = _ATTR_NAME.sub("_", name)
        ident = ident if ident[:1].isalpha() else f"input_{ident}"
        while ident in taken or keyword.iskeyword(ident):
            ident += "_"
        taken.add(ident)
        params.append(inspect.Parameter(ident, inspect.Parameter.POSITIONAL_OR_KEYWORD))

    def forward(*inputs: torch.Tensor) -> object:
        return OnnxModule.forward(module, *inputs)

    forward.__signature__ = inspect.Signature(params)
    return forward


def transposes_constant(node: gs.Node | None) -> bool:
    """``Transpose(perm=[1, 0])`` of a 2-D constant: how exporters spell a linear's weight (N, K) → (K, N)."""
    if node is None or node.op != "Transpose" or not isinstance(node.inputs[0], gs.Constant):
        return False
    return node.inputs[0].values.ndim == 2 and list(node.attrs.get("perm", [1, 0])) == [1, 0]


def dequantized_weight(value: gs.Tensor, consumers: Mapping[str, list[gs.Node]], graph: gs.Graph) -> list[gs.Node]:
    """``[Q, DQ]`` or ``[DQ]`` when ``value`` is a 2-D constant weight dequantized — after a quantize, for a
    float constant — with constant per-tensor, per-axis or (blocked) 2-D qparams, each step read only by the
    next: how ONNX Runtime's quantizer and passforge's exporter write a quantized linear's weight
    (``DQ(W_q[K, N], s[N], z[N], axis=1) → MatMul``). Otherwise ``[]``. (Earlier in the sorted graph, the
    chain's nodes have already passed :func:`qdq_refusal`.)"""
    chain: list[gs.Node] = []
    for op in ("DequantizeLinear", "QuantizeLinear"):
        producer = value.inputs[0] if isinstance(value, gs.Variable) and len(value.inputs) == 1 else None
        if producer is None or producer.op != op or normalize_domain(producer.domain):
            return []
        if len(consumers.get(value.name, [])) != 1 or value in graph.outputs:
            return []
        qparams = [t for t in producer.inputs[1:] if t.name]
        blocked = producer.attrs.get("block_size", 0)
        if blocked and _quantized_type_name(producer) in FLOAT8_TYPES:
            return []  # float8 blocks are per-row scales read as they stand (see _fp8_scale), not a w4 weight
        rank = 2 if blocked else 1
        if not all(isinstance(t, gs.Constant) and t.values.ndim <= rank for t in qparams):
            return []
        chain.insert(0, producer)
        value = producer.inputs[0]
        if isinstance(value, gs.Constant):
            return chain if value.values.ndim == 2 else []
    return []


class WeightRead(NamedTuple):
    """A MatMul/Gemm reading a dequantized constant weight: its ``[Q →] DQ`` chain, the constant, and the axis
    of its input dim K."""

    linear: gs.Node
    chain: list[gs.Node]
    source: gs.Constant
    k_axis: int


def weight_reads(graph: gs.Graph, consumers: Mapping[str, list[gs.Node]]) -> dict[int, WeightRead]:
    """``{id(MatMul or Gemm): WeightRead}`` for every one that reads a :func:`dequantized_weight` as its weight,
    found once for the planner: the chains ``_as_linear`` stores (out, in), and the steps where
    :func:`qdq_refusal` accepts blocked 4-bit forms."""
    reads: dict[int, WeightRead] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or normalize_domain(node.domain) or len(node.inputs) < 2:
            continue
        chain = dequantized_weight(node.inputs[1], consumers, graph)
        if chain:
            k_axis = int(node.op == "Gemm" and bool(node.attrs.get("transB", 0)))
            reads[id(node)] = WeightRead(node, chain, chain[0].inputs[0], k_axis)
    return reads


def _dequantized_dtype(dequantize: gs.Node) -> torch.dtype:
    """DequantizeLinear's output type: ``output_dtype``, else its scale's."""
    declared = dequantize.attrs.get("output_dtype", 0)
    return torch_dtype(declared) if declared else to_torch(dequantize.inputs[1].values).dtype


def _quantized_data(plan: Sequence[OnnxNode]) -> set[str]:
    """Names Q/DQ read as data — DequantizeLinear's integers and zero points — stored as buffers even when
    small, if they hold more than one value (one is a per-tensor zero point, wanted as a Python int): held in
    Python (see :class:`ShapeValue`) they would become tensors made in ``forward``, constants torch.export
    lifts, instead of weights."""
    return {name for node in plan if node.op in QDQ_OPS and not node.domain for name in node.inputs[::2] if name}


def _zero_constant(tensors: Sequence[gs.Tensor]) -> bool:
    return len(tensors) == 1 and isinstance(tensors[0], gs.Constant) and not tensors[0].values.any()


def _consumers(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    users: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.name:
                users.setdefault(tensor.name, []).append(node)
    return users


def _record(node: gs.Node) -> OnnxNode:
    outputs = tuple(t.name for t in node.outputs)
    name = node.name or (outputs[0] if outputs else node.op)
    inputs = tuple(t.name for t in node.inputs)
    if node.op == "DequantizeLinear" and not normalize_domain(node.domain) and _zero_constant(node.inputs[2:3]):
        inputs = inputs[:2]  # x - 0 is x: symmetric weights read as passforge's quantize writes them (no zero point)
    return OnnxNode(name, node.op, normalize_domain(node.domain), inputs, outputs, dict(node.attrs))
