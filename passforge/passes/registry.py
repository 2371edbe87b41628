"""Pass registry: ``@register`` for passforge's own passes, the entry-point group ``passforge.passes`` for
third-party packages (``[project.entry-points."passforge.passes"] my-pass = "mypkg.passes:MyPass"``).

Nothing is imported or registered at import time: the built-in pass modules and the entry points are loaded on
the first lookup.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

from passforge.passes.base import Pass

ENTRY_POINT_GROUP = "passforge.passes"
_BUILTIN_MODULES = (
    "passforge.passes.cleanup",
    "passforge.passes.precision",
    "passforge.passes.fuse_linears",
    "passforge.passes.attention",
    "passforge.passes.quantize.insert",
    "passforge.passes.quantize.smooth",
    "passforge.passes.quantize.gptq",
    "passforge.passes.quantize.fold",
    "passforge.passes.quantize.lower",
    "passforge.passes.prune.channels",
    "passforge.passes.prune.sparsify",
    "passforge.passes.distill",
)

_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available to pipeline specs under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register expects a Pass subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name: ClassVar[str]` (its pipeline key)")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, Pass)):
                raise TypeError(f"{ep.value} is not a Pass subclass")
            register(obj)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not take down every pipeline
            warnings.warn(f"passforge: skipping pass plugin '{ep.name}' ({ep.value}): {exc}", stacklevel=2)


def available() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def lookup(name: str) -> type[Pass] | None:
    _load()
    return _REGISTRY.get(name)
