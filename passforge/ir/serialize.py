"""Saving and loading IR graphs as ``.pt2`` (``torch.export.save``), and atomic file writes.

A graph is saved by re-exporting it (``torch.export.export(gm, example_inputs)``), so what lands on disk is a
standard ExportedProgram any PyTorch can load, and loading goes through the same normalisation as capture
(:func:`passforge.ir.capture.from_exported_program`), so a loaded graph is the same IR as a captured one.
``.pt2`` archives hold tensors as raw bytes, not pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import fx

from passforge.ir.capture import CaptureError, from_exported_program


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a path with ``target``'s name inside a private folder beside it; on success the file is fsynced
    and renamed over ``target`` in one step. A crash or an exception leaves any previous ``target`` intact
    and no partial file behind. (Same name, so tools that name things after the file — a ``.pt2``
    archive's root folder — see the final name.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = staging / target.name
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """A new empty folder beside ``target`` (same filesystem: a rename swaps it in) with the permissions a
    folder made there would get (``mkdtemp`` makes it private)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    staging.chmod(0o777 & ~mask)
    return staging


def swap_in_folder(staging: Path, target: Path, *, keep: Sequence[str] = ()) -> None:
    """Replace ``target`` by ``staging`` with renames; old contents are removed only once the new are in
    place (a crash leaves the old folder or the new one, never neither). Entries named in ``keep`` move from
    the old folder into the new one."""
    old = None
    if target.exists():
        for name in keep:
            if (target / name).exists():
                os.replace(target / name, staging / name)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safe_filename(name: str) -> str:
    """``name`` reduced to characters safe in one path component (a plugin's pass name cannot escape a folder)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return cleaned or "_"


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
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # torch notes each weight that shares storage with a bigger tensor (a view); harmless for CPU weights
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, tmp)


def load_graph(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Load a ``.pt2`` saved by :func:`save_graph` (or any ``torch.export.save``) as passforge IR."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"{path}: no such file; expected a .pt2 saved by torch.export.save or passforge")
    refuse_pickled_payloads(path)
    import passforge.kernels.fp8  # graphs may call passforge's fp8 Q/DQ ops
    import passforge.kernels.ops  # noqa: F401 - graphs may call passforge's custom ops and torch's Q/DQ ops
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


_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def refuse_pickled_payloads(path: Path) -> None:
    """Raise unless every tensor in the ``.pt2`` archive is stored as raw bytes.

    ``torch.export.load`` unpickles entries flagged ``use_pickle`` (tensor subclasses), custom and opaque
    objects, and legacy ``.pt`` constant files — each can run arbitrary code. Archives passforge writes have
    none; an archive from elsewhere that has them is refused before anything is deserialised.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if "/data/constants/" in name and name.endswith((".pt", ".pkl", ".pickle")):
                    _refuse(path, name)
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for entry_name, entry in config.items():
                        if entry.get("use_pickle") or str(entry.get("path_name", "")).startswith(_PICKLED_PREFIXES):
                            _refuse(path, entry_name)
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as exc:
        raise CaptureError(f"{path}: not a readable .pt2 archive ({exc}); re-save it with torch.export.save") from exc


def _refuse(path: Path, entry: str) -> None:
    raise CaptureError(
        f"{path}: refusing to load: entry '{entry}' is a pickled object, and unpickling can run arbitrary code. "
        "Re-export the model with plain tensors from code you trust."
    )
