"""Pin glibc's malloc thresholds for the CLI's bulk data paths (failover), without importing a daemon's runtime."""

from __future__ import annotations

import ctypes
import ctypes.util

# malloc.h parameters; the values are core.runtime.pin_malloc's (shared/PERF-LIMITS.md, "First: glibc
# malloc"). That module imports aiohttp at load, ~0.1 s of start-up a failover does not need.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
ARENA_MAX = 2


def pin_malloc() -> bool:
    """Keep freed ~1 MiB frame buffers in the heap: a failover decodes one per frame, and with glibc's
    dynamic thresholds each is page-faulted in again (measured: ~0.2 s of system time per GiB)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        ok &= libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        return bool(ok)
    except (OSError, AttributeError):
        return False
