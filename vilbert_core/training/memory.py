"""Process memory of training: keep the memory of freed tensors from piling up in the C heap."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc malloc.h: the mallopt parameter for the mmap threshold


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve allocations of threshold_bytes or more with mmap, so a freed tensor's pages go straight back.

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB) each time such a block is freed;
    later tensors of those sizes then come from the heap, where the gaps that freed activations and
    gradients leave between live blocks stay resident. A training step of the paper model kept 0.5-0.9
    GiB of such gaps (BENCHMARKS.md). Setting the threshold fixes it. Returns False, changing nothing,
    where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt parameters are glibc's own numbers
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
