"""Export a passforge graph to ONNX, with fake quantization in the QDQ form ONNX Runtime and TensorRT read.

    path = export_onnx(gm, "out/model.onnx")     # gm: captured, or the result of any passforge pipeline

The field's exporter does the work: the graph is re-exported with ``torch.export`` (as ``save_graph`` does,
keeping its dynamic input dims) and translated by ``torch.onnx.export(dynamo=True)``, whose torchlib covers
the ATen op set; passforge adds translations for the quantization ops its passes insert
(:mod:`passforge.ir.onnx_qdq`, which lists the mapping) and for ``passforge::attention``
(:mod:`passforge.ir.onnx_attention`: standard ops, ONNX's ``Attention`` or ONNX Runtime's
``GroupQueryAttention``, as ``attention=`` says). Then onnxscript's optimizer (constant folding,
CSE; it never folds Q/DQ) and three QDQ clean-ups (:mod:`passforge.ir.onnx_cleanup`): packed int4 weights
become uint4 initializers, the
uint4 ↔ uint8 casts torch's storage type leaves between Q and DQ go, and quantized weights are stored
transposed so DequantizeLinear feeds MatMul directly (what ONNX Runtime fuses into MatMulNBits). The file
is checked with ``onnx.checker`` before it replaces anything at ``path``.

Weights are written as the graph holds them, so the pipeline decides, in one place:

- after ``quantize``: float initializer → QuantizeLinear → DequantizeLinear, the standard QDQ form
  (TensorRT and ONNX Runtime fold the weight Q themselves; the file is as large as fp32);
- after ``fold-quant``: int8 / fp8 / uint4 initializer → DequantizeLinear, 1/4 (1/8 for uint4) of the bytes.

Dynamic per-token activation quantization (``w8a8``) becomes torch's own arithmetic (ReduceMin/ReduceMax
for the scales, the rounding in double: exact) feeding a blocked DequantizeLinear along the last axis.
ONNX Runtime runs it; TensorRT wants constant, symmetric scales, so a w8a8 file is for ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import fx

from passforge.ir.capture import exception_chain, quiet_logger
from passforge.ir.graph import dynamic_shapes_of, example_inputs_of, op_name
from passforge.ir.serialize import atomic_path

if TYPE_CHECKING:
    from onnxscript import ir

MIN_OPSET = 21
"""Blocked quantization (``block_size``) and 4-bit types arrived in opset 21."""
ATTENTION_OPSET = 23
"""ONNX's ``Attention`` op arrived in opset 23."""
AttentionForm = Literal["decompose", "onnx", "ort-gqa"]
"""How fused attention is written (:mod:`passforge.ir.onnx_attention`): standard ops, ONNX's ``Attention``,
or ONNX Runtime's ``com.microsoft.GroupQueryAttention``."""
ATTENTION_FORMS: tuple[str, ...] = get_args(AttentionForm)
EXTERNAL_DATA_THRESHOLD = 1536 * 2**20
"""Weights above this many bytes go to an external data file (a protobuf holds at most 2 GiB)."""


class OnnxExportError(RuntimeError):
    """Export failed; the message says what, where (the node) and what to do."""


