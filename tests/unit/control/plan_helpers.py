"""Real recovery points in a real repository: one full-disk segment per point, as the uploader writes it."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from lifeboat.core.catalog import PointEntry
from lifeboat.core.digest import block_digest, image_digest
from lifeboat.core.segment import SegmentHeader, assemble_segment, encode_record
from lifeboat.core.wire import BatchBuilder, parse_batch

BLOCK_BYTES = 4096
FRAME_BYTES = 1024 * 1024   # the agent's write frame (a frame holds at most 4 MiB)


async def put_point(repo, machine: str, disk: str, data: bytes, point_id: str, seq: int, created: float,
                    consistency: str = "crash", group: str = "", tag: str = "", members: tuple = ()) -> str:
    """Store `data` as disk machine.disk's whole image at point_id; returns the image's SHA-256."""
    disk_id = f"{machine}.{disk}"
    digest = image_digest(b"".join(block_digest(data[a:a + BLOCK_BYTES]) for a in range(0, len(data), BLOCK_BYTES)))
    b = BatchBuilder(disk_id, seq, len(data))
    for offset in range(0, len(data), FRAME_BYTES):
        b.write(offset, data[offset:offset + FRAME_BYTES])
    bookmark = {"point_id": point_id, "machine": machine, "created": created, "consistency": consistency,
                "cycle": seq, "block_size": BLOCK_BYTES, "image_digest": digest}
    if group:
        bookmark.update(group=group, group_tag=tag, group_members=list(members))
    b.bookmark(bookmark)
    _, frames = parse_batch(b.to_bytes(), expected_disk_id=disk_id, expected_seq=seq)
    header = SegmentHeader(disk_id, seq, len(data), len(frames))
    encoded = [encode_record(repo.segment_key, header.encode(), i, f) for i, f in enumerate(frames)]
    await repo.put_segment(disk_id, seq, assemble_segment(repo.segment_key, header, encoded))
    await repo.put_point(PointEntry(point_id=point_id, machine=machine, disk_id=disk_id, seq=seq, frame_index=len(frames) - 1,
                                    disk_size=len(data), created=created, consistency=consistency, cycle=seq,
                                    block_size=BLOCK_BYTES, image_digest=digest, group=group, group_tag=tag,
                                    group_members=tuple(members)))
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def order_script(path: Path, order_file: Path, body: str = "") -> str:
    """A script that appends '<stage> <group>' to order_file (the observed order), then runs `body`."""
    path.write_text(f'#!/bin/sh\necho "$LIFEBOAT_STAGE $LIFEBOAT_PLAN_GROUP" >> {order_file}\n'
                    f'echo "hello from $LIFEBOAT_STAGE $LIFEBOAT_PLAN_GROUP"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def image_files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []
