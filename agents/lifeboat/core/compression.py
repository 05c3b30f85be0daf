"""zstd compression with one compressor per thread (zstandard objects are not thread-safe)."""

from __future__ import annotations

import threading

import zstandard

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
# Level 1: ratio 2.60 at ≈ 800 MB/s per core on mixed disk data; level 3 costs 1.8× the CPU
# for 1% more (shared/PERF-LIMITS.md). The uploader is CPU-bound, so speed wins.
ZSTD_LEVEL = 1

_local = threading.local()


def compress(data: bytes | memoryview) -> bytes:
    comp = getattr(_local, "c", None)
    if comp is None:
        comp = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return comp.compress(data)


def decompress(data: bytes, expected_len: int) -> bytes:
    """Decompress a frame whose plaintext length is known; a different length is an error."""
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    out = d.decompress(data, max_output_size=expected_len)
    if len(out) != expected_len:
        raise ValueError(f"decompressed {len(out)} bytes, index says {expected_len}")
    return out
