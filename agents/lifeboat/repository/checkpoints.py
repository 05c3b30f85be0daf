"""Build, list, read and delete checkpoints (FORMATS.md section 10) of a disk's log."""

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
from .image_digests import ImageDigests, write_digests
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


async def list_checkpoint_objects(repo: Repository, disk_id: str) -> tuple[list[int], list[bytes]]:
    """(seqs with a manifest, increasing; ids of the chunk objects) under checkpoints/<disk>/."""
    seqs, chunks = [], []
    for name in await repo.backend.list(f"checkpoints/{disk_id}/"):
        parsed = ckfmt.parse_object_name(name)
        if parsed is None or parsed[1] != disk_id:
            continue
        (seqs if parsed[0] == "manifest" else chunks).append(parsed[2])
    return sorted(seqs), chunks


async def list_checkpoints(repo: Repository, disk_id: str) -> list[int]:
    """Seqs of the disk's published checkpoints (those whose manifest exists), increasing."""
    return (await list_checkpoint_objects(repo, disk_id))[0]


async def read_manifest(repo: Repository, disk_id: str, seq: int) -> Manifest:
    name = ckfmt.manifest_name(disk_id, seq)
    manifest = await asyncio.to_thread(ckfmt.open_manifest, repo.checkpoint_key, name, await repo.backend.get(name))
    if manifest.disk_id != disk_id:
        raise IntegrityError(name, f"manifest belongs to disk {manifest.disk_id!r}")
    return manifest


