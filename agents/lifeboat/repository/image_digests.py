"""Per-block digests of an image as it is laid down, so that proving it needs no second full read."""

from __future__ import annotations

import os

from ..core.digest import DIGEST_BYTES, block_digest, image_digest

REREAD_BUFFER_BYTES = 4 * 1024 * 1024


def block_digests(data, block_size: int) -> bytes:
    """Concatenated digests of `data` cut into blocks (the last one may be short)."""
    view = memoryview(data)
    return b"".join([block_digest(view[a: a + block_size]) for a in range(0, len(view), block_size)])


def write_digests(data, offset: int, block_size: int) -> tuple[bytes, int]:
    """(digests, first block) of a write of `data` at disk `offset`: the blocks from the first block
    boundary at or after `offset`. Run it where the plaintext is decoded (a worker thread), so that the
    digests are taken from the very bytes that are then written."""
    skip = -offset % block_size
    return block_digests(memoryview(data)[skip:], block_size), (offset + skip) // block_size


class ImageDigests:
    """The digest of every block of an image, updated in write order; blocks it cannot vouch for are
    marked stale and read back once at the end.

    Invariant: for every block not marked stale, `digests` holds the digest of the bytes the last
    write to that block laid down in full. A write that covers a block only partly marks it stale (its
    final bytes depend on what was there), and so do blocks nobody wrote on a block device (old data).
    """

    def __init__(self, size: int, block_size: int, all_stale: bool) -> None:
        self.size = size
        self.block_size = block_size
        self.blocks = -(-size // block_size)
        self.tail = size - (self.blocks - 1) * block_size if self.blocks else 0  # bytes in the last block
        self._zero = block_digest(bytes(block_size))
        self._zero_tail = block_digest(bytes(self.tail)) if self.tail != block_size else self._zero
        self.digests = bytearray(self._zero * self.blocks)
        if self.blocks:
            self.digests[-DIGEST_BYTES:] = self._zero_tail
        self.stale = bytearray(b"\x01" * self.blocks if all_stale else self.blocks)
        self.reread_bytes = 0

    def _full_range(self, offset: int, length: int) -> tuple[int, int, int, int]:
        """(first, end) blocks wholly covered by [offset, offset+length) clipped to the image, and the
        partly covered blocks at either edge as (first_partial, last_partial), -1 when none."""
        bs = self.block_size
        end = min(offset + length, self.size)
        if offset >= end:
            return 0, 0, -1, -1
        first = -(-offset // bs)
        last_end = self.blocks if end == self.size else end // bs
        head = offset // bs if offset % bs else -1
        tail = end // bs if end != self.size and end % bs else -1
        return first, max(first, last_end), head, tail

    def wrote(self, offset: int, length: int, digests: bytes | None, digests_from: int) -> None:
        """Record a write of `length` bytes at `offset`. `digests` are the digests of the written data's
        blocks starting at block `digests_from` (None: the write was zeros)."""
        first, end, head, tail = self._full_range(offset, length)
        for b in (head, tail):
            if 0 <= b < self.blocks:
                self.stale[b] = 1
        if end <= first:
            return
        if digests is None:
            self.set_zero(first, end)
        else:
            skip = (first - digests_from) * DIGEST_BYTES
            self.digests[first * DIGEST_BYTES: end * DIGEST_BYTES] = digests[skip: skip + (end - first) * DIGEST_BYTES]
            self.stale[first:end] = bytes(end - first)
        if end == self.blocks and digests is not None and offset + length > self.size:
            # The write runs past the image's end (an older, larger geometry): the digest of its last
            # block is of more bytes than the image keeps.
            self.stale[end - 1] = 1

    def set_zero(self, first: int, end: int) -> None:
        self.digests[first * DIGEST_BYTES: end * DIGEST_BYTES] = self._zero * (end - first)
        if end == self.blocks:
            self.digests[-DIGEST_BYTES:] = self._zero_tail
        self.stale[first:end] = bytes(end - first)

    def finish(self, fd: int) -> str:
        """Read back the stale blocks from fd (after fsync) and return the image digest."""
        bs = self.block_size
        buf = bytearray(max(bs, REREAD_BUFFER_BYTES) // bs * bs)
        view = memoryview(buf)
        per_read = len(buf) // bs
        b = self.stale.find(1)
        while b != -1:
            run_end = self.stale.find(0, b)
            run_end = self.blocks if run_end == -1 else run_end
            while b < run_end:
                n_blocks = min(per_read, run_end - b)
                offset = b * bs
                want = min(n_blocks * bs, self.size - offset)
                got = os.preadv(fd, [view[:want]], offset)
                if got != want:
                    raise OSError(f"short read of the image at {offset}: {got} of {want} bytes")
                self.digests[b * DIGEST_BYTES: (b + n_blocks) * DIGEST_BYTES] = block_digests(view[:want], bs)
                self.reread_bytes += want
                b += n_blocks
            b = self.stale.find(1, run_end)
        return image_digest(self.digests)
