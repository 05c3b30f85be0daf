"""Materialise a disk at a recovery point: replay its log into a raw image, streaming, then prove it."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from ..core.catalog import PointEntry
from ..core.errors import IntegrityError, LifeboatError, ObjectNotFound, PointIncomplete
from ..core.segment import SegmentReader
from ..core.wire import FRAME_WRITE, FRAME_ZERO
from .checkpoints import list_checkpoints, pwrite_all, read_manifest, write_checkpoint_to, writeback_starter
from .image_digests import ImageDigests, write_digests
from .repo import Repository, segment_name

ZERO_CHUNK_BYTES = 1024 * 1024
# zstd and libsodium release the GIL: two decoders keep both cores of the reference machine busy.
DECODE_THREADS = 2
# Frames decoded ahead of the writer: enough to cover one frame's decode jitter per thread, small
# enough that memory stays at two segments plus a few MiB.
DECODE_LOOKAHEAD_FRAMES = 4
DECODE_SCRATCH_BYTES = 1024 * 1024 + 64   # a 1 MiB write frame's sealed body; grown when larger
_scratch = threading.local()
MAX_BLOCK_BYTES = 4 * 1024 * 1024   # the digest tracker's largest block size (replication.block_size)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@dataclass
class MaterializeResult:
    path: str
    disk_id: str
    point_id: str
    segments: int
    written_bytes: int
    image_digest: str
    checkpoint_seq: int = 0   # the checkpoint replay started from (0: the log's start)
    reread_bytes: int = 0     # image bytes read back to digest blocks not vouched for while writing


def _open_target(path: str, size: int, overwrite: bool) -> tuple[int, bool]:
    """Open a fresh zero-filled image file, or a block device of at least `size` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDWR)
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            os.close(fd)
            raise LifeboatError(f"block device {path} has {dev_size} bytes, the disk needs {size}")
        return fd, True
    if st is not None and not overwrite:
        raise LifeboatError(f"{path} exists; pass --overwrite to replace it, or choose another --to path")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)  # sparse zeros: the replica's starting state
    return fd, False


def _zero(fd: int, offset: int, length: int, is_device: bool) -> None:
    if not is_device:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                              ctypes.c_long(offset), ctypes.c_long(length)) == 0:
                return
        except OSError:
            pass
    zeros = bytes(min(ZERO_CHUNK_BYTES, length))
    while length:
        n = os.pwrite(fd, zeros[: min(len(zeros), length)], offset)
        offset += n
        length -= n


class _Stopped(Exception):
    """The materialisation was abandoned (cancelled, or failed on the event loop's side)."""


def _replay(segments: Iterator[tuple[SegmentReader, int | None]], fd: int, is_device: bool, digests: ImageDigests,
            pool: ThreadPoolExecutor, stop: threading.Event, segment_done: Callable[[], None]) -> int:
    """Apply the segments' frames in log order (later frames overwrite earlier ones); returns bytes written.

    Write frames are decoded (decrypt, decompress, check, block digests) on `pool`, up to
    DECODE_LOOKAHEAD_FRAMES ahead of this writer and across segment boundaries (a pipeline drained at
    every 16 MiB segment idles a core at each one), while this thread pwrites and records digests
    strictly in frame order. `segments` yields (reader, frames to apply: None for all) and fetches ahead.
    """
    bs = digests.block_size
    start_writeback = writeback_starter()

    def decode(reader: SegmentReader, i: int):
        e = reader.entries[i]
        scratch = getattr(_scratch, "buf", None)
        if scratch is None or len(scratch) < e.record_len:
            scratch = _scratch.buf = bytearray(max(DECODE_SCRATCH_BYTES, e.record_len))
        plain = reader.decode(i, scratch)
        return (plain, *write_digests(plain, e.disk_offset, bs))

    def frames():
        for reader, stop_before in segments:
            entries = reader.entries if stop_before is None else reader.entries[:stop_before]
            for i, e in enumerate(entries):
                if e.kind in (FRAME_WRITE, FRAME_ZERO):
                    yield reader, i, e, False
            yield reader, -1, None, True   # the segment's end (progress)
            del reader, entries

    # (entry, decode future or None, segment end?) in log order; at most DECODE_LOOKAHEAD_FRAMES futures.
    window: deque = deque()
    in_flight = 0
    source = frames()
    exhausted = False
    written = 0
    try:
        while True:
            while not exhausted and in_flight < DECODE_LOOKAHEAD_FRAMES:
                try:
                    reader, i, e, seg_end = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if e is not None and e.kind == FRAME_WRITE:
                    window.append((e, pool.submit(decode, reader, i), False))
                    in_flight += 1
                else:
                    window.append((e, None, seg_end))
                del reader
            if not window:
                return written
            if stop.is_set():
                raise _Stopped()
            e, fut, seg_end = window.popleft()
            if seg_end:
                segment_done()
            elif fut is not None:
                in_flight -= 1
                plain, block_list, first = fut.result()
                pwrite_all(fd, plain, e.disk_offset)
                start_writeback(fd, e.disk_offset, len(plain))
                digests.wrote(e.disk_offset, len(plain), block_list, first)
                written += len(plain)
                del plain
            else:
                _zero(fd, e.disk_offset, e.length, is_device)
                digests.wrote(e.disk_offset, e.length, None, 0)
                written += e.length
    finally:
        for _e, f, _end in window:
            if f is not None:
                f.cancel()
        source.close()


def image_digest_of(fd: int, size: int, block_size: int) -> str:
    """Recompute an image digest by reading every byte of the image (the slow, independent check)."""
    d = ImageDigests(size, block_size, all_stale=True)
    return d.finish(fd)