def export_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    opset: int | None = None,
    attention: AttentionForm = "decompose",
    external_data: bool | None = None,
    translations: Mapping[torch._ops.OpOverload, Callable[..., object]] | None = None,
) -> Path:
    """Write ``gm`` to ``path`` as ONNX (QDQ form for quantized graphs) and return ``path``.

    ``example_inputs``: what to trace with (default: zeros shaped like the graph's inputs); dims that are
    dynamic in the graph stay dynamic in the file. ``opset``: the default domain's opset (default: 21, or 23
    for ``attention="onnx"``). ``attention``: how fused attention (``passforge::attention``) is written —
    ``"decompose"`` into standard ops (any runtime), ``"onnx"`` as ONNX's ``Attention`` op (opset 23), or
    ``"ort-gqa"`` as ONNX Runtime's ``com.microsoft.GroupQueryAttention``; a call the form cannot express is
    decomposed, with a warning that says why (:mod:`passforge.ir.onnx_attention`). ``external_data``: weights
    in a data file beside
    ``path`` (``<name>.<random>.data``, referenced by a relative path, so the folder moves as a unit);
    ``None`` decides by size. ``translations``: extra ``{torch op overload: onnxscript function}`` entries
    for ops passforge and torch.onnx do not translate. The write is atomic: a failure leaves any previous
    file at ``path`` as it was.
    """
    opset = _checked_opset(opset, attention)
    onnx, torch_onnx, onnx_attention, onnx_qdq, onnx_cleanup = _import_exporters()
    inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_of(gm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(gm, inputs, dynamic_shapes=dynamic_shapes_of(gm), strict=False)
    except Exception as exc:
        raise OnnxExportError(
            f"export_onnx: torch.export could not re-trace the graph ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}). Pass example_inputs that the graph accepts "
            "(the shapes and dtypes of its placeholders)."
        ) from exc
    fallbacks: list[tuple[str, str]] = []
    table = {**onnx_qdq.TRANSLATIONS, **onnx_attention.translations(attention, fallbacks), **(translations or {})}
    try:
        with _quiet_torch_onnx():
            exported = torch_onnx.export(
                program, inputs, dynamo=True, opset_version=opset, custom_translation_table=table,
                optimize=False, verbose=False,
            )  # fmt: skip
    except torch_onnx.OnnxExporterError as exc:
        raise OnnxExportError(_explain_failure(gm, exc)) from exc
    written = exported.model.opset_imports.get("")
    if written != opset:  # torch.onnx falls back to its own opset when asked for one it cannot write
        raise OnnxExportError(
            f"export_onnx: asked for opset {opset}, but the exporter can only write opset {written} here; "
            f"choose an opset between {MIN_OPSET} and {written}"
        )
    onnx_cleanup.fold_packed_int4(exported.model)
    exported.optimize()  # onnxscript's optimizer: constant folding, CSE, value types; Q/DQ are kept
    onnx_cleanup.drop_lossless_cast_pairs(exported.model)
    onnx_cleanup.transpose_weights_into_dq(exported.model)
    if external_data is None:
        external_data = _initializer_bytes(exported.model) > EXTERNAL_DATA_THRESHOLD
    target = Path(path)
    _write_checked(onnx, exported.model, target, external_data)
    if fallbacks:
        warnings.warn(_fallback_note(attention, fallbacks), stacklevel=2)
    return target


def _checked_opset(opset: int | None, attention: str) -> int:
    """The opset to write: the caller's, or the oldest that holds every op ``attention`` writes."""
    if attention not in ATTENTION_FORMS:
        forms = ", ".join(repr(form) for form in ATTENTION_FORMS)
        raise OnnxExportError(f"export_onnx: attention={attention!r} is not a form; choose one of {forms}.")
    needed = ATTENTION_OPSET if attention == "onnx" else MIN_OPSET
    if opset is None:
        return needed
    if opset < MIN_OPSET:
        raise OnnxExportError(
            f"export_onnx: opset {opset} is too old; the QDQ forms need opset >= {MIN_OPSET} (blocked "
            f"quantization, 4-bit types). Pass opset={MIN_OPSET} or newer."
        )
    if opset < needed:
        raise OnnxExportError(
            f"export_onnx: attention='onnx' writes ONNX's Attention op, which needs opset >= {needed}; pass "
            f"opset={needed} (or leave it out), or attention='decompose' for opset {opset}."
        )
    return opset


def _fallback_note(attention: str, fallbacks: list[tuple[str, str]]) -> str:
    """One line per reason, naming the calls (by their q) it kept decomposed."""
    calls: dict[str, list[str]] = {}
    for name, reason in fallbacks:
        calls.setdefault(reason, []).append(name)
    lines = [
        f"  {reason} ({len(names)}×: {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
        for reason, names in calls.items()
    ]
    return (
        f"export_onnx: {len(fallbacks)} passforge::attention call(s) could not be written as attention="
        f"{attention!r} and are decomposed into standard ops (exact, not fused):\n" + "\n".join(lines)
    )


def _import_exporters() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType, ModuleType]:
    """onnx, torch.onnx, our translations (attention, quantization) and clean-ups, imported on first use:
    onnx is an optional dependency."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it

        from passforge.ir import onnx_attention, onnx_cleanup, onnx_qdq
    except ImportError as exc:
        raise OnnxExportError(
            f"export_onnx needs onnx and onnxscript ({exc}); install them with: pip install 'passforge[onnx]'"
        ) from exc
    return onnx, torch.onnx, onnx_attention, onnx_qdq, onnx_cleanup


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """Hide torch.onnx's start-up notes that concern other libraries (torchvision ops it could not
    register); real problems reach the caller as exceptions."""
    with quiet_logger("torch.onnx._internal.exporter._registration", logging.ERROR), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_BEFORE_LOWERING = (
    "export the pipeline's graph from before lower-quant: its kernels are this machine's choice, and ONNX "
    "runtimes choose their own from the Q/DQ form"
)
_HINTS = {
    f"passforge.{kernel}.default": _BEFORE_LOWERING
    for kernel in (
        "int8_weight_linear", "int8_dynamic_linear", "int4_weight_linear", "int8_static_linear", "fp8_linear"
    )
}  # fmt: skip
"""What to do about an untranslated op, where we know better than "write a translation"."""
_NO_TRANSLATION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>")


def _explain_failure(gm: fx.GraphModule, exc: BaseException) -> str:
    """What torch.onnx could not do, named by *our* graph's nodes, and what to try."""
    text = "\n".join(str(e) for e in exception_chain(exc))
    missing = _NO_TRANSLATION.search(text)
    if missing:
        op = f"{missing.group(1)}.{missing.group(2)}"
        nodes = [node.name for node in gm.graph.nodes if node.op == "call_function" and op_name(node) == op]
        named = ", ".join(repr(n) for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        where = f"node{'s' if len(nodes) > 1 else ''} {named}" if nodes else "a node"
        hint = _HINTS.get(op) or (
            f"pass translations={{torch.ops.{op}: fn}} with an onnxscript function fn, or rewrite the node "
            "into ATen ops before exporting"
        )
        return (
            f"export_onnx: {where} call{'s' if len(nodes) == 1 else ''} {op}, which has no ONNX translation "
            f"(torch.onnx covers ATen ops; passforge adds its quantization ops).\n  try: {hint}."
        )
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    cause = exception_chain(exc)[-1]
    return (
        f"export_onnx: torch.onnx could not translate the graph: {first[:300]}\n"
        f"  cause: {type(cause).__name__}: {str(cause)[:300]}\n"
        "  try: export the captured graph to see whether a pass introduced the problem."
    )



def _initializer_bytes(model: ir.Model) -> int:
    values = model.graph.initializers.values()
    return sum(value.const_value.nbytes for value in values if value.const_value is not None)


def _write_checked(onnx: ModuleType, model: ir.Model, target: Path, external: bool) -> None:
    """Save, run ``onnx.checker`` on the staged file, then move it into place (data file first).

    The data file gets a fresh name on every export, so the old model never points at new weights, even
    if the process dies between the two renames; the previous export's data file goes once the new
    model is in place."""
    from onnxscript import ir

    stale = _own_data_files(onnx, target)
    data_name = f"{target.name}.{secrets.token_hex(4)}.data" if external else None
    placed: Path | None = None
    try:
        with atomic_path(target) as staged:
            ir.save(model, staged, external_data=data_name)
            try:
                onnx.checker.check_model(str(staged), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise OnnxExportError(
                    f"export_onnx: the exported model fails onnx.checker ({str(exc).splitlines()[0][:300]}); "
                    f"nothing was written to {target}. This is a translation bug: please report it with the "
                    "pipeline that produced the graph."
                ) from exc
            if data_name is not None:
                placed = target.parent / data_name
                with open(staged.parent / data_name, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(staged.parent / data_name, placed)
    except BaseException:
        if placed is not None:
            placed.unlink(missing_ok=True)
        raise
    for name in stale - {data_name}:
        (target.parent / name).unlink(missing_ok=True)


def _own_data_files(onnx: ModuleType, target: Path) -> set[str]:
    """Data files a previous export to ``target`` wrote (named ``<target name>.<token>.data``, beside it)."""
    if not target.is_file():
        return set()
    from google.protobuf.message import DecodeError

    try:
        previous = onnx.load(str(target), load_external_data=False)
    except (OSError, DecodeError):  # not a model we wrote: leave every file beside it alone
        return set()
    pattern = re.compile(re.escape(target.name) + r"\.[0-9a-f]+\.data")
    names = set()
    for tensor in previous.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and pattern.fullmatch(entry.value):
                names.add(entry.value)
    return names
