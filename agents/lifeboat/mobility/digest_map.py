"""Persisted per-block digest map: what the repository holds for each block of a disk.

Specified in FORMATS.md ("Digest map"). Entries are updated in place to UNKNOWN before a batch
is sent and the whole map is replaced atomically when a cycle's batches are all acknowledged,
so after any crash every block whose replica state is uncertain reads as UNKNOWN and is resent.
A damaged entry can only cause a resend, never a skipped block.
"""

from __future__ import annotations

import os
import struct

import xxhash

from ..core.digest import DIGEST_BYTES, zero_block_digest

DIGEST_MAP_MAGIC = b"LBDM"
DIGEST_MAP_VERSION = 1
# magic, version, flags, reserved, block_size, disk_size, seq, cycle, header_xxh3_64
DIGEST_MAP_HEADER = struct.Struct("<4sBBHIQQQQ")
DIGEST_MAP_HEADER_BYTES = 64  # entries start here (header padded with zeros)
UNKNOWN_DIGEST = bytes(DIGEST_BYTES)


def block_count(disk_size: int, block_size: int) -> int:
    return -(-disk_size // block_size)


class DigestMap:
    def __init__(self, path: str, block_size: int, disk_size: int, digests: bytearray, seq: int, cycle: int) -> None:
        self.path = path
        self.block_size = block_size
        self.disk_size = disk_size
        self.digests = digests
        self.seq = seq
        self.cycle = cycle

    @classmethod
    def fresh(cls, path: str, block_size: int, disk_size: int, replica_is_zero: bool) -> "DigestMap":
        """A new map: every block equals zero (a new replica starts zero-filled) or is UNKNOWN."""
        n = block_count(disk_size, block_size)
        if replica_is_zero:
            digests = bytearray(zero_block_digest(block_size) * n)
            tail = disk_size - (n - 1) * block_size
            if tail != block_size:
                digests[-DIGEST_BYTES:] = zero_block_digest(tail)
        else:
            digests = bytearray(UNKNOWN_DIGEST * n)
        return cls(path, block_size, disk_size, digests, 0, 0)

    @classmethod
    def load(cls, path: str) -> "DigestMap | None":
        """None if missing or the header is damaged (the caller then resyncs)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if len(data) < DIGEST_MAP_HEADER_BYTES:
            return None
        magic, version, _f, _r, bs, size, seq, cycle, check = DIGEST_MAP_HEADER.unpack_from(data)
        if magic != DIGEST_MAP_MAGIC or version != DIGEST_MAP_VERSION:
            return None
        if check != xxhash.xxh3_64_intdigest(data[: DIGEST_MAP_HEADER.size - 8]):
            return None
        n = block_count(size, bs)
        body = bytearray(data[DIGEST_MAP_HEADER_BYTES:])
        if len(body) != n * DIGEST_BYTES:
            return None
        return cls(path, bs, size, body, seq, cycle)

    def header(self) -> bytes:
        head = DIGEST_MAP_HEADER.pack(DIGEST_MAP_MAGIC, DIGEST_MAP_VERSION, 0, 0, self.block_size, self.disk_size,
                                      self.seq, self.cycle, 0)[:-8]
        head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        return head.ljust(DIGEST_MAP_HEADER_BYTES, b"\0")

    def save(self) -> None:
        """Replace the file atomically (temp file, fsync, rename, fsync dir)."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.header())
            f.write(self.digests)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark_unknown(self, ranges: list[tuple[int, int]]) -> None:
        """Before sending blocks, make the map forget them (write-ahead of the send), on disk and in
        memory: if the cycle fails after the server took the batch, the next cycle must resend them
        even if their content went back to what the old digest says."""
        if not ranges:
            return
        for first, count in ranges:
            self.digests[first * DIGEST_BYTES: (first + count) * DIGEST_BYTES] = UNKNOWN_DIGEST * count
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for first, count in ranges:
                os.pwrite(fd, UNKNOWN_DIGEST * count, DIGEST_MAP_HEADER_BYTES + first * DIGEST_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, i: int) -> bytes:
        return bytes(self.digests[i * DIGEST_BYTES: (i + 1) * DIGEST_BYTES])
