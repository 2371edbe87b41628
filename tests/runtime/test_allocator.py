"""runtime.allocator: after keep_freed_memory() a large tensor comes from glibc's heap, not a fresh mmap, and
release_freed_memory() hands the freed pages back; it leaves malloc alone when switched off, when the user
tuned glibc's malloc, or when another allocator serves malloc; the CPU runtime and the torch.compile backend
call it, and not when told no."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from passforge.runtime import allocator
from passforge.runtime.executor import Executor

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")

# mallinfo2().hblks is the number of blocks glibc holds as their own mmap; a 64 MiB tensor is over glibc's
# largest mmap threshold (32 MiB), so it is one more such block unless the heap serves it. Resident MiB from
# /proc/self/statm: 512 MiB freed under a small live block stays resident until released.
PROBE = """
import ctypes, json, os, torch
from passforge.runtime.allocator import keep_freed_memory, release_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_blocks_for_a_large_tensor():
    before = libc.mallinfo2().hblks
    held = torch.empty(64 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblks - before

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

default = mmapped_blocks_for_a_large_tensor()
applied = keep_freed_memory()
after = mmapped_blocks_for_a_large_tensor()
blocks = [torch.ones(64 << 20, dtype=torch.uint8) for _ in range(8)]
pin = torch.ones(1024)  # a live block above the freed ones: trimming the heap's top cannot reach them
del blocks
kept = resident_mib()
released = release_freed_memory()
print(json.dumps({"default": default, "applied": applied, "after": after, "released": released,
                  "kept_mib": kept, "resident_mib": resident_mib()}))
"""


def _probe(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, "PASSFORGE_KEEP_FREED_MEMORY": "1", **env},
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_after_keeping_freed_memory_a_large_tensor_is_not_a_fresh_mmap_until_released() -> None:
    got = _probe({})
    assert (got["default"], got["applied"], got["after"]) == (1, True, 0)
    assert got["released"] and got["kept_mib"] - got["resident_mib"] > 400  # of the 512 MiB freed


@needs_glibc
@pytest.mark.parametrize(
    "env", [{"PASSFORGE_KEEP_FREED_MEMORY": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"},
            {"MALLOC_MMAP_MAX_": "65536"}],
    ids=["switched off", "tunables", "malloc env"],
)
def test_malloc_is_left_alone_when_switched_off_or_tuned_by_the_user(env: dict[str, str]) -> None:
    got = _probe(env)
    assert (got["default"], got["applied"], got["after"]) == (1, False, 1)


@needs_glibc
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the preloaded allocator")
def test_malloc_is_left_alone_when_another_allocator_serves_it(tmp_path: Path) -> None:
    """An ``LD_PRELOAD``ed malloc (here glibc's own behind new symbols, as jemalloc / tcmalloc interpose)."""
    source = tmp_path / "interposed.c"
    source.write_text(
        "#include <stddef.h>\n"
        "void *__libc_malloc(size_t); void __libc_free(void *); void *__libc_calloc(size_t, size_t);\n"
        "void *__libc_realloc(void *, size_t);\n"
        "void *malloc(size_t n) { return __libc_malloc(n); }\n"
        "void free(void *p) { __libc_free(p); }\n"
        "void *calloc(size_t n, size_t m) { return __libc_calloc(n, m); }\n"
        "void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }\n"
    )
    library = tmp_path / "libinterposed.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    code = "from passforge.runtime import allocator; print(allocator.keep_freed_memory(), allocator.why_not())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PASSFORGE_KEEP_FREED_MEMORY": "1",
                                                              "LD_PRELOAD": str(library)},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False another allocator serves malloc (jemalloc / tcmalloc preloaded?)"


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("1", True), ("0", False), (" Off ", False),
                                                ("false", False), ("yes", True)])
def test_environment_switch_values(monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV_SWITCH, value)
    assert allocator.enabled_by_environment() is enabled


@pytest.mark.parametrize("keep", [True, False])
def test_the_cpu_executor_keeps_freed_memory_unless_told_no(
    monkeypatch: pytest.MonkeyPatch, llama_graph: torch.fx.GraphModule, keep: bool
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(None) or True)
    Executor(llama_graph, "cpu", keep_freed_memory=keep)
    assert len(calls) == keep