async def read_chunk(repo: Repository, manifest: Manifest, index: int, cid: bytes) -> bytes:
    name = ckfmt.chunk_name(manifest.disk_id, cid)
    try:
        data = await repo.backend.get(name)
    except ObjectNotFound:
        raise IntegrityError(name, f"chunk {index} of {ckfmt.manifest_name(manifest.disk_id, manifest.seq)} "
                                   "is missing") from None
    return await asyncio.to_thread(ckfmt.open_chunk, repo.checkpoint_key, name, manifest, index, data)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Write zeros (block devices hold old data; image files are fresh and sparse already)."""
    zeros = bytes(min(1 << 20, length))
    while length:
        n = os.pwrite(fd, zeros[: min(len(zeros), length)], offset)
        offset += n
        length -= n


def pwrite_all(fd: int, data, offset: int) -> None:
    """pwrite every byte of `data` (os.pwrite may write less than asked, e.g. near a device's end)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite at {offset} wrote nothing ({len(view)} bytes left)")
        view = view[n:]
        offset += n


_SYNC_FILE_RANGE_WRITE = 0x2   # start writeback of the range's dirty pages; do not wait for it


def writeback_starter() -> Callable[[int, int, int], None]:
    """sync_file_range(SYNC_FILE_RANGE_WRITE) for each frame just written, so the disk writes while later
    frames decode: an fsync only at the end leaves the disk idle for the whole replay and then the CPU
    idle for the whole flush. Durability still comes from the final fsync; where the call is missing
    or refused (ENOSYS, EINVAL), this does nothing."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    broken = [False]

    def start(fd: int, offset: int, length: int) -> None:
        if not broken[0] and fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            broken[0] = True
    return start


def _write_chunk(fd: int, view: memoryview, offset: int, digests: ImageDigests | None,
                 writeback: Callable[[int, int, int], None] | None) -> None:
    pwrite_all(fd, view, offset)
    if writeback is not None:
        writeback(fd, offset, len(view))
    if digests is not None:
        block_list, first = write_digests(view, offset, digests.block_size)
        digests.wrote(offset, len(view), block_list, first)


async def write_checkpoint_to(repo: Repository, manifest: Manifest, fd: int, size: int, is_device: bool,
                              only: set[int] | None = None, digests: ImageDigests | None = None,
                              writeback: Callable[[int, int, int], None] | None = None) -> int:
    """Write the checkpoint's image into fd (clipped to `size`; `only`: just these chunk indexes), fetching
    one chunk ahead. Returns the bytes written. `digests`: record every block laid down (taken from the
    chunk's plaintext as written; chunks absent from the manifest are zeros on the target). `writeback`:
    called after each chunk's pwrite (a failover starts the disk writing early)."""
    refs = dict(manifest.refs)
    limit = min(manifest.chunk_count, -(-size // manifest.chunk_bytes))
    indexes = [i for i in range(limit) if only is None or i in only]
    written = 0

    async def fetch(i: int) -> bytes | None:
        return await read_chunk(repo, manifest, i, refs[i]) if i in refs else None

    nxt = asyncio.ensure_future(fetch(indexes[0])) if indexes else None
    try:
        for pos, i in enumerate(indexes):
            data = await nxt
            nxt = asyncio.ensure_future(fetch(indexes[pos + 1])) if pos + 1 < len(indexes) else None
            offset = i * manifest.chunk_bytes
            end = min(offset + manifest.chunk_bytes, size, manifest.disk_size)
            if data is not None:
                await asyncio.to_thread(_write_chunk, fd, memoryview(data)[: end - offset], offset, digests, writeback)
                written += end - offset
                continue
            if is_device or only is not None:
                await asyncio.to_thread(zero_range, fd, offset, end - offset)
            if digests is not None:   # a fresh image file is sparse zeros already
                digests.wrote(offset, end - offset, None, 0)
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
    return written


def _touched_chunks(reader: SegmentReader, chunk_bytes: int) -> set[int]:
    out: set[int] = set()
    for e in reader.entries:
        if e.kind in (FRAME_WRITE, FRAME_ZERO) and e.length:
            out.update(range(e.disk_offset // chunk_bytes, (e.disk_offset + e.length - 1) // chunk_bytes + 1))
    return out


def _apply_segment(reader: SegmentReader, fd: int) -> None:
    for i, e in enumerate(reader.entries):
        if e.kind == FRAME_WRITE:
            os.pwrite(fd, reader.payload(i), e.disk_offset)
        elif e.kind == FRAME_ZERO:
            zero_range(fd, e.disk_offset, e.length)


async def _seal_and_put(repo: Repository, name: str, index: int, offset: int, plain: bytes) -> None:
    blob = await asyncio.to_thread(ckfmt.seal_chunk, repo.checkpoint_key, name, index, offset, plain)
    await repo.backend.put(name, blob)


async def build_checkpoint(repo: Repository, disk_id: str, seq: int, work_dir: str | None = None,
                           chunk_bytes: int = ckfmt.CHUNK_BYTES,
                           between: Callable[[str], Awaitable[None]] | None = None) -> tuple[Manifest, list[str]]:
    """Publish checkpoint `seq` of `disk_id`: the image after segments 1..seq.

    Incremental: starts from the newest published checkpoint B at or before `seq` and replays segments
    B+1..seq into a sparse temporary image in `work_dir`, loading only the chunks of B those segments
    touch; untouched chunks are B's objects, shared by reference. So a build costs the changed bytes,
    not the disk size. Memory stays at one segment plus a few chunks. Upload order: the new chunks,
    then (after `between("chunks_published")`, a test hook) the manifest, read back and compared.
    Returns the manifest and the names of the objects written.
    """
    existing = await list_checkpoints(repo, disk_id)
    if seq in existing:
        return await read_manifest(repo, disk_id, seq), []
    base_seq = max((c for c in existing if c < seq), default=0)
    have = set(await repo.list_segments(disk_id))
    needed = range(base_seq + 1, seq + 1)
    missing = [s for s in needed if s not in have]
    if missing:
        raise CheckpointError(ckfmt.manifest_name(disk_id, seq),
                              f"segment {segment_name(disk_id, missing[0])} is missing ({len(missing)} of the "
                              f"{len(needed)} segments after {'checkpoint ' + str(base_seq) if base_seq else 'the log start'})"
                              "; run 'lifeboat verify'")
    last = await repo.read_segment(disk_id, seq)
    disk_size = last.header.disk_size
    del last
    base = await read_manifest(repo, disk_id, base_seq) if base_seq else None
    if base is not None and base.disk_size == disk_size:
        chunk_bytes = base.chunk_bytes   # the base's chunking, so that unchanged chunks are shared
    same_geometry = base is not None and base.disk_size == disk_size and base.chunk_bytes == chunk_bytes
    count = -(-disk_size // chunk_bytes)
    base_refs = dict(base.refs) if same_geometry else {}
    id_key = ckfmt.chunk_id_key(repo.checkpoint_key)
    refs: dict[int, bytes] = {}
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lifeboat-checkpoint-", dir=work_dir) as tmp:
        fd = os.open(os.path.join(tmp, "image"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, disk_size)
            if base is not None and not same_geometry:
                touched = set(range(count))   # a resized disk: start from the whole old image
                await write_checkpoint_to(repo, base, fd, disk_size, False)
            else:
                touched = set()
            for s in needed:
                reader = await repo.read_segment(disk_id, s)
                fresh = {i for i in _touched_chunks(reader, chunk_bytes) if i < count} - touched
                if fresh and base is not None and same_geometry:
                    await write_checkpoint_to(repo, base, fd, disk_size, False, only=fresh & set(base_refs))
                touched |= fresh
                await asyncio.to_thread(_apply_segment, reader, fd)
                del reader
            os.ftruncate(fd, disk_size)  # a frame of an older, larger geometry must not widen the image
            refs = {i: cid for i, cid in base_refs.items() if i not in touched}
            zeros = memoryview(bytes(chunk_bytes))
            pending: set[asyncio.Task] = set()
            try:
                for i in sorted(touched):
                    offset = i * chunk_bytes
                    plain = await asyncio.to_thread(os.pread, fd, min(chunk_bytes, disk_size - offset), offset)
                    if plain == zeros[: len(plain)]:
                        continue  # sparse: a zero chunk is not stored
                    cid = await asyncio.to_thread(ckfmt.chunk_id, id_key, offset, plain)
                    refs[i] = cid
                    if base_refs.get(i) == cid:
                        continue  # rewritten with the same bytes: B's object serves
                    name = ckfmt.chunk_name(disk_id, cid)
                    written.append(name)
                    while len(pending) >= CHUNK_UPLOAD_CONCURRENCY:
                        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            t.result()
                    pending.add(asyncio.ensure_future(_seal_and_put(repo, name, i, offset, plain)))
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
    manifest = Manifest(disk_id, seq, disk_size, chunk_bytes, tuple(sorted(refs.items())))
    name = ckfmt.manifest_name(disk_id, seq)
    await repo.backend.put(name, ckfmt.seal_manifest(repo.checkpoint_key, manifest))
    written.append(name)
    # Read back what was published (restic verifyHeader): a store that mangled it fails here, not at failover.
    if await read_manifest(repo, disk_id, seq) != manifest:
        raise CheckpointError(name, "the manifest read back differs from the one written")
    return manifest, written


async def collect_chunks(repo: Repository, disk_id: str) -> list[str]:
    """Delete chunk objects no manifest of the disk refers to (left by superseded checkpoints or an
    interrupted build). Run only after the manifests that still count are published."""
    seqs, chunks = await list_checkpoint_objects(repo, disk_id)
    referenced: set[bytes] = set()
    for s in seqs:
        referenced.update(cid for _, cid in (await read_manifest(repo, disk_id, s)).refs)
    deleted = []
    for cid in chunks:
        if cid not in referenced and await delete_quietly(repo, ckfmt.chunk_name(disk_id, cid)):
            deleted.append(ckfmt.chunk_name(disk_id, cid))
    return deleted
