"""return_freed_memory_to_os: the C allocator keeps serving large blocks with mmap after large frees."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MEMORY = Path(__file__).resolve().parents[1] / "vilbert_core" / "training" / "memory.py"

# In a fresh process (the allocator setting is process-wide): free a 4 MiB block, which makes glibc raise
# its mmap threshold to 4 MiB, then allocate 1 MiB and report whether it was mmapped (returned to the OS
# the moment it is freed) or carved from the heap (where freed gaps stay resident).
PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, sys
    spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    if sys.argv[2] == "set":
        assert memory.return_freed_memory_to_os()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    libc.free(libc.malloc(4 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(1 << 20)
    print(libc.mallinfo2().hblks - before)
    """
)


def _mmapped_blocks(mode: str) -> int:
    """New mmapped blocks after the probe's 1 MiB allocation, with the setting ("set") or without ("default")."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(MEMORY), mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def test_large_blocks_stay_mmapped_after_large_frees() -> None:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    assert _mmapped_blocks("default") == 0  # glibc's own rule: the 1 MiB block comes from the heap
    assert _mmapped_blocks("set") == 1
