"""Keep freed memory for reuse on CPU, so a prefill's large buffers are not faulted in again on every call.

glibc's malloc serves every block over 32 MiB as a fresh ``mmap`` and unmaps it on ``free``. A 512-token
prefill of the ~100M LLaMA preset returns 65 MB of fp32 logits, so each call maps, faults in page by page,
zeroes and unmaps them again: milliseconds that no kernel choice wins back, the same on every compiler's
graph, and so a larger share of a faster one's time. jemalloc and tcmalloc keep freed memory, and PyTorch's
CPU tuning guide recommends preloading one of them; glibc does the same when told to
(``M_MMAP_MAX = 0``: every block from the heap; ``M_TRIM_THRESHOLD`` 1 GiB: free memory at the heap's top
is kept up to that much).

passforge's CPU runtime (:class:`~passforge.runtime.executor.Executor`) and its ``torch.compile`` backend call
:func:`keep_freed_memory` when they first run a graph on CPU. It changes the whole process, for every
allocation after it, and it is the trade every retaining allocator makes: a process that peaked keeps up to
1 GiB of freed memory as its own. Turn it off with the backend option ``keep_freed_memory=False``, the
executor's keyword of the same name, or ``PASSFORGE_KEEP_FREED_MEMORY=0`` in the environment (the CLI has no
other switch). Elsewhere than Linux with glibc it does nothing and says so once in the log.
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


def enabled_by_environment() -> bool:
    """False when ``PASSFORGE_KEEP_FREED_MEMORY`` is 0 / false / no / off; True otherwise (the default)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _apply() -> bool:
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        log.info("passforge: keep_freed_memory does nothing here (not Linux with glibc); preload jemalloc or "
                 "tcmalloc for the same effect")
        return False
    libc = ctypes.CDLL("libc.so.6")
    applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if applied:
        log.info("passforge: glibc malloc now keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB); "
                 "%s=0 turns this off", ENV_SWITCH)
    else:
        log.warning("passforge: glibc's mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD; memory is left as it was")
    return applied


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the rest of the process (once; see the module docstring).

    Returns whether it is in effect: False where ``PASSFORGE_KEEP_FREED_MEMORY=0`` says no, off glibc, or if
    ``mallopt`` refused."""
    return enabled_by_environment() and _apply()
