"""A cycle's snapshot served from the change log's kept data (freeze-copy), the live disk for the rest."""

from __future__ import annotations

import os
from typing import Iterable

from .snapshot import Snapshot


class KeptDataSnapshot(Snapshot):
    """Blocks whose data the change log kept are served from it (newest epoch wins); any other
    block is read from the live device, so a point that needs one is not consistent."""

    provider = "freeze-copy"

    def __init__(self, disk_id: str, tag: str, device_path: str, block_size: int,
                 data: Iterable[tuple[int, bytes]], live_ranges: list[tuple[int, int]]) -> None:
        super().__init__(disk_id, tag)
        self.block_size = block_size
        self.blocks: dict[int, memoryview] = {}
        for offset, chunk in data:  # oldest epoch first: later items overwrite earlier ones
            view = memoryview(chunk)
            for i in range(0, len(view), block_size):
                self.blocks[(offset + i) // block_size] = view[i:i + block_size]
        self.live_ranges = live_ranges
        self.consistent = not live_ranges
        self._fd = os.open(device_path, os.O_RDONLY)

    def readinto(self, view: memoryview, offset: int) -> int:
        bs = self.block_size
        done = 0
        while done < len(view):
            pos = offset + done
            block, within = divmod(pos, bs)
            kept = self.blocks.get(block)
            if kept is not None:
                n = min(len(kept) - within, len(view) - done)
                view[done:done + n] = kept[within:within + n]
            else:
                n = min(bs - within, len(view) - done)
                # The block device's page cache can be stale under a mounted filesystem.
                os.posix_fadvise(self._fd, pos, n, os.POSIX_FADV_DONTNEED)
                got = os.preadv(self._fd, [view[done:done + n]], pos)
                if got <= 0:
                    return done
                n = got
            done += n
        return done

    def _release(self) -> None:
        self.blocks.clear()
        os.close(self._fd)
