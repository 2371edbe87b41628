"""Small helpers over the IR: an ATen-level ``torch.fx.GraphModule`` whose parameters are ``get_attr`` nodes.

Every pass, the verifier and the profiler read graphs through these helpers, so "how many nodes", "which
parameters", "what does this node compute" have one answer in the code base.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import int_oo

PASS_META = "passforge.pass"
COMPUTE_OPS = ("call_function", "call_method", "call_module")
"""Node kinds that compute something (the rest are placeholders, get_attr and output)."""
"""``node.meta`` key naming the pass that created a node (``"capture"`` for captured nodes)."""


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes: ``aten.linear.default``, ``placeholder``, ..."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def op_counts(gm: fx.GraphModule, *, compute_only: bool = True) -> Counter[str]:
    """Count nodes by :func:`op_name`; ``compute_only`` leaves out placeholders, get_attr and output."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if compute_only and node.op not in COMPUTE_OPS:
            continue
        counts[op_name(node)] += 1
    return counts


def count_calls(gm: fx.GraphModule, target: object) -> int:
    """Number of ``call_function`` nodes calling ``target`` (an OpOverload or OpOverloadPacket)."""
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and matches_target(node, target))


def matches_target(node: fx.Node, target: object) -> bool:
    """True when ``node`` calls ``target``; an ``OpOverloadPacket`` matches any of its overloads."""
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverloadPacket):
        return getattr(node.target, "overloadpacket", None) is target
    return node.target is target


def num_compute_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.op in COMPUTE_OPS)


