"""Capture: any ``nn.Module`` (our reference models, a Hugging Face folder) becomes the passforge IR.

The IR is the ``GraphModule`` ``torch.export`` produces, unlifted (``ExportedProgram.module()``):

- user inputs are ``placeholder`` nodes, in the order of the example inputs;
- parameters and buffers are ``get_attr`` nodes and live on the GraphModule under their original names
  (``layers.0.attention.wq.weight``) — the one documented way parameters are handled. The tensors are shared
  with the source model, never copied; passes must not mutate a tensor in place (ir/INVARIANTS.md), so the
  user's model is never changed;
- every node carries ``meta["val"]`` (a FakeTensor: shape, dtype, device; symbolic for dynamic dims) and
  ``meta["passforge.pass"] = "capture"``;
- calling it takes and returns the same pytree as the model (``gm(tokens) -> logits``);
- it is functional: a forward() that updates a buffer or an input in place is refused at capture.

When ``torch.export`` fails, :class:`CaptureError` says what failed, where in the user's code, why, and what
to try, instead of a raw export traceback.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import fx

from passforge.ir.graph import PASS_META

_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """Capture failed; the message has what, where, why and what to try."""


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[object],
    *,
    dynamic_shapes: object = None,
    name: str | None = None,
) -> fx.GraphModule:
    """Export ``model`` on ``example_inputs`` to an ATen-level GraphModule (see the module docstring).

    ``dynamic_shapes`` is passed to ``torch.export.export`` (e.g. ``({1: Dim("T", max=256)},)``).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture: expected a torch.nn.Module, got {type(model).__name__}; wrap plain functions in a Module."
        )
    example_inputs = tuple(example_inputs)
    label = name or type(model).__name__
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with warnings.catch_warnings(), _quiet_export():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise CaptureError(explain_export_failure(label, exc, dynamic=dynamic_shapes is not None)) from exc
    finally:
        for module, training in modes.items():  # each submodule gets its own flag back
            module.training = training
    return from_exported_program(exported, name=label)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Raise a library logger's threshold to ``level`` for the block, then put it back: torch logs the
    traceback of errors it then raises (passforge explains them itself) and notes about other libraries."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export prints the partial graph of a failed trace to stderr and logs the tracebacks of errors it
    then raises; :class:`CaptureError` explains the failure instead. What a successful export prints is
    passed on; torch's log records below CRITICAL are dropped while it runs (warnings included)."""
    printed = io.StringIO()
    with quiet_logger("torch"), contextlib.redirect_stderr(printed):
        yield
    print(printed.getvalue(), end="", file=sys.stderr)  # reached on success only


def _names(names: Sequence[str]) -> str:
    """The first five names, and whether there are more (for one-line error messages)."""
    return ", ".join(names[:5]) + (" and more" if len(names) > 5 else "")


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)


def check_reference_run(gm: fx.GraphModule, example_inputs: Sequence[object], label: str) -> None:
    """Run the captured graph once on its example inputs, before any pass. Inputs the model cannot take (an
    int64 tensor into a linear: export's fake tensors let some through) and NaN outputs (NaN weights) would
    otherwise surface as the first pass failing verification; they are the model's or the inputs' problem,
    and said so here.

    Raises :class:`CaptureError` when the graph does not run, ``ModelError`` when a parameter holds NaN/Inf
    (a broken checkpoint: quantization scales and every pass's checks would be meaningless; buffers may hold
    -inf on purpose, attention masks) or an output holds NaN (every pass is verified against these outputs,
    and NaN equals nothing).
    """
    from passforge.models.registry import ModelError

    broken = [name for name, tensor in gm.named_parameters()
              if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        raise ModelError(
            f"{label}: parameters holding NaN/Inf: {_names(broken)}; "
            "fix the checkpoint (e.g. torch.nan_to_num) before optimizing it"
        )
    try:
        with torch.inference_mode():
            outputs = gm(*example_inputs)
    except Exception as exc:
        if _out_of_memory(exc):
            raise CaptureError(
                f"{label}: running the captured graph once on its example inputs ran out of memory "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}).\n"
                "  try: shorter example inputs (the sequence length sets the activations' size), a smaller batch, "
                "or a device with more memory (--device)."
            ) from exc
        raise CaptureError(
            f"{label}: the captured graph does not run on its example inputs ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}).\n"
            "  try: give example inputs with the dtypes and shapes forward() expects (token ids: int64 (B, T))."
        ) from exc
    flat, _ = torch.utils._pytree.tree_flatten(outputs)
    bad = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.isnan().any()]
    if not bad:
        return
    weights = [
        name for name, tensor in (*gm.named_parameters(), *gm.named_buffers())
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]  # fmt: skip
    where = (
        f"weights holding NaN/Inf: {_names(weights)}"
        if weights else "no weight holds NaN/Inf, so the example inputs or the arithmetic produce it"
    )
    raise ModelError(
        f"{label}: output {bad[0]} is NaN on the example inputs before any pass ({where}). Every pass is verified "
        "against these outputs, and NaN matches nothing: fix the weights (e.g. torch.nan_to_num on the "
        "checkpoint) or give inputs the model computes finite outputs for."
    )


