"""Write a disk's log straight into a repository, as the uploader does, for tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
import random

from lifeboat.core.catalog import PointEntry
from lifeboat.core.digest import block_digest, image_digest
from lifeboat.core.segment import SegmentHeader, assemble_segment, encode_record
from lifeboat.core.wire import FRAME_BOOKMARK, FRAME_WRITE, FRAME_ZERO, Frame


class SyntheticDisk:
    """An in-memory image of a disk plus its log in `repo`: each `segment()` is one uploaded batch."""

    def __init__(self, repo, machine: str, disk: str, size: int, block_size: int = 4096, seed: int = 1) -> None:
        self.repo = repo
        self.machine = machine
        self.disk_id = f"{machine}.{disk}"
        self.size = size
        self.block_size = block_size
        self.image = bytearray(size)
        self.seq = 0
        self.rng = random.Random(seed)

    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()

    def random_writes(self, count: int, length: int = 16384) -> list[tuple[int, bytes]]:
        """`count` writes of mixed content (random or repetitive text) at aligned offsets."""
        out = []
        for _ in range(count):
            off = self.rng.randrange(0, self.size - length) // 4096 * 4096
            data = self.rng.randbytes(length) if self.rng.random() < 0.5 else (b"lifeboat %d " % off) * (length // 12)
            out.append((off, data.ljust(length, b"\0")[:length]))
        return out

    async def segment(self, writes: list[tuple[int, bytes]], point_id: str | None = None, created: float = 0.0,
                      consistency: str = "crash", zeros: list[tuple[int, int]] = (), group: str = "",
                      group_tag: str = "", group_members: tuple[str, ...] = ()) -> str:
        """Append one segment (writes, zero ranges, then a bookmark if `point_id`); returns the image's SHA-256."""
        self.seq += 1
        frames = []
        for off, data in writes:
            frames.append(Frame(FRAME_WRITE, off, len(data), data))
            self.image[off:off + len(data)] = data
        for off, length in zeros:
            frames.append(Frame(FRAME_ZERO, off, length))
            self.image[off:off + length] = bytes(length)
        digest = ""
        if point_id:
            view = memoryview(self.image)
            digest = image_digest(b"".join(block_digest(view[a:a + self.block_size])
                                           for a in range(0, self.size, self.block_size)))
            bookmark = {"point_id": point_id, "machine": self.machine, "created": created,
                        "consistency": consistency, "cycle": self.seq, "block_size": self.block_size,
                        "image_digest": digest}
            frames.append(Frame(FRAME_BOOKMARK, 0, 0, json.dumps(bookmark).encode()))
        header = SegmentHeader(self.disk_id, self.seq, self.size, len(frames))
        hb = header.encode()
        parts = assemble_segment(self.repo.segment_key, header,
                                 [encode_record(self.repo.segment_key, hb, i, f) for i, f in enumerate(frames)])
        await self.repo.put_segment(self.disk_id, self.seq, parts)
        if point_id:
            await self.repo.put_point(PointEntry(
                point_id=point_id, machine=self.machine, disk_id=self.disk_id, seq=self.seq,
                frame_index=len(frames) - 1, disk_size=self.size, created=created, consistency=consistency,
                cycle=self.seq, block_size=self.block_size, image_digest=digest, group=group, group_tag=group_tag,
                group_members=tuple(group_members)))
        return self.sha256()