def tensor_attrs(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer the graph reads through ``get_attr`` (each once)."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                yield node.target, value


def param_stats(gm: fx.GraphModule) -> tuple[int, int]:
    """``(elements, bytes)`` over the tensors the graph reads; storage shared by two names counts once."""
    elements = 0
    nbytes = 0
    storages: set[int] = set()
    for _, tensor in tensor_attrs(gm):
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        elements += tensor.numel()
        if key not in storages:
            storages.add(key)
            nbytes += tensor.numel() * tensor.element_size()
    return elements, nbytes


def get_attr(gm: torch.nn.Module, qualname: str) -> object:
    obj: object = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor_attr(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Store ``value`` at ``qualname``, creating submodules as needed. A name that held a buffer stays a
    buffer; anything else becomes a (frozen) parameter when floating, a buffer otherwise."""
    *path, leaf = qualname.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    was_buffer = leaf in owner._buffers
    if hasattr(owner, leaf):
        delattr(owner, leaf)
    if value.is_floating_point() and not was_buffer:
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(leaf, value)


def add_buffer(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> fx.Node:
    """Store ``value`` as a new top-level buffer named after ``stem`` and return a ``get_attr`` node for it,
    created at the graph's current insertion point. The stored tensor is contiguous and owns its memory (a
    view would keep its whole base alive in the saved model)."""
    stored = value.detach()
    if stored._base is not None or not stored.is_contiguous():
        stored = stored.clone(memory_format=torch.contiguous_format)
    name = _fresh_attr_name(gm, stem)
    gm.register_buffer(name, stored)
    return gm.graph.get_attr(name)


def narrowed_slot(select: fx.Node) -> fx.Node | None:
    """The ``slice(select, 1, 0, w)`` (step 1) through which alone a layer reads the first heads of its KV cache
    slot ``select`` (B, heads, S, hs), as ``prune-channels(target=heads)`` writes it for a layer that keeps
    fewer heads than the cache holds; None for any other read."""
    users = list(select.users)
    narrow = users[0] if len(users) == 1 else None
    if narrow is None or narrow.target is not torch.ops.aten.slice.Tensor or narrow.args[:3] != (select, 1, 0):
        return None
    return narrow if isinstance(narrow.args[3], int) and (len(narrow.args) < 5 or narrow.args[4] == 1) else None


def high_pad(rank: int, dim: int, extra: int) -> list[int]:
    """``constant_pad_nd`` amounts adding ``extra`` elements at the high end of ``dim`` of a rank-``rank``
    tensor and nothing elsewhere: how a narrower layer's KV cache slot is padded back to the cache's width."""
    return [0, 0] * (rank - 1 - dim) + [0, extra]


def high_padding(pad: fx.Node, rank: int, dim: int) -> int | None:
    """How many zeros ``pad`` adds at the high end of ``dim`` of a rank-``rank`` tensor when that is all a
    ``constant_pad_nd`` node does (the amounts :func:`high_pad` writes); None for any other node or padding."""
    if pad.target is not torch.ops.aten.constant_pad_nd.default or (len(pad.args) > 2 and pad.args[2] != 0):
        return None
    amounts = list(pad.args[1])
    return amounts[-1] if amounts and amounts == high_pad(rank, dim, amounts[-1]) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, symbolic dims compared by expression (never adds a guard to a ShapeEnv)."""
    return [str(d) for d in a.shape] == [str(d) for d in b.shape]


def _fresh_attr_name(gm: fx.GraphModule, stem: str) -> str:
    """A top-level attribute name starting with ``stem`` that ``gm`` does not use yet."""
    stem = stem.replace(".", "_")
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    return name


def drop_unused_attrs(gm: fx.GraphModule) -> int:
    """Delete ``get_attr`` nodes nobody uses and the tensors only they referenced; returns how many went."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)
    return removed


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph, its metadata and module tree that *shares* every tensor with ``gm``.

    Cheap enough to snapshot before every pass (no weight is copied); safe because passes never write into
    a tensor, they store new ones (ir/INVARIANTS.md).
    """
    memo: dict[int, object] = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own TreeSpec deprecation noise
        return copy.deepcopy(gm, memo)


def to_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """``gm`` with every tensor it reads on ``device``: ``gm`` itself when nothing moves, else a copy holding
    new tensors (``Module.to`` would move shared parameters in place, under the user's model too). Tied
    weights stay tied; export's lifted constants (plain attributes) move too."""
    reads = list(tensor_attrs(gm))
    if all(t.device == device for _, t in reads):
        return gm
    moved = copy_graph_module(gm)
    copies: dict[int, torch.Tensor] = {}
    for name, tensor in reads:
        new = copies.setdefault(id(tensor), tensor.to(device))
        *path, leaf = name.split(".")
        owner = moved.get_submodule(".".join(path)) if path else moved
        if leaf in owner._parameters or leaf in owner._buffers:
            set_tensor_attr(moved, name, new)
        else:
            setattr(owner, leaf, new)
    for node in moved.graph.nodes:  # what the nodes claim follows, else verification sees two devices
        if "val" in node.meta:
            node.meta["val"] = pytree.tree_map_only(FakeTensor, lambda val: _fake_on(val, device), node.meta["val"])
    return moved


def _fake_on(val: FakeTensor, device: torch.device) -> FakeTensor:
    """``val`` as its fake mode would make it on ``device`` (same symbolic shape; no memory anywhere)."""
    if val.device == device:
        return val
    with val.fake_mode:
        return val.to(device)


def dynamic_shapes_of(gm: fx.GraphModule) -> tuple[dict[int, object] | None, ...] | None:
    """The ``dynamic_shapes`` argument that re-exports ``gm`` with the same dynamic input dims (None if static).

    Each symbolic placeholder dim becomes a ``torch.export.Dim`` with the range the ShapeEnv recorded, so a
    saved graph accepts the same lengths as the captured one.
    """
    shape_env = fake_mode_of(gm).shape_env
    specs: list[dict[int, object] | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        dims: dict[int, object] = {}
        for i, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and shape_env is not None:
                expr = size.node.expr
                bounds = shape_env.var_to_range.get(expr)
                lower = max(int(bounds.lower), 2) if bounds is not None else 2
                bounded = bounds is not None and bounds.upper.is_finite and bounds.upper != int_oo  # int_oo: finite!
                upper = int(bounds.upper) if bounded else None
                dims[i] = torch.export.Dim(f"{node.name}_{i}", min=lower, max=upper)
        specs.append(dims or None)
    return tuple(specs) if any(specs) else None


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The fake mode (with its ShapeEnv, so dynamic dims stay symbolic) the graph was captured under."""
    vals = [node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"]
    mode = detect_fake_mode(vals)
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def propagate_meta(gm: fx.GraphModule) -> dict[fx.Node, object]:
    """Recompute what every node produces (shape, dtype, device) with fake tensors.

    Placeholders keep their captured ``meta["val"]`` so symbolic dimensions survive; returns ``{node: val}``
    without touching ``node.meta`` (the verifier compares it with what the nodes claim).
    """
    mode = fake_mode_of(gm)
    inputs = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
    evaluator = _FakeEvaluator(gm, mode)
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore", UserWarning)
        evaluator.run(*inputs, enable_io_processing=False)
    return evaluator.values


class _FakeEvaluator(fx.Interpreter):
    """Runs the graph on fake tensors and records every node's value (without writing ``node.meta``)."""

    def __init__(self, module: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(module)
        self.mode = mode
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        if n.op == "get_attr":
            real = get_attr(self.module, n.target)
            result = self.mode.from_tensor(real, static_shapes=True) if isinstance(real, torch.Tensor) else real
        else:
            result = super().run_node(n)
        if n.op != "output":
            self.values[n] = result
        return result


def describe_val(val: object) -> str:
    """``f32[2, s0, 64]`` for a tensor value, ``repr`` otherwise; used in error messages and dumps."""
    if isinstance(val, torch.Tensor):
        return f"{dtype_short(val.dtype)}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe_val(v) for v in val) + ")"
    return repr(val)


_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8",
}


def dtype_short(dtype: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).removeprefix("torch."))


def example_inputs_of(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Zero tensors shaped like the graph's inputs (dynamic dims at their example size)."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            shape = [d if isinstance(d, int) else int(d.node.hint) for d in val.shape]
            inputs.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(inputs)
