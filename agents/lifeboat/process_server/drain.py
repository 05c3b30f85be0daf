"""One disk's cached batches drained strictly in seq order, each retried with capped backoff until it succeeds."""

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
    failing, wakeup. Subclasses implement drain_one(seq) and may handle a failure in recover()."""

    kind = "drain"   # names the task and the log lines: "upload", "forward"

    def __init__(self, disk_id: str, cache: DiskCache, metrics: ProcessServerMetrics, retry_max_seconds: float,
                 pool, slots: asyncio.Semaphore | None = None) -> None:
        self.disk_id = disk_id
        self.cache = cache
        self.metrics = metrics
        self.retry_max_seconds = retry_max_seconds
        self.pool = pool
        self.slots = slots   # shared by the server's drainers (None: no limit across disks)
        self.wakeup = asyncio.Event()
        self.failing: str | None = None
        self.task: asyncio.Task | None = None
        self._busy = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"{self.kind}-{self.disk_id}")

    @property
    def busy(self) -> bool:
        return self._busy

    async def drain_one(self, seq: int) -> None:
        raise NotImplementedError

    async def recover(self, seq: int, exc: Exception) -> bool:
        """After a failed attempt (already counted): True when it was dealt with and the loop goes on at once."""
        return False

    async def _run(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while True:
            pending = self.cache.pending(self.disk_id)
            if not pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            seq = pending[0]
            try:
                async with self.slots or contextlib.nullcontext():
                    self._busy = True  # waiting for a slot is not busy: a stop need not wait for it
                    await self.drain_one(seq)
                self.failing, delay = None, FIRST_RETRY_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried, logged and counted, never dropped
                kind = type(exc).__name__
                self.failing = f"{kind}: {exc}"
                self.metrics.upload_errors.labels(kind).inc()
                if await self.recover(seq, exc):
                    self.failing, delay = None, FIRST_RETRY_SECONDS
                    continue
                logger.error(f"{self.kind} failed, will retry", DISK=self.disk_id, BATCH=seq, error=str(exc),
                             kind=kind, retry_in_seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_seconds)
            finally:
                self._busy = False
