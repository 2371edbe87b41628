"""The ONNX door: an ``.onnx`` file becomes the passforge IR, the same GraphModule ``capture`` produces.

    gm = import_onnx("model.onnx")                        # symbolic dims of the file stay dynamic
    gm = import_onnx(proto, (tokens,), dynamic=False)     # a ModelProto, your inputs, static shapes

Four steps, each for a reason:

1. **Read.** Weights in external data files are loaded only after every ``location`` has been checked to be a
   relative path that resolves inside the model's folder (a model file must not read ``../../etc/passwd`` or
   ``/home/you/.ssh/id_rsa`` into a weight), within the file's size. The user's file is never written.
2. **Check.** Every op must be one :data:`passforge.ir.onnx_interpret.OPS` reads; otherwise
   :class:`OnnxImportError` lists the missing ops with their counts, before any slow work.
3. **Clean.** onnx-graphsurgeon folds constants (ONNX Runtime evaluates every subgraph that depends only on
   initializers, and ``Shape`` of static dims), removes dead nodes and sorts the rest: what is left is the
   model's computation, and the shape arithmetic that depends on dynamic dims.
4. **Interpret and capture.** :class:`~passforge.ir.onnx_interpret.OnnxModule` runs the graph with torch ops
   (weights as parameters, shape arithmetic in Python) and :func:`passforge.ir.capture.capture` exports it:
   ``meta["val"]`` on every node, ``get_attr`` weights, ``meta["passforge.source"]``, as from any other door.

Dynamic dims: each symbolic input dim (``dim_param``, e.g. ``"batch"``, ``"sequence"``) becomes a
``torch.export.Dim``, one per name, so inputs that share a name share the dim. The file does not say how far a
dim may range; when the model bounds one (a position table of 256 rows bounds the sequence), torch.export
suggests the bound and the capture is retried with it. A dim whose example size is 0 or 1 stays static
(torch.export specialises those), and so does one the model fixes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import fx

from passforge.ir.capture import CaptureError, capture, exception_chain
from passforge.models.registry import ModelError

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

__all__ = [
    "OnnxImportError", "example_inputs_for", "external_data_files", "import_onnx", "language_model_vocab", "load_model",
]

MIN_OPSET, MAX_OPSET = 13, 23
"""Opsets read. 17-23 are tested (the range exporters write today); 13-16 use the same op semantics for
every op passforge reads (axes as inputs or attributes are both accepted). Older models: convert them with
``onnx.version_converter.convert_version(model, 17)``."""
FOLD_LIMIT_BYTES = 64 * 2**20
"""Constant folding leaves results larger than this computed at run time (an Expand of a constant to a
large shape would otherwise become a large weight)."""
SHAPE_INFERENCE_LIMIT_BYTES = 1536 * 2**20
"""ONNX shape inference (it helps folding) serializes the model: above 2 GiB it cannot, so it is skipped."""
MAX_REFINEMENTS = 3
"""Captures retried with the dim ranges torch.export suggests (see the module docstring)."""
BATCH_SIZE, FIRST_DIM_SIZE, DIM_SIZE_STEP = 2, 8, 4
"""Example sizes of symbolic dims: 2 for a name with "batch" in it, else 8, 12, 16... (distinct, so
torch.export does not take two different dims for one)."""
MAX_EXAMPLE_ID = 256
"""Example integer inputs are below this and below the rows of any table they index (token ids)."""


class OnnxImportError(ModelError):
    """The ONNX model cannot be imported; the message says what, where (the node) and what to do."""


def import_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    dynamic: bool = True,
) -> fx.GraphModule:
    """Import an ONNX model (a path or an ``onnx.ModelProto``) into the passforge IR; see the module docstring.

    ``example_inputs``: what to capture with, one tensor per graph input (default: made from the input
    types by :func:`example_inputs_for`). ``dynamic``: symbolic input dims stay dynamic (else every dim is
    fixed at the example's size). Raises :class:`OnnxImportError` for a model passforge cannot read.
    """
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        proto, label = model, model.graph.name or "onnx-model"
        if _external_tensors(proto):
            raise OnnxImportError(
                f"import_onnx: model '{label}' keeps weights in external data files, which are found relative "
                "to the model's folder; pass the model's path instead of the ModelProto"
            )
    else:
        proto, label = load_model(model), Path(model).name
    if proto.functions:  # model-local functions (a copy: the caller's proto is not changed): check their bodies
        proto = onnx.inliner.inline_local_functions(proto)
    check_model(proto, label)
    specs = input_specs(proto)
    inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_for(proto)
    _check_inputs(specs, inputs, label)
    from passforge.ir.onnx_interpret import OnnxModule, module_scopes

    graph = clean(proto)
    with _quiet_graphsurgeon():  # reading float8 constants logs a false "could not be converted" note
        module = OnnxModule(graph, module_scopes(proto))
    dynamic_shapes = _dynamic_shapes(specs, inputs) if dynamic else None
    return _capture(module, inputs, dynamic_shapes, label)


def _onnx() -> ModuleType:
    try:
        import onnx
        import onnx.inliner  # a submodule `import onnx` does not load
        import onnx_graphsurgeon  # noqa: F401 - cleans the graph
        import onnxruntime  # noqa: F401 - onnx-graphsurgeon folds constants with it
    except ImportError as exc:
        raise OnnxImportError(
            f"import_onnx needs onnx, onnxruntime and onnx-graphsurgeon ({exc}); install them with: "
            "pip install 'passforge[onnx]'"
        ) from exc
    return onnx


# ---------------------------------------------------------------------------------------------------------
# ONNX types


ONNX_TO_TORCH = {
    onnx_type: dtype
    for onnx_type, dtype in (
        (1, torch.float32), (2, torch.uint8), (3, torch.int8), (4, torch.uint16), (5, torch.int16),
        (6, torch.int32), (7, torch.int64), (9, torch.bool), (10, torch.float16), (11, torch.float64),
        (12, torch.uint32), (13, torch.uint64), (16, torch.bfloat16), (17, torch.float8_e4m3fn),
        (19, torch.float8_e5m2),
    )
}  # fmt: skip


def torch_dtype(onnx_type: int, where: str = "") -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto.DataType``."""
    dtype = ONNX_TO_TORCH.get(int(onnx_type))
    if dtype is None:
        raise OnnxImportError(f"{where}: ONNX element type {onnx_type} has no torch equivalent")
    return dtype


def normalize_domain(domain: str | None) -> str:
    """``""`` for the default domain, however the file spells it (``""``, ``"ai.onnx"``, absent)."""
    return "" if not domain or domain == "ai.onnx" else domain


# ---------------------------------------------------------------------------------------------------------
# 1. Read


def load_model(path: str | os.PathLike[str], *, load_weights: bool = True) -> onnx.ModelProto:
    """Read ``path`` as an ``onnx.ModelProto``, with its external data once every location is checked
    (see :func:`check_external_data`); ``load_weights=False`` leaves external data unread."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OnnxImportError(f"{path}: not an ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not proto.HasField("graph") or not proto.opset_import:  # an empty file parses as an empty ModelProto
        raise OnnxImportError(f"{path}: not an ONNX model (no graph or no opset: empty or not ONNX at all)")
    if load_weights and _external_tensors(proto):
        check_external_data(proto, path.parent)
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(proto, str(path.parent))
        except (ValueError, OSError) as exc:  # e.g. a length that does not fit the tensor's dims
            raise OnnxImportError(f"{path}: external data does not match its tensors ({exc})") from exc
    return proto


def external_data_files(path: str | os.PathLike[str]) -> set[Path]:
    """The resolved paths of the external data files an ``.onnx`` file names (read, never written: an output
    path among them is refused)."""
    proto = load_model(path, load_weights=False)
    folder = Path(path).resolve().parent
    locations = {entry.value for t in _external_tensors(proto) for entry in t.external_data if entry.key == "location"}
    return {(folder / location).resolve() for location in locations if location and "\0" not in location}


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    onnx = _onnx()
    return [t for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, sparse initializers, tensor attributes, in subgraphs and
    model-local functions too."""
    graphs = [proto.graph]
    nodes = [node for function in proto.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def check_external_data(proto: onnx.ModelProto, folder: str | os.PathLike[str]) -> None:
    """Refuse external data that is not a relative path to a file inside ``folder`` (after resolving links),
    or whose ``offset``/``length`` run past the file's end: a model file decides which bytes are read."""
    root = Path(folder).resolve()
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor '{tensor.name}': external data location {location!r}"
        if "\0" in location:
            raise OnnxImportError(f"{where} holds a NUL byte; not a file name")
        if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
            raise OnnxImportError(f"{where} is not a relative path; external data must lie in the model's folder")
        target = (root / location).resolve()
        if target != root and root not in target.parents:
            raise OnnxImportError(f"{where} leads outside the model's folder {root}; refusing to read it")
        if not target.is_file():
            raise OnnxImportError(f"{where}: no such file in {root}")
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
        except ValueError:
            raise OnnxImportError(f"{where}: offset/length are not integers ({info})") from None
        end = offset + length if length is not None else offset
        if offset < 0 or (length is not None and length < 0) or end > target.stat().st_size:
            raise OnnxImportError(f"{where}: bytes {offset}..{end} are not inside the file")
        expected = _stored_bytes(tensor)
        if length is not None and expected is not None and length != expected:
            raise OnnxImportError(f"{where}: length {length} does not match its tensors' {expected} bytes")


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's data takes, or None for the packed 4-bit types (two values per byte)."""
    onnx = _onnx()
    packed = {getattr(onnx.TensorProto, name, -1) for name in ("INT4", "UINT4", "FLOAT4E2M1")}
    if tensor.data_type in packed:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return itemsize * math.prod(tensor.dims)


# ---------------------------------------------------------------------------------------------------------
# 2. Check


def opset_of(proto: onnx.ModelProto) -> int:
    versions = {normalize_domain(entry.domain): entry.version for entry in proto.opset_import}
    return int(versions.get("", 0))


def unsupported_ops(proto: onnx.ModelProto) -> Counter[str]:
    """``{"domain.Op": count}`` for every node of the main graph passforge cannot import (subgraphs belong
    to control-flow ops, which are themselves unsupported)."""
    from passforge.ir.onnx_interpret import INTERNAL_DOMAIN, OPS

    missing: Counter[str] = Counter()
    for node in proto.graph.node:
        domain = normalize_domain(node.domain)
        if (domain, node.op_type) not in OPS or domain == INTERNAL_DOMAIN:
            missing[f"{domain}.{node.op_type}" if domain else node.op_type] += 1
    return missing


def check_model(proto: onnx.ModelProto, label: str) -> None:
    """Opset in range and every op known, else :class:`OnnxImportError` saying which and what to do."""
    opset = opset_of(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        hint = (
            "convert it first: onnx.version_converter.convert_version(model, 17)"
            if opset < MIN_OPSET
            else f"export it with opset_version={MAX_OPSET} or older"
        )
        raise OnnxImportError(
            f"import_onnx: {label} uses opset {opset}; passforge reads {MIN_OPSET}-{MAX_OPSET}: {hint}"
        )
    missing = unsupported_ops(proto)
    if missing:
        listed = ", ".join(f"{op} ×{count}" for op, count in missing.most_common())
        raise OnnxImportError(
            f"import_onnx: {label} uses {len(missing)} op type(s) passforge cannot import: {listed}.\n"
            "  The ops passforge reads are listed in docs/onnx.md (passforge.ir.onnx_interpret.OPS); "
            "re-export without the fused/custom ops, or add a handler to OPS."
        )


# ---------------------------------------------------------------------------------------------------------
# 3. Clean


@contextlib.contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon logs folding notes (and failures it recovers from) to stdout; keep only errors."""
    from onnx_graphsurgeon.logger import G_LOGGER

    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = severity


def clean(proto: onnx.ModelProto) -> gs.Graph:
    """The model's graph as onnx-graphsurgeon reads it, constants folded, dead nodes removed, sorted.

    The user's ModelProto is not changed (shape inference and function inlining make copies). ``Transpose``
    of a 2-D initializer is not folded: it is how exporters spell a linear's weight, and the interpreter
    reads the weight as it is (see ``onnx_interpret``). Nor are QuantizeLinear/DequantizeLinear
    (onnx-graphsurgeon never folds them): a quantized weight stays integers, read by torch's Q/DQ ops.
    """
    onnx = _onnx()
    import onnx_graphsurgeon as gs

    from passforge.ir.onnx_interpret import transposes_constant

    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    if sum(len(t.raw_data) for t in proto.graph.initializer) < SHAPE_INFERENCE_LIMIT_BYTES:
        with contextlib.suppress(onnx.shape_inference.InferenceError, ValueError):
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    with _quiet_graphsurgeon():
        graph = gs.import_onnx(proto)
        graph.toposort()
        # fold_shapes=False: graphsurgeon 0.6.1 folds Shape as the whole shape, ignoring opset 15's start/end
        # (torch.onnx writes those); the interpreter computes static shapes in Python anyway
        graph.fold_constants(
            size_threshold=FOLD_LIMIT_BYTES, should_exclude_node=transposes_constant, fold_shapes=False
        )
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return graph


# ---------------------------------------------------------------------------------------------------------
# 4. Inputs, dims and capture


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the file declares it: dims are ints, or names for symbolic dims."""

    name: str
    dtype: torch.dtype
    dims: tuple[int | str, ...]


def input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers listed as inputs, as old exporters did, are weights)."""
    weights = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in weights:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxImportError(f"input '{value.name}' is not a tensor (sequences and maps are not supported)")
        if not tensor_type.HasField("shape"):
            raise OnnxImportError(
                f"input '{value.name}' has no shape (not even a rank); re-export the model with input shapes, or "
                "set them with onnx.tools.update_model_dims.update_inputs_outputs_dims"
            )
        dims: list[int | str] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or f"{value.name}_{axis}")
        specs.append(InputSpec(value.name, torch_dtype(tensor_type.elem_type, f"input '{value.name}'"), tuple(dims)))
    return specs


def _dim_sizes(specs: Sequence[InputSpec], fixed: Mapping[str, int]) -> dict[str, int]:
    sizes, next_size = dict(fixed), FIRST_DIM_SIZE
    for spec in specs:
        for dim in spec.dims:
            if isinstance(dim, str) and dim not in sizes:
                if "batch" in dim.lower():
                    sizes[dim] = BATCH_SIZE
                else:
                    sizes[dim], next_size = next_size, next_size + DIM_SIZE_STEP
    return sizes


def _index_bounds(proto: onnx.ModelProto) -> dict[str, int]:
    """For inputs that index a constant table with ``Gather`` (token ids into an embedding), through
    Cast/Reshape/Squeeze/Unsqueeze/Flatten/Identity: the table's row count (the smallest, if several)."""
    passthrough = {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
    origin = {value.name: value.name for value in proto.graph.input}
    tables = {t.name: list(t.dims) for t in proto.graph.initializer}
    bounds: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in passthrough and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
        if node.op_type == "Gather" and node.input[0] in tables and node.input[1] in origin:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            rows = tables[node.input[0]][axis]
            name = origin[node.input[1]]
            bounds[name] = min(bounds.get(name, rows), rows)
    return bounds


def example_inputs_for(
    proto: onnx.ModelProto, *, sizes: Mapping[str, int] | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs from the graph's input types.

    Symbolic dims: ``sizes`` where given, else 2 for a batch dim and 8, 12, 16... for the others; ``seq_len``
    sizes the sequence dim of a language model (see :func:`language_model_vocab`). Values:
    integer inputs that index a table (token ids) below min(rows, 256); integer inputs named like a mask
    ones, like positions ``arange`` over the last dim, others 0 or 1; booleans true; floats standard normal.
    Pass your own inputs to ``import_onnx`` where these do not fit the model.
    """
    specs = input_specs(proto)
    fixed = dict(sizes or {})
    if seq_len is not None and language_model_vocab(proto) is not None and isinstance(specs[0].dims[1], str):
        fixed.setdefault(specs[0].dims[1], seq_len)
    dim_sizes = _dim_sizes(specs, fixed)
    bounds = _index_bounds(proto)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for spec in specs:
        shape = [dim_sizes[d] if isinstance(d, str) else d for d in spec.dims]
        name = spec.name.lower()
        if spec.dtype is torch.bool:
            value = torch.ones(shape, dtype=torch.bool)
        elif spec.dtype.is_floating_point:
            value = torch.randn(shape, generator=generator).to(spec.dtype)
        elif "mask" in name:
            value = torch.ones(shape, dtype=spec.dtype)
        elif "position" in name and shape:
            value = torch.arange(shape[-1], dtype=spec.dtype).expand(shape).contiguous()
        else:
            high = min(bounds.get(spec.name, 2), MAX_EXAMPLE_ID)
            value = torch.randint(0, high, shape, generator=generator).to(spec.dtype)
        inputs.append(value)
    return tuple(inputs)


def language_model_vocab(proto: onnx.ModelProto) -> int | None:
    """The vocabulary size V when the model reads like a language model — one int64 input (B, T) and a
    first output (B, T, V) of floats — else None."""
    specs = input_specs(proto)
    if len(specs) != 1 or specs[0].dtype is not torch.int64 or len(specs[0].dims) != 2:
        return None
    output = proto.graph.output[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in output.shape.dim]
    if len(dims) != 3 or not torch_dtype(output.elem_type, "output").is_floating_point:
        return None
    if not isinstance(dims[2], int) or dims[2] < 2 or list(dims[:2]) != list(specs[0].dims):
        return None
    return dims[2]


def _check_inputs(specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor], label: str) -> None:
    if len(inputs) != len(specs):
        raise OnnxImportError(
            f"import_onnx: {label} takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}), "
            f"got {len(inputs)} example input(s)"
        )
    for spec, value in zip(specs, inputs):
        wrong_dims = len(value.shape) != len(spec.dims) or any(
            isinstance(d, int) and d != size for d, size in zip(spec.dims, value.shape)
        )
        if not isinstance(value, torch.Tensor) or value.dtype != spec.dtype or wrong_dims:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise OnnxImportError(
                f"import_onnx: input '{spec.name}' is {spec.dtype} {list(spec.dims)} in {label}, the example "
                f"input is {got}"
            )


def _dynamic_shapes(specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]) -> tuple[object, ...] | None:
    """``dynamic_shapes`` for capture: a dim name used once is ``Dim.AUTO`` (torch.export finds its range, or
    keeps it static where the model fixes it, in one trace); a name shared by several dims is one named
    ``Dim``, so they stay equal. Dims whose example size is below 2 stay static."""
    uses = Counter(
        dim for spec, value in zip(specs, inputs) for axis, dim in enumerate(spec.dims)
        if isinstance(dim, str) and value.shape[axis] >= 2
    )  # fmt: skip
    named: dict[str, object] = {}
    idents: set[str] = set()
    shapes: list[dict[int, object] | None] = []
    for spec, value in zip(specs, inputs):
        entry = {}
        for axis, dim in enumerate(spec.dims):
            if not isinstance(dim, str) or value.shape[axis] < 2:
                continue
            if uses[dim] == 1:
                entry[axis] = torch.export.Dim.AUTO
                continue
            if dim not in named:  # a Dim's name must be an identifier, distinct from the others
                ident = re.sub(r"\W", "_", dim)
                ident = ident if ident[:1].isalpha() else f"d_{ident}"
                while ident in idents:
                    ident += "_"
                idents.add(ident)
                named[dim] = torch.export.Dim(ident)
            entry[axis] = named[dim]
        shapes.append(entry or None)
    return tuple(shapes) if any(shapes) else None


_SUGGESTED_FIXES = re.compile(r"Suggested fixes:\n((?:[ \t]+\S[^\n]* = [^\n]+\n?)+)")


def _capture(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_shapes: object, label: str
) -> fx.GraphModule:
    """Capture. When the model constrains a named (shared) dim, retry with the range torch.export suggests;
    when it suggests none, with every dim ``Dim.AUTO`` (each then gets the range and the equalities the model
    itself implies)."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    for attempt in range(MAX_REFINEMENTS + 1):
        try:
            return capture(module, inputs, dynamic_shapes=dynamic_shapes, name=label)
        except CaptureError as exc:
            chain = exception_chain(exc)
            own = next((e for e in chain if isinstance(e, OnnxImportError)), None)
            if own is not None:
                raise own from None
            violated = any("Constraints violated" in str(e) for e in chain)
            if dynamic_shapes is None or not violated or attempt == MAX_REFINEMENTS:
                raise
            fixes = next((m for e in chain if (m := _SUGGESTED_FIXES.search(str(e)))), None)
            refined = None
            if fixes is not None:
                with contextlib.suppress(ValueError, KeyError, RuntimeError):
                    refined = refine_dynamic_shapes_from_suggested_fixes(fixes.group(0), dynamic_shapes)
            auto = _all_auto(dynamic_shapes)
            if refined is None and auto == dynamic_shapes:
                raise
            dynamic_shapes = refined if refined is not None else auto
    raise AssertionError("unreachable")


def _all_auto(dynamic_shapes: tuple[dict[int, object] | None, ...]) -> tuple[dict[int, object] | None, ...]:
    auto = torch.export.Dim.AUTO
    return tuple(None if spec is None else dict.fromkeys(spec, auto) for spec in dynamic_shapes)

