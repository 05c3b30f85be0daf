"""Build, list, read and delete checkpoints (FORMATS.md section 8) of a disk's log."""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Awaitable, Callable

from ..core import checkpoint as ckfmt
from ..core.checkpoint import Manifest
from ..core.errors import IntegrityError, LifeboatError, ObjectNotFound
from ..core.segment import SegmentReader
from ..core.wire import FRAME_WRITE, FRAME_ZERO
from .repo import Repository, segment_name

CHUNK_UPLOAD_CONCURRENCY = 4   # chunks sealed and uploaded at once (memory: this many chunks)


class CheckpointError(LifeboatError):
    """Cannot build checkpoint {}: {}."""

    exit_code = 74


async def delete_quietly(repo: Repository, name: str) -> bool:
    """Delete an object; one already gone (an earlier, interrupted pass) is not an error."""
    try:
        await repo.backend.delete(name)
        return True
    except ObjectNotFound:
        return False


async def list_checkpoint_objects(repo: Repository, disk_id: str) -> dict[int, list[str]]:
    """Every object under checkpoints/<disk>/, by checkpoint seq (complete or not)."""
    out: dict[int, list[str]] = {}
    for name in await repo.backend.list(f"checkpoints/{disk_id}/"):
        parsed = ckfmt.parse_object_name(name)
        if parsed is not None and parsed[0] == disk_id:
            out.setdefault(parsed[1], []).append(name)
    return out


async def list_checkpoints(repo: Repository, disk_id: str) -> list[int]:
    """Seqs of the disk's published checkpoints (those whose manifest exists), increasing."""
    objects = await list_checkpoint_objects(repo, disk_id)
    return sorted(s for s, names in objects.items() if ckfmt.manifest_name(disk_id, s) in names)


async def read_manifest(repo: Repository, disk_id: str, seq: int) -> Manifest:
    name = ckfmt.manifest_name(disk_id, seq)
    manifest = await asyncio.to_thread(ckfmt.open_manifest, repo.checkpoint_key, name, await repo.backend.get(name))
    if manifest.disk_id != disk_id:
        raise IntegrityError(name, f"manifest belongs to disk {manifest.disk_id!r}")
    return manifest


