"""Fuzzing helpers: structure-aware byte mutations and an allocation bound (tracemalloc)."""

from __future__ import annotations

import struct
import tracemalloc
from contextlib import contextmanager

from hypothesis import strategies as st

# Values a length or count field is set to: edges of every integer width, and "huge".
EDGE_VALUES = [0, 1, 2, 7, 8, 511, 512, 4095, 4096, 65535, 65536, 65537, 2**24, 2**31 - 1, 2**31, 2**32 - 1,
               2**48, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutated(draw, valid: bytes, fields: tuple[tuple[int, str], ...] = ()) -> bytes:
    """`valid` with 1-4 mutations: bit flips, truncation, extension, inserted/deleted bytes, and
    `fields` ((offset, struct format) of length/count fields) set to edge values."""
    data = bytearray(valid)
    ops = ["flip", "truncate", "extend", "insert", "delete", "overwrite"] + (["field"] * 3 if fields else [])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(ops))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i: i + draw(st.integers(1, 16))]
        elif op == "overwrite" and data:
            i = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i: i + len(chunk)] = chunk
        elif op == "field":
            offset, fmt = draw(st.sampled_from(fields))
            size = struct.calcsize(fmt)
            if offset + size <= len(data):
                bits = size * 8
                value = draw(st.sampled_from([v for v in EDGE_VALUES if v < 2**bits]))
                value = (value - (1 << bits)) if fmt[-1].islower() and value >= 1 << (bits - 1) else value
                struct.pack_into(fmt, data, offset, value)
    return bytes(data)


class AllocationBound(AssertionError):
    pass


@contextmanager
def bounded_allocation(limit_bytes: int, what: str = "decoder"):
    """Fail when the code in the block allocates more than `limit_bytes` at its peak (Python heap)."""
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if peak > limit_bytes:
            raise AllocationBound(f"{what} allocated {peak} bytes at its peak, bound {limit_bytes}")
