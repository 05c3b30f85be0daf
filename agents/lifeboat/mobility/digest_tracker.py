"""Digest tracker: read every block, compare its xxh3-128 with the map, emit changed extents as batches.

Always available, needs nothing from the kernel; it is the resync path and the test oracle for
the faster trackers. Runs in a worker thread; batches go to the sender through a bounded queue.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable

from ..core.digest import DIGEST_BYTES, block_digest, image_digest, zero_block_digest
from ..core.wire import BatchBuilder
from .digest_map import DigestMap


def device_size(path: str) -> int:
    """Size in bytes of an image file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size
    finally:
        os.close(fd)


@dataclass
class PendingBatch:
    builder: BatchBuilder
    block_ranges: list[tuple[int, int]] = field(default_factory=list)  # (first block, count) it rewrites
    last: bool = False


@dataclass
class ScanResult:
    digests: bytearray
    last_seq: int
    changed_bytes: int
    zero_bytes: int
    read_bytes: int


class ScanAborted(Exception):
    pass


def whole_disk(dmap: DigestMap) -> list[tuple[int, int]]:
    return [(0, -(-dmap.disk_size // dmap.block_size))]


def scan_disk(path: str, disk_id: str, dmap: DigestMap, first_seq: int, extent_max: int, batch_bytes: int,
              bookmark: Callable[[str], dict], put: Callable[[PendingBatch], None],
              aborted: Callable[[], bool], ranges: list[tuple[int, int]] | None = None,
              readinto: Callable[[memoryview, int], int] | None = None) -> ScanResult:
    """Compare the blocks in `ranges` (default: all) with the map; put() full batches; the last carries the bookmark.

    A change tracker narrows `ranges` to the blocks it saw written; reading them and comparing
    digests keeps the map exact, so over-reported blocks cost a read but are not sent. `readinto`
    reads from a snapshot instead of `path`. bookmark(image_digest) returns the point's bookmark
    fields; the image digest is that of the map after this scan, i.e. of exactly the bytes the
    replica will hold at the point.
    """
    bs = dmap.block_size
    size = dmap.disk_size
    digests = bytearray(dmap.digests)
    zero_full, zero_tail = zero_block_digest(bs), None
    seq = first_seq
    builder = BatchBuilder(disk_id, seq, size, compress=True)
    pending = PendingBatch(builder)
    buf = bytearray(extent_max)
    view = memoryview(buf)
    changed = zeros = read = 0
    full = ranges is None
    ranges = whole_disk(dmap) if full else ranges
    fd = os.open(path, os.O_RDONLY) if readinto is None else -1
    if readinto is None:
        def readinto(v: memoryview, offset: int) -> int:
            return os.preadv(fd, [v], offset)
        if full:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    try:
        for first, count in ranges:
            offset, end = first * bs, min((first + count) * bs, size)
            while offset < end:
                if aborted():
                    raise ScanAborted()
                want = min(extent_max, end - offset)
                got = readinto(view[:want], offset)
                if got != want:
                    raise OSError(f"short read on {path} at {offset}: {got} of {want} bytes (disk shrank?)")
                read += got
                run_kind, run_start = None, 0
                nblocks = -(-want // bs)
                first_block = offset // bs
                for j in range(nblocks + 1):
                    kind = None
                    if j < nblocks:
                        chunk = view[j * bs: min((j + 1) * bs, want)]
                        d = block_digest(chunk)
                        i = first_block + j
                        if d != digests[i * DIGEST_BYTES: (i + 1) * DIGEST_BYTES]:
                            if len(chunk) == bs:
                                is_zero = d == zero_full
                            else:
                                zero_tail = zero_tail or zero_block_digest(len(chunk))
                                is_zero = d == zero_tail
                            kind = "zero" if is_zero else "data"
                            digests[i * DIGEST_BYTES: (i + 1) * DIGEST_BYTES] = d
                    if kind != run_kind:
                        if run_kind is not None:  # close the run [run_start, j)
                            a, b = run_start * bs, min(j * bs, want)
                            if run_kind == "data":
                                builder.write(offset + a, bytes(view[a:b]))
                                changed += b - a
                            else:
                                builder.zero(offset + a, b - a)
                                zeros += b - a
                            pending.block_ranges.append((first_block + run_start, j - run_start))
                        run_kind, run_start = kind, j
                offset += want
                if builder.payload_bytes >= batch_bytes:
                    put(pending)
                    seq += 1
                    builder = BatchBuilder(disk_id, seq, size, compress=True)
                    pending = PendingBatch(builder)
    finally:
        if fd >= 0:
            os.close(fd)
    builder.bookmark(bookmark(image_digest(digests)))
    pending.last = True
    put(pending)
    return ScanResult(digests, seq, changed, zeros, read)
