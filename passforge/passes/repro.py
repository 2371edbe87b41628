"""Reproducers: when a pass fails, the graph it was given and the spec that failed, replayable in one command.

    REPRO/graph.pt2        the graph before the failing pass (torch.export archive)
    REPRO/inputs.safetensors   the example inputs ("0", "1", ...)
    REPRO/spec.txt         the failing pass's spec, e.g. "cast(dtype=fp16)"
    REPRO/error.txt        the error and the passes that ran before it

``passforge replay REPRO`` (or :func:`replay`) runs that pass again on that graph with full verification.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import fx

from passforge.ir.graph import dynamic_shapes_of
from passforge.ir.serialize import atomic_path, load_graph, safe_filename, save_graph, write_text_atomic
from passforge.passes.base import Context, Pass


def write_reproducer(
    root: Path,
    gm: fx.GraphModule,
    pass_: Pass,
    ctx: Context,
    exc: BaseException,
    *,
    passes_before: Sequence[str],
) -> Path:
    """Write a reproducer folder under ``root`` and return its path (see module docstring)."""
    folder = _fresh_folder(Path(root), pass_.name)
    write_text_atomic(folder / "spec.txt", pass_.spec + "\n")
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_text_atomic(
        folder / "error.txt",
        f"pass: {pass_.spec}\npasses before it: {', '.join(passes_before) or '(none)'}\n\n{details}",
    )
    tensors = {str(i): t.detach().contiguous() for i, t in enumerate(ctx.example_inputs) if isinstance(t, torch.Tensor)}
    with atomic_path(folder / "inputs.safetensors") as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    try:
        save_graph(gm, folder / "graph.pt2", ctx.example_inputs, dynamic_shapes=dynamic_shapes_of(gm))
    except Exception as save_exc:  # noqa: BLE001 - the readable code below still helps when export fails
        write_text_atomic(folder / "graph_export_error.txt", f"{type(save_exc).__name__}: {save_exc}\n")
    write_text_atomic(folder / "graph.py", gm.print_readable(print_output=False, colored=False))
    return folder


def _fresh_folder(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    stem = safe_filename(name)
    i = 0
    while (root / f"{stem}-{i}").exists():
        i += 1
    folder = root / f"{stem}-{i}"
    folder.mkdir()
    return folder


def load_inputs(folder: Path) -> tuple[torch.Tensor, ...]:
    """The reproducer's example inputs (safetensors: never unpickled)."""
    from passforge.ir.capture import CaptureError

    try:
        tensors = safetensors.torch.load_file(str(folder / "inputs.safetensors"))
    except (safetensors.SafetensorError, OSError) as exc:
        raise CaptureError(f"{folder}/inputs.safetensors: not a readable safetensors file ({exc})") from None
    if sorted(tensors) != [str(i) for i in range(len(tensors))]:
        raise CaptureError(f"{folder}/inputs.safetensors: expected tensors named 0, 1, ..., found {sorted(tensors)}")
    return tuple(tensors[str(i)] for i in range(len(tensors)))


def replay(folder: str | Path) -> None:
    """Rerun the failing pass of a reproducer with verification; raises the pass's error again if it persists."""
    from passforge.passes.hooks import VerifyHook
    from passforge.passes.manager import PassManager

    folder = Path(folder)
    if not (folder / "spec.txt").is_file():
        from passforge.ir.capture import CaptureError

        raise CaptureError(f"{folder}: not a reproducer folder (no spec.txt); pass a folder under OUT/reproducers/")
    spec = (folder / "spec.txt").read_text(encoding="utf-8").strip()
    gm = load_graph(folder / "graph.pt2")
    ctx = Context(example_inputs=load_inputs(folder))
    PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx)
