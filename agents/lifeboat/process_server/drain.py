"""One disk's cached batches drained with a window in flight, published strictly in seq order, retried with backoff."""

from __future__ import annotations

import asyncio
import contextlib

from ..core import logging as log
from .cache import DiskCache
from .metrics import ProcessServerMetrics

logger = log.get("lifeboat.process_server.drain")
FIRST_RETRY_SECONDS = 0.5


class CacheDrainer:
    """What the server and its watchdog see of a disk's uploader or forwarder: start, task, busy,
    failing, wakeup.

    Each batch goes through two steps. store(seq) may run for up to `window` batches at once (the
    lowest pending seqs); publish(seq, stored) runs strictly in seq order, one at a time, and only
    after every lower seq has been published: whatever a published seq promises (a catalog entry at
    S says every segment <= S is stored) holds however the stores of later seqs end. A failed store
    or publish of the lowest seq is counted, handed to recover(), then retried with capped backoff;
    later seqs wait (their finished stores are kept, never published first). Subclasses implement
    drain_one(seq) (window 1: the whole batch in one step) or store() and publish().
    """

    kind = "drain"   # names the task and the log lines: "upload", "forward"

    def __init__(self, disk_id: str, cache: DiskCache, metrics: ProcessServerMetrics, retry_max_seconds: float,
                 pool, slots: asyncio.Semaphore | None = None, window: int = 1) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.disk_id = disk_id
        self.cache = cache
        self.metrics = metrics
        self.retry_max_seconds = retry_max_seconds
        self.pool = pool
        self.slots = slots   # shared by the server's drainers (None: no limit across disks)
        self.window = window
        self.wakeup = asyncio.Event()
        self.failing: str | None = None
        self.task: asyncio.Task | None = None
        self._active = 0   # stores holding a slot, plus a publish in progress

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"{self.kind}-{self.disk_id}")

    @property
    def busy(self) -> bool:
        return self._active > 0

    async def drain_one(self, seq: int) -> None:
        raise NotImplementedError

    async def store(self, seq: int) -> object:
        """The part that may overlap with other seqs' (window > 1); returns what publish() needs."""
        await self.drain_one(seq)
        return None

    async def publish(self, seq: int, stored: object) -> None:
        """The in-order part: runs once every lower seq is published."""

    async def recover(self, seq: int, exc: Exception) -> bool:
        """After a failed attempt (already counted): True when it was dealt with and the loop goes on at once."""
        return False

    async def _store_in_slot(self, seq: int) -> object:
        async with self.slots or contextlib.nullcontext():
            self._active += 1  # waiting for a slot is not busy: a stop need not wait for it
            try:
                return await self.store(seq)
            finally:
                self._active -= 1

    async def _run(self) -> None:
        inflight: dict[int, asyncio.Task] = {}
        try:
            await self._drain(inflight)
        finally:
            for task in inflight.values():
                _discard(task)
            if inflight:
                await asyncio.wait(inflight.values())

    async def _drain(self, inflight: dict[int, asyncio.Task]) -> None:
        delay = FIRST_RETRY_SECONDS
        while True:
            pending = self.cache.pending(self.disk_id)
            for seq in [s for s in inflight if s not in pending]:   # dropped from the cache (a rewind)
                _discard(inflight.pop(seq))
            for seq in pending[:self.window]:
                if seq not in inflight:
                    inflight[seq] = asyncio.create_task(self._store_in_slot(seq),
                                                        name=f"{self.kind}-{self.disk_id}-{seq}")
            if not pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            seq = pending[0]
            head = inflight[seq]
            if not head.done() and len(pending) <= self.window:
                # Wait for the head or for a new batch, whichever comes first, so the window fills up.
                self.wakeup.clear()
                woken = asyncio.ensure_future(self.wakeup.wait())
                try:
                    await asyncio.wait({head, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if not head.done():
                    continue
            try:
                stored = await asyncio.shield(head)
            except asyncio.CancelledError:
                if head.cancelled() and not asyncio.current_task().cancelling():
                    inflight.pop(seq, None)   # only the store was cancelled: start it again
                    continue
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried, logged and counted, never dropped
                inflight.pop(seq, None)   # the next attempt stores it again
                delay = await self._failed(seq, exc, delay)
                continue
            try:
                self._active += 1
                try:
                    await self.publish(seq, stored)
                finally:
                    self._active -= 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store stays done: the next attempt only publishes
                delay = await self._failed(seq, exc, delay)
                continue
            inflight.pop(seq, None)
            self.failing, delay = None, FIRST_RETRY_SECONDS

    async def _failed(self, seq: int, exc: Exception, delay: float) -> float:
        """Count and log a failed attempt at seq, back off; the next delay (reset when recover() dealt with it)."""
        kind = type(exc).__name__
        self.failing = f"{kind}: {exc}"
        self.metrics.upload_errors.labels(kind).inc()
        if await self.recover(seq, exc):
            self.failing = None
            return FIRST_RETRY_SECONDS
        logger.error(f"{self.kind} failed, will retry", DISK=self.disk_id, BATCH=seq, error=str(exc),
                     kind=kind, retry_in_seconds=delay)
        await asyncio.sleep(delay)
        return min(delay * 2, self.retry_max_seconds)


def _discard(task: asyncio.Task) -> None:
    """Cancel a store nobody will publish, and retrieve its outcome (no 'exception never retrieved')."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
