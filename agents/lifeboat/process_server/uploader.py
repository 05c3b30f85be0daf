"""Upload pipeline: cached batch → zstd + AEAD records (thread pool) → segment → catalog entries."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..core import logging as log
from ..core.catalog import PointEntry
from ..core.errors import FormatError, LifeboatError
from ..core.segment import SegmentHeader, assemble_segment, encode_record
from ..core.wire import BATCH_FLAG_AGENT_COMPRESSED, FRAME_BOOKMARK, FRAME_WRITE, parse_batch
from ..repository.repo import Repository
from .cache import DiskCache
from .drain import CacheDrainer
from .metrics import ProcessServerMetrics

logger = log.get("lifeboat.process_server.uploader")
# Frames per executor task: enough work per hop to amortise the thread switch.
FRAMES_PER_TASK = 4
# Segments being built and uploaded at once across all disks. Each holds its cached batch and its
# sealed records (about 2 × batch_bytes). Process server peak RSS with 8 agents × 512 MiB at once
# (bench/scale.py): unbounded 275 MiB, 4 slots 239 MiB, 2 slots 145 MiB at the same aggregate
# MB/s: the encode work is bound by the (2-thread) pool anyway. With the window below, 3 slots gave
# 154-199 MiB against 137-164 MiB for 2 (8 agents x 128 MiB) and no measurable gain to Azurite.
UPLOAD_SLOTS = 2
# Segments of one disk in flight at once: up to UPLOAD_SLOTS of them encode or upload (segment N+1
# encodes while N waits on the storage round trip), the next one waiting for a slot. Their catalog
# entries and uploaded_through are still published strictly in seq order (drain.py).
UPLOAD_WINDOW = 3


def stored_through(seqs: list[int]) -> int:
    """The highest seq of a disk's log (sorted seqs) before its first gap: what the log proves stored.
    With a window, segments after a failed one can be stored although it is not (0: an empty log)."""
    last = seqs[0] - 1 if seqs else 0
    for seq in seqs:
        if seq != last + 1:
            break
        last = seq
    return last


@dataclass
class StoredSegment:
    """What publishing a stored segment needs: its points and figures, not its data."""
    points: list[PointEntry]
    frames: int
    source_bytes: int
    stored_bytes: int
    started: float


class DiskUploader(CacheDrainer):
    """Uploads up to UPLOAD_WINDOW of one disk's batches at once and publishes them strictly in
    sequence order (a catalog entry at seq S promises that every segment ≤ S is stored), retrying
    failures with capped exponential backoff."""

    kind = "upload"

    def __init__(self, disk_id: str, cache: DiskCache, repo: Repository, pool: ThreadPoolExecutor,
                 metrics: ProcessServerMetrics, retry_max_seconds: float,
                 slots: asyncio.Semaphore | None = None, window: int = UPLOAD_WINDOW) -> None:
        super().__init__(disk_id, cache, metrics, retry_max_seconds, pool,
                         slots or asyncio.Semaphore(UPLOAD_SLOTS), window)
        self.repo = repo

    async def upload_one(self, seq: int) -> None:
        """Store and publish one batch (the drain loop does the two steps with a window)."""
        await self.publish(seq, await self.store(seq))

    async def store(self, seq: int) -> StoredSegment:
        """Encode the cached batch and store its segment; nothing is published yet."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.pool, self.cache.read_batch, self.disk_id, seq)
        try:
            header, frames = await loop.run_in_executor(
                self.pool, lambda: parse_batch(data, expected_disk_id=self.disk_id, expected_seq=seq,
                                               check_compressed=False))  # the ingest decompressed them
        except FormatError as exc:
            # The batch was verified before it was acknowledged: the cache disk corrupted it.
            raise LifeboatError(f"cached batch {self.disk_id}/{seq} is damaged on the cache disk: {exc}; "
                                "the sender must resync this disk") from None
        del data
        seg_header = SegmentHeader(self.disk_id, seq, header.disk_size, len(frames))
        header_bytes = seg_header.encode()
        key = self.repo.segment_key

        # A compressing agent (batch version 2) left raw only what zstd could not shrink.
        try_compress = not header.flags & BATCH_FLAG_AGENT_COMPRESSED

        def encode_slice(start: int) -> list:
            return [encode_record(key, header_bytes, i, frames[i], try_compress)
                    for i in range(start, min(start + FRAMES_PER_TASK, len(frames)))]

        futures = [loop.run_in_executor(self.pool, encode_slice, s) for s in range(0, len(frames), FRAMES_PER_TASK)]
        encoded = [rec for chunk in await asyncio.gather(*futures) for rec in chunk]
        parts = assemble_segment(key, seg_header, encoded)
        stored = sum(len(p) for p in parts)
        source = sum(f.length for f in frames if f.kind == FRAME_WRITE)  # plaintext, however it came
        await self.repo.put_segment(self.disk_id, seq, parts)
        points = []
        for i, frame in enumerate(frames):
            if frame.kind == FRAME_BOOKMARK:
                bm = frame.bookmark()
                points.append(PointEntry(
                    point_id=bm["point_id"], machine=bm.get("machine", ""), disk_id=self.disk_id, seq=seq,
                    frame_index=i, disk_size=header.disk_size, created=float(bm.get("created", 0)),
                    consistency=bm.get("consistency", "none"), cycle=int(bm.get("cycle", 0)),
                    block_size=int(bm.get("block_size", 0)), image_digest=str(bm.get("image_digest", "")),
                    group=str(bm.get("group", "")), group_tag=str(bm.get("group_tag", "")),
                    group_members=tuple(bm.get("group_members", ())),
                ))
        return StoredSegment(points, len(frames), source, stored, t0)

    async def publish(self, seq: int, stored: StoredSegment) -> None:
        """Publish order: segment (stored, with every lower seq's) first, then its catalog entries,
        then forget the cached batch."""
        loop = asyncio.get_running_loop()
        points = stored.points
        for entry in points:
            await self.repo.put_point(entry)
        await loop.run_in_executor(self.pool, self.cache.mark_uploaded, self.disk_id, seq)
        elapsed = time.monotonic() - stored.started
        m = self.metrics
        m.upload_seconds.observe(elapsed)
        m.upload_source_bytes.inc(stored.source_bytes)
        m.upload_stored_bytes.inc(stored.stored_bytes)
        m.points.inc(len(points))
        if points:
            m.last_point.labels(self.disk_id).set(max(p.created for p in points))
        if stored.stored_bytes:
            m.compression_ratio.set(stored.source_bytes / stored.stored_bytes)
        m.uploaded_seq.labels(self.disk_id).set(seq)
        m.backlog.labels(self.disk_id).set(self.cache.backlog_bytes(self.disk_id))
        m.cache_used.set(self.cache.used_bytes)
        m.cache_free_ratio.set(self.cache.free_ratio)
        logger.info("segment uploaded", DISK=self.disk_id, BATCH=seq, frames=stored.frames,
                    source_bytes=stored.source_bytes, stored_bytes=stored.stored_bytes, seconds=round(elapsed, 3),
                    POINT=",".join(p.point_id for p in points) or None)
