"""Saving and loading IR graphs as ``.pt2`` (``torch.export.save``), and atomic file writes.

A graph is saved by re-exporting it (``torch.export.export(gm, example_inputs)``), so what lands on disk is a
standard ExportedProgram any PyTorch can load, and loading goes through the same normalisation as capture
(:func:`passforge.ir.capture.from_exported_program`), so a loaded graph is the same IR as a captured one.
``.pt2`` archives hold tensors as raw bytes, not pickles.
"""

from __future__ import annotations

import contextlib
import errno
import io
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

from passforge.ir.capture import CaptureError, exception_chain, from_exported_program, quiet_logger


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


def unwritable_reason(target: str | os.PathLike[str]) -> str | None:
    """Why files cannot be created at ``target`` (a file or folder to be written), or None when they can:
    checked before slow work, so a long run does not end on a path it could never write. The nearest
    existing ancestor must be a folder this process may write into."""
    path = Path(target).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder, so {path} cannot be created"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{os.strerror(errno.EACCES).lower()}: cannot write into {ancestor}"
    return None


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
        with warnings.catch_warnings(), quiet_logger("torch.export"):  # it logs the traceback it then raises
            warnings.simplefilter("ignore")
            program = torch.export.load(path)
    except Exception as exc:
        cause = exception_chain(exc)[-1]
        raise CaptureError(
            f"{path}: not a readable torch.export archive ({type(cause).__name__}: {str(cause)[:200]}); "
            "re-save it with torch.export.save"
        ) from exc
    return from_exported_program(program, name=path.name)


_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def refuse_pickled_payloads(path: Path) -> None:
    """Raise unless every tensor in the ``.pt2`` archive is stored as raw bytes.

    ``torch.export.load`` unpickles entries flagged ``use_pickle`` (tensor subclasses), custom and opaque
    objects, and legacy ``.pt`` constant files — each can run arbitrary code — and loads the sample inputs
    (and legacy weight files) with ``weights_only=True``, retrying with the full unpickler when that fails.
    Archives passforge writes have none of these, and their sample inputs load ``weights_only``; an archive
    from elsewhere that has them, or a ``torch.save`` checkpoint renamed ``.pt2``, is refused before anything
    is deserialised.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                raise CaptureError(
                    f"{path}: refusing to load: this is a torch.save checkpoint (a pickle, which can run "
                    "arbitrary code when loaded), not a torch.export archive. Export the model with "
                    "torch.export.save, or load its state dict with torch.load(weights_only=True) in code you trust."
                )
            if not any(name == "archive_format" or name.endswith("/archive_format") for name in names):
                raise CaptureError(f"{path}: a zip file but not a torch.export archive (no archive_format entry); "
                                   "save the model with torch.export.save")
            for name in names:
                if "/data/constants/" in name and name.endswith((".pt", ".pkl", ".pickle")):
                    _refuse(path, name)
                if name.endswith((".pt", ".pkl", ".pickle")) and not _loads_weights_only(archive.read(name)):
                    _refuse(path, name)  # torch.export.load retries these with weights_only=False
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for entry_name, entry in config.items():
                        if entry.get("use_pickle") or str(entry.get("path_name", "")).startswith(_PICKLED_PREFIXES):
                            _refuse(path, entry_name)
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as exc:
        raise CaptureError(f"{path}: not a readable .pt2 archive ({exc}); re-save it with torch.export.save") from exc


def _loads_weights_only(data: bytes) -> bool:
    """Whether a ``torch.save`` entry (sample inputs, legacy weights) loads without unpickling code: torch's
    archive reader falls back to a full unpickle when ``weights_only`` loading fails, so such an entry is
    refused instead."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means torch would retry with the full unpickler
        return False
    return True


def _refuse(path: Path, entry: str) -> None:
    raise CaptureError(
        f"{path}: refusing to load: entry '{entry}' is a pickled object, and unpickling can run arbitrary code. "
        "Re-export the model with plain tensors from code you trust."
    )