async def _replay_base(repo: Repository, entry: PointEntry, seqs: list[int]):
    """The newest usable checkpoint before the point (None: replay from segment 1) and the segments after it.

    A checkpoint at seq C is the image after segment C, so a point in segment S can start from any C < S.
    A checkpoint whose manifest is damaged is skipped for an older one (or the full log) when that one's
    segments are all still there; otherwise the point is reported incomplete, naming what is missing.
    """
    have = set(seqs)
    damaged: list[str] = []
    for c in sorted((c for c in await list_checkpoints(repo, entry.disk_id) if c < entry.seq), reverse=True):
        if any(s not in have for s in range(c + 1, entry.seq + 1)):
            continue
        try:
            return await read_manifest(repo, entry.disk_id, c), list(range(c + 1, entry.seq + 1)), damaged
        except IntegrityError as exc:
            damaged.append(str(exc))
    missing = sorted(set(range(1, entry.seq + 1)) - have)
    if missing:
        why = f"; damaged checkpoint: {damaged[0]}" if damaged else ""
        raise PointIncomplete(entry.point_id, f"segment {segment_name(entry.disk_id, missing[0])} is missing "
                              f"({len(missing)} of {entry.seq} needed segments absent) and no checkpoint covers it{why}")
    return None, list(range(1, entry.seq + 1)), damaged


async def materialize(repo: Repository, entry: PointEntry, target: str, overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> MaterializeResult:
    """Write the newest checkpoint before the point, then replay the segments after it up to the bookmark.

    Memory is bounded by two segments (the one being applied and the next one, prefetched; briefly the
    last look-ahead frames of a third) or two checkpoint chunks.
    """
    if not 0 < entry.block_size <= MAX_BLOCK_BYTES:
        raise PointIncomplete(entry.point_id, f"its bookmark declares digest block size {entry.block_size}, outside "
                              f"1..{MAX_BLOCK_BYTES}; the image digest cannot be checked (run 'lifeboat verify')")
    seqs = await repo.list_segments(entry.disk_id)
    base, needed, _damaged = await _replay_base(repo, entry, seqs)
    fd, is_device = await asyncio.to_thread(_open_target, target, entry.disk_size, overwrite)
    # A device holds old data wherever nothing is written: those blocks are read back at the end.
    digests = ImageDigests(entry.disk_size, entry.block_size, all_stale=is_device)
    pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="lifeboat-decode")
    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="lifeboat-write")
    stop = threading.Event()
    writer = None
    written = 0
    try:
        async def fetch(seq: int) -> SegmentReader:
            try:
                return await repo.read_segment(entry.disk_id, seq)
            except ObjectNotFound:
                raise PointIncomplete(entry.point_id, f"segment {segment_name(entry.disk_id, seq)} vanished") from None

        if base is not None:
            try:
                written += await write_checkpoint_to(repo, base, fd, entry.disk_size, is_device, digests=digests,
                                                     writeback=writeback_starter())
            except IntegrityError as exc:
                raise PointIncomplete(entry.point_id, f"it needs {exc.object_name}, which is damaged: {exc}") from None
        loop = asyncio.get_running_loop()

        def segments() -> Iterator[tuple[SegmentReader, int | None]]:
            """Runs in the writer thread: each segment fetched on the loop, the next one while this is applied."""
            nxt = asyncio.run_coroutine_threadsafe(fetch(needed[0]), loop)
            try:
                for pos, seq in enumerate(needed):
                    reader = nxt.result()
                    nxt = asyncio.run_coroutine_threadsafe(fetch(needed[pos + 1]), loop) if pos + 1 < len(needed) else None
                    yield reader, (entry.frame_index if seq == entry.seq else None)
                    del reader
            finally:
                if nxt is not None:
                    nxt.cancel()

        done = [0]

        def segment_done() -> None:
            done[0] += 1
            if progress:
                loop.call_soon_threadsafe(progress, done[0], len(needed))

        writer = writer_pool.submit(_replay, segments(), fd, is_device, digests, pool, stop, segment_done)
        try:
            written += await asyncio.wrap_future(writer)
        except IntegrityError as exc:
            raise PointIncomplete(entry.point_id, f"it needs {exc.object_name}, which is damaged: {exc}") from None
        await asyncio.to_thread(os.fsync, fd)
        # The digest of the bytes as laid down (last write wins), from the plaintext each write came from;
        # only blocks no write covered in full are read back.
        digest = await asyncio.to_thread(digests.finish, fd)
    except BaseException:
        stop.set()
        if writer is not None and not writer.done():
            # The writer thread must be out of pwrite before its fd is closed (and maybe reused); it may
            # be waiting for a segment fetched on this loop, so wait without blocking the loop.
            await asyncio.wait([asyncio.wrap_future(writer)])
        writer_pool.shutdown(wait=True)
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)
        if not is_device:
            try:
                os.unlink(target)  # never leave a half-written image that looks usable
            except OSError:
                pass
        raise
    writer_pool.shutdown(wait=True)
    pool.shutdown(wait=True)
    os.close(fd)
    if entry.image_digest and digest != entry.image_digest:
        raise PointIncomplete(entry.point_id, f"the recovered image's digest {digest} differs from the digest the agent "
                              f"recorded ({entry.image_digest}); the image at {target} is not trustworthy")
    return MaterializeResult(target, entry.disk_id, entry.point_id, len(needed), written, digest,
                             base.seq if base is not None else 0, digests.reread_bytes)
