"""Saving and loading IR graphs as ``.pt2`` (``torch.export.save``), and atomic file writes.

A graph is saved by re-exporting it (``torch.export.export(gm, example_inputs)``), so what lands on disk is a
standard ExportedProgram any PyTorch can load, and loading goes through the same normalisation as capture
(:func:`passforge.ir.capture.from_exported_program`), so a loaded graph is the same IR as a captured one.
``.pt2`` archives hold tensors as raw bytes, not pickles.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import fx

from passforge.ir.capture import CaptureError, from_exported_program


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    A crash or an exception leaves any previous ``target`` intact and no partial file behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_graph(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    example_inputs: Sequence[object],
    *,
    dynamic_shapes: object = None,
) -> None:
    """Re-export ``gm`` on ``example_inputs`` and write it to ``path`` (``.pt2``) atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)


def load_graph(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Load a ``.pt2`` saved by :func:`save_graph` (or any ``torch.export.save``) as passforge IR."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"{path}: no such file; expected a .pt2 saved by torch.export.save or passforge")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(path)
    except Exception as exc:
        raise CaptureError(
            f"{path}: not a readable torch.export archive ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-save it with torch.export.save"
        ) from exc
    return from_exported_program(program, name=path.name)
