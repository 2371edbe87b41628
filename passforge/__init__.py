"""passforge: capture a model to an ATen-level torch.fx graph, run rewrite passes, profile every pass.

    import passforge
    opt = passforge.optimize("tiny-lm", pipeline="cleanup,cast(dtype=bf16)")
    opt.save("out/"); passforge.load("out/")

The public names are loaded lazily, so ``import passforge`` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Context", "Optimized", "Pass", "PassManager", "PassResult", "capture", "load", "optimize", "register"]

_EXPORTS = {
    "optimize": "passforge.api",
    "load": "passforge.api",
    "Optimized": "passforge.api",
    "capture": "passforge.ir.capture",
    "Pass": "passforge.passes.base",
    "PassResult": "passforge.passes.base",
    "Context": "passforge.passes.base",
    "PassManager": "passforge.passes.manager",
    "register": "passforge.passes.registry",
}

if TYPE_CHECKING:
    from passforge.api import Optimized, load, optimize
    from passforge.ir.capture import capture
    from passforge.passes.base import Context, Pass, PassResult
    from passforge.passes.manager import PassManager
    from passforge.passes.registry import register


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'passforge' has no attribute {name!r}")