async def read_chunk(repo: Repository, manifest: Manifest, index: int) -> bytes:
    name = ckfmt.chunk_name(manifest.disk_id, manifest.seq, index)
    try:
        data = await repo.backend.get(name)
    except ObjectNotFound:
        raise IntegrityError(name, "the chunk its manifest lists is missing") from None
    return await asyncio.to_thread(ckfmt.open_chunk, repo.checkpoint_key, name, manifest, index, data)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Write zeros (block devices hold old data; image files are fresh and sparse already)."""
    zeros = bytes(min(1 << 20, length))
    while length:
        n = os.pwrite(fd, zeros[: min(len(zeros), length)], offset)
        offset += n
        length -= n


async def write_checkpoint_to(repo: Repository, manifest: Manifest, fd: int, size: int, is_device: bool) -> int:
    """Write the checkpoint's image into fd (clipped to `size`); one chunk fetched ahead. Returns bytes written."""
    present = set(manifest.present)
    written = 0

    async def fetch(i: int) -> bytes | None:
        return await read_chunk(repo, manifest, i) if i in present else None

    limit = min(manifest.chunk_count, -(-size // manifest.chunk_bytes))
    nxt = asyncio.ensure_future(fetch(0)) if limit else None
    try:
        for i in range(limit):
            data = await nxt
            nxt = asyncio.ensure_future(fetch(i + 1)) if i + 1 < limit else None
            offset = i * manifest.chunk_bytes
            end = min(offset + manifest.chunk_bytes, size, manifest.disk_size)
            if data is not None:
                await asyncio.to_thread(os.pwrite, fd, memoryview(data)[: end - offset], offset)
                written += end - offset
            elif is_device:
                await asyncio.to_thread(zero_range, fd, offset, end - offset)
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
    return written


def _apply_segment(reader: SegmentReader, fd: int) -> None:
    for i, e in enumerate(reader.entries):
        if e.kind == FRAME_WRITE:
            os.pwrite(fd, reader.payload(i), e.disk_offset)
        elif e.kind == FRAME_ZERO:
            zero_range(fd, e.disk_offset, e.length)


async def _seal_and_put(repo: Repository, disk_id: str, seq: int, index: int, offset: int, build_id: bytes,
                        plain: bytes) -> None:
    name = ckfmt.chunk_name(disk_id, seq, index)
    blob = await asyncio.to_thread(ckfmt.seal_chunk, repo.checkpoint_key, name, index, offset, build_id, plain)
    await repo.backend.put(name, blob)


async def build_checkpoint(repo: Repository, disk_id: str, seq: int, work_dir: str | None = None,
                           chunk_bytes: int = ckfmt.CHUNK_BYTES,
                           between: Callable[[str], Awaitable[None]] | None = None) -> tuple[Manifest, list[str]]:
    """Publish checkpoint `seq` of `disk_id`: the image after segments 1..seq.

    Starts from the newest published checkpoint at or before `seq`, replays the segments after it into
    a sparse temporary image in `work_dir` (memory stays at one segment plus a few chunks), then uploads
    the non-zero chunks and, only after all of them, the manifest. Returns the manifest and the names of
    every object written. `between(step)` is a test hook run between the publish steps.
    """
    existing = await list_checkpoints(repo, disk_id)
    if seq in existing:
        return await read_manifest(repo, disk_id, seq), []
    base = max((c for c in existing if c < seq), default=0)
    have = set(await repo.list_segments(disk_id))
    needed = range(base + 1, seq + 1)
    missing = [s for s in needed if s not in have]
    if missing:
        raise CheckpointError(ckfmt.manifest_name(disk_id, seq),
                              f"segment {segment_name(disk_id, missing[0])} is missing ({len(missing)} of the "
                              f"{len(needed)} segments after {'checkpoint ' + str(base) if base else 'the log start'})"
                              "; run 'lifeboat verify'")
    last = await repo.read_segment(disk_id, seq)
    disk_size = last.header.disk_size
    del last
    build_id = os.urandom(16)
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lifeboat-checkpoint-", dir=work_dir) as tmp:
        path = os.path.join(tmp, "image")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, disk_size)
            if base:
                await write_checkpoint_to(repo, await read_manifest(repo, disk_id, base), fd, disk_size, False)
            for s in needed:
                reader = await repo.read_segment(disk_id, s)
                await asyncio.to_thread(_apply_segment, reader, fd)
                del reader
            os.ftruncate(fd, disk_size)  # a frame of an older, larger geometry must not widen the image
            present: list[int] = []
            zeros = memoryview(bytes(chunk_bytes))
            count = -(-disk_size // chunk_bytes)
            pending: set[asyncio.Task] = set()
            try:
                for i in range(count):
                    offset = i * chunk_bytes
                    plain = await asyncio.to_thread(os.pread, fd, min(chunk_bytes, disk_size - offset), offset)
                    if plain == zeros[: len(plain)]:
                        continue  # sparse: a zero chunk is not stored
                    present.append(i)
                    written.append(ckfmt.chunk_name(disk_id, seq, i))
                    while len(pending) >= CHUNK_UPLOAD_CONCURRENCY:
                        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            t.result()
                    pending.add(asyncio.ensure_future(_seal_and_put(repo, disk_id, seq, i, offset, build_id, plain)))
                if pending:
                    for t in asyncio.as_completed(pending):
                        await t
                    pending = set()
            finally:
                for t in pending:
                    t.cancel()
        finally:
            os.close(fd)
    if between:
        await between("chunks_published")
    manifest = Manifest(disk_id, seq, disk_size, chunk_bytes, build_id, tuple(present))
    name = ckfmt.manifest_name(disk_id, seq)
    await repo.backend.put(name, ckfmt.seal_manifest(repo.checkpoint_key, manifest))
    written.append(name)
    # Read back what was published (restic verifyHeader): a store that mangled it fails here, not at failover.
    if await read_manifest(repo, disk_id, seq) != manifest:
        raise CheckpointError(name, "the manifest read back differs from the one written")
    return manifest, written
