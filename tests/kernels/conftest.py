"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else in Triton's interpreter on the CPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is *created* (``triton.jit`` then returns an
interpreted function), not when it is launched, so it must be set before the ``KERNEL_MODULES`` below are
first imported. pytest imports this conftest before any test module of this folder,
and nothing in passforge imports those modules on a CPU-only machine (the ops import them for CUDA tensors
only), so setting it here, at import, is early enough — in a whole-suite run too. Should something have
imported them before (a plugin, a test elsewhere), the run stops with a message instead of failing on CPU
pointers. With a GPU nothing is set: the same tests run the compiled kernels (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

KERNEL_MODULES = (
    "passforge.kernels.int8_gemm",
    "passforge.kernels.weight_only_gemm",
    "passforge.kernels.flash_attention",
)
INTERPRETED = not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if INTERPRETED:
    imported_early = [name for name in KERNEL_MODULES if name in sys.modules]
    if imported_early and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            f"{', '.join(imported_early)} were imported before tests/kernels/conftest.py could set "
            "TRITON_INTERPRET=1, so their kernels cannot run on this CPU-only machine; run with "
            "TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: CUDA, or the CPU under the interpreter."""
    return DEVICE