def _refuse_state_mutation(program: torch.export.ExportedProgram, label: str) -> None:
    """Passes fold, reorder and re-run graphs freely, which is only sound when forward() is a function of its
    inputs: a forward that writes into a buffer or an input (a step counter, an in-place KV cache) is refused."""
    signature = program.graph_signature
    mutated = [*signature.buffers_to_mutate.values(), *signature.user_inputs_to_mutate.values()]
    if mutated:
        raise CaptureError(
            f"capture of {label} failed: forward() writes into {', '.join(sorted(mutated))} in place.\n"
            "  passforge optimizes functional graphs: the graph is run repeatedly while it is verified and\n"
            "  profiled, and constants are folded.\n"
            "  try: return the new state from forward() instead of updating it in place (as passforge's LLaMA\n"
            "  decode step does with its KV cache)."
        )


def from_exported_program(
    program: torch.export.ExportedProgram, *, name: str, decomposed: bool = False
) -> fx.GraphModule:
    """Normalise an ExportedProgram (fresh or loaded from .pt2) into the IR described above; ``decomposed``: the
    caller already ran ``run_decompositions({})`` on it (a second run would trace the whole program again)."""
    if not decomposed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = program.run_decompositions({})  # functional: in-place state updates show in the signature
    _refuse_state_mutation(program, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = program.module()
    _strip_guards(gm)
    for node in gm.graph.nodes:
        node.meta[PASS_META] = "capture"
    gm.meta["passforge.source"] = name
    return gm


def _strip_guards(gm: fx.GraphModule) -> None:
    """Drop export's runtime assertions: the ``_guards_fn`` input-shape check and the dtype asserts a no-op
    ``x.float()`` leaves behind (they would fire wrongly once a pass changes dtypes). ``meta["val"]`` keeps
    the same facts, and the executor checks inputs against it."""
    for node in list(gm.graph.nodes):
        is_guard = node.op == "call_module" and node.target == "_guards_fn"
        if is_guard or node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()


_REASONS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("GuardOnDataDependentSymNode", "data-dependent", "Could not guard on data-dependent"),
        "the model branches or sizes a tensor on a tensor's *value* (data-dependent control flow)",
        "rewrite the branch with torch.where / torch.cond, or move the value-dependent part out of forward()",
    ),
    (
        ("Unsupported", "not supported", "NotImplementedError"),
        "an operation the exporter does not support",
        "replace the operation with a standard torch op, or register it as a torch.library custom op",
    ),
    (
        ("size mismatch", "must match the size", "shape", "Expected", "expected", "positional argument",
         "must be Tensor", "reduction dim", "same dtype"),
        "the example inputs do not fit the model (wrong shape, dtype or count)",
        "check the example inputs against forward()'s signature (e.g. token ids must be int64 of shape (B, T))",
    ),
)


_DYNAMIC_REASON = (
    ("ConstraintViolation", "Constraints violated", "specialized"),
    "a dimension declared dynamic is fixed by the model (or vice versa)",
    "drop that dimension from dynamic_shapes, or export with the example's static shape",
)


def explain_export_failure(label: str, exc: BaseException, *, dynamic: bool = False) -> str:
    """Turn a torch.export exception into: what failed, where in user code, why, and what to try."""
    text = f"{type(exc).__name__}: {exc}"
    first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    why, hint = "torch.export could not trace the model", "run torch.export.export on the model directly for details"
    reasons = (_DYNAMIC_REASON, *_REASONS) if dynamic else _REASONS  # shape constraints only when asked for
    for needles, reason, fix in reasons:
        if any(needle in text for needle in needles):
            why, hint = reason, fix
            break
    where = _user_frame(exc)
    lines = [f"capture of {label} failed: {why}.", f"  error: {first_line[:300]}"]
    if where:
        lines.append(f"  at: {where}")
    lines.append(f"  try: {hint}.")
    return "\n".join(lines)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (or during), outermost first: exporters wrap the error
    that says what went wrong in a few layers of their own."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: source`` of the deepest traceback frame outside torch, if any."""
    found: str | None = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith(_TORCH_DIR) and "passforge/ir/capture.py" not in frame.filename:
            source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            found = f"{frame.filename}:{frame.lineno}: {source}"
    return found
