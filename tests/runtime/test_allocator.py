"""runtime.allocator: after keep_freed_memory() a large tensor comes from glibc's heap, not a fresh mmap; the
environment switch turns it off; the CPU runtime and the torch.compile backend call it, and not when told no."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from passforge.runtime import allocator
from passforge.runtime.executor import Executor

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# mallinfo2().hblks is the number of blocks glibc holds as their own mmap; a 64 MiB tensor is over glibc's
# largest mmap threshold (32 MiB), so it is one more such block unless the heap serves it
PROBE = """
import ctypes, json, torch
from passforge.runtime.allocator import keep_freed_memory

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

default = mmapped_blocks_for_a_large_tensor()
applied = keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "after": mmapped_blocks_for_a_large_tensor()}))
"""


def _probe(**env: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_after_keeping_freed_memory_a_large_tensor_is_not_a_fresh_mmap() -> None:
    assert _probe(PASSFORGE_KEEP_FREED_MEMORY="1") == {"default": 1, "applied": True, "after": 0}


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_environment_switch_leaves_malloc_as_it_is() -> None:
    assert _probe(PASSFORGE_KEEP_FREED_MEMORY="0") == {"default": 1, "applied": False, "after": 1}


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
