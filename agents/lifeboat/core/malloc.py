"""Pin glibc's malloc thresholds (the daemons at start, the CLI's failover); imports nothing but ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util

# malloc.h parameters (shared/PERF-LIMITS.md, "First: glibc malloc"). Its own module, so that the CLI
# can pin without importing core.runtime (aiohttp: ~0.1 s of start-up a failover does not need).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
ARENA_MAX = 2


def pin_malloc() -> bool:
    """Keep freed ~1 MiB chunk buffers in the heap instead of returning them to the kernel.

    With glibc's dynamic thresholds each one is page-faulted in again; pinning doubles encrypt and
    upload throughput here, and saves a failover ~0.2 s of system time per GiB.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        ok &= libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def trim() -> bool:
    """Give the heap's free pages back to the kernel (malloc_trim(0)). With the pinned thresholds freed
    buffers otherwise stay resident: the agent calls this once per acknowledged batch, which costs
    the next batch its page faults but keeps its peak RSS near what it holds."""
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0))
    except (OSError, AttributeError):
        return False
