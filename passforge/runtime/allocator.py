"""Keep freed memory for reuse on CPU, so a prefill's large buffers are not faulted in again on every call.

glibc's malloc serves every block over 32 MiB as a fresh ``mmap`` and unmaps it on ``free``. A 512-token
prefill of the ~100M LLaMA preset returns 65 MB of fp32 logits, so each call maps, faults in page by page,
zeroes and unmaps them again: milliseconds that no kernel choice wins back, the same on every compiler's
graph, and so a larger share of a faster one's time. jemalloc and tcmalloc keep freed memory, and PyTorch's
CPU tuning guide recommends preloading one of them; glibc does the same when told to
(``M_MMAP_MAX = 0``: every block from the heap; ``M_TRIM_THRESHOLD`` 1 GiB: free memory at the heap's top
is kept up to that much before glibc hands it back).

passforge's CPU runtime (an :class:`~passforge.runtime.executor.Executor` built for CPU, so ``passforge.optimize``
and the CLI) and its ``torch.compile`` backend (when a graph is compiled for CPU) call :func:`keep_freed_memory`.
It changes the whole process, for every allocation after it, and it is the trade every retaining allocator
makes: memory freed below a block still in use stays with the process, so its resident size stays near its
peak. :func:`release_freed_memory` hands the free pages back (``malloc_trim``). Blocks of 64 MiB and more
that a thread other than the main one allocates are still fresh mmaps (glibc's per-thread heaps are 64 MiB).

It does nothing, and logs why once, where it cannot or should not act: off Linux with glibc; where another
allocator (jemalloc, tcmalloc) serves ``malloc``; where the user already tuned glibc's malloc through the
environment (``GLIBC_TUNABLES`` with ``glibc.malloc.*``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``). Turn it off with ``PASSFORGE_KEEP_FREED_MEMORY=0`` (read once, at the first
call), the backend option ``keep_freed_memory=False`` or the executor's keyword of the same name.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

ENV_SWITCH = "PASSFORGE_KEEP_FREED_MEMORY"
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before glibc returns memory to the system
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # malloc.h
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def enabled_by_environment() -> bool:
    """False when ``PASSFORGE_KEEP_FREED_MEMORY`` is 0 / false / no / off; True otherwise (the default)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def why_not() -> str | None:
    """Why :func:`keep_freed_memory` leaves malloc alone in this process, or None when it acts."""
    if not enabled_by_environment():
        return f"{ENV_SWITCH}=0"
    if not _on_glibc():
        return "not Linux with glibc (preload jemalloc or tcmalloc for the same effect)"
    tuned = [name for name in _USER_MALLOC_ENV if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"glibc's malloc is already tuned by the environment ({', '.join(tuned)})"
    libc = _libc()
    if libc is None:
        return "libc.so.6 could not be loaded"
    if not _glibc_serves_malloc(libc):
        return "another allocator serves malloc (jemalloc / tcmalloc preloaded?)"
    return None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _glibc_serves_malloc(libc: ctypes.CDLL) -> bool:
    """Whether the ``malloc`` this process calls is glibc's own (not one interposed by ``LD_PRELOAD``)."""
    process_malloc = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    return process_malloc == ctypes.cast(libc.malloc, ctypes.c_void_p).value


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the rest of the process (the first call decides; see the
    module docstring). Returns whether the setting is in effect."""
    reason = why_not()
    if reason is not None:
        log.info("passforge: malloc left as it is (%s)", reason)
        return False
    libc = _libc()
    if not libc.mallopt(_M_MMAP_MAX, 0):
        log.warning("passforge: glibc's mallopt refused M_MMAP_MAX; malloc left as it is")
        return False
    if not libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        log.warning("passforge: glibc's mallopt refused M_TRIM_THRESHOLD; large blocks come from the heap, "
                    "and freed memory is kept up to glibc's default trim threshold")
    log.info("passforge: glibc malloc now keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB); "
             "%s=0 turns this off", ENV_SWITCH)
    return True


def release_freed_memory() -> bool:
    """Hand the free pages of glibc's heaps back to the system (``malloc_trim(0)``), e.g. after a burst of
    long prompts in a process that keeps freed memory. Returns whether any memory was released."""
    libc = _libc() if _on_glibc() else None
    return bool(libc is not None and libc.malloc_trim(0))


def _on_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
