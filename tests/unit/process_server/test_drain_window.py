"""CacheDrainer with a window, on a real DiskCache: stores overlap, publishes never run ahead of a
failed lower seq, a finished store is not redone when only its publish failed, window 1 stays lock-step."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client import CollectorRegistry

from lifeboat.process_server import drain
from lifeboat.process_server.cache import DiskCache
from lifeboat.process_server.drain import CacheDrainer
from lifeboat.process_server.metrics import ProcessServerMetrics

DISK = "m1.sda"


class Recorder(CacheDrainer):
    """Stores fail by a map {seq: failures left}; publish marks the batch uploaded as the uploader does."""

    def __init__(self, cache, window, store_failures=None, publish_failures=None):
        super().__init__(DISK, cache, ProcessServerMetrics(CollectorRegistry()), 0.05, None, None, window)
        self.store_failures = dict(store_failures or {})
        self.publish_failures = dict(publish_failures or {})
        self.stores: list[int] = []
        self.published: list[int] = []
        self.concurrent = self.max_concurrent = 0
        self.gate = asyncio.Event()
        self.violations: list = []

    async def store(self, seq):
        self.stores.append(seq)
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if seq == 1:
                await self.gate.wait()   # the others get going while the lowest one is slow
            if self.store_failures.get(seq, 0):
                self.store_failures[seq] -= 1
                raise OSError(f"store of {seq} failed")
            return f"stored-{seq}"
        finally:
            self.concurrent -= 1

    async def publish(self, seq, stored):
        # Recorded, not asserted: the drain loop would catch an AssertionError and retry.
        if stored != f"stored-{seq}" or self.published != list(range(1, seq)):
            self.violations.append((seq, stored, list(self.published)))
        if self.publish_failures.get(seq, 0):
            self.publish_failures[seq] -= 1
            raise OSError(f"publish of {seq} failed")
        self.published.append(seq)
        self.cache.mark_uploaded(DISK, seq)


def fill(tmp_path, n) -> DiskCache:
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30, 0.9)
    cache.adopt(DISK, 0)
    for seq in range(1, n + 1):
        fd = cache.open_partial(DISK, seq)
        os.write(fd, b"batch %d" % seq)
        cache.commit(DISK, seq, fd, 7)
        cache.published(DISK, seq, 7)
    return cache


async def run_until_drained(d: Recorder, n: int) -> None:
    d.start()
    for _ in range(5):
        await asyncio.sleep(0.01)
    d.before_gate = list(d.stores)
    d.gate.set()
    async with asyncio.timeout(30):   # a deadline for a hung drainer, not a timed assertion
        while d.cache.uploaded_seq(DISK) < n:
            await asyncio.sleep(0.01)
    d.task.cancel()
    await asyncio.gather(d.task, return_exceptions=True)


async def test_window_overlaps_stores_and_publishes_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(drain, "FIRST_RETRY_SECONDS", 0.01)
    d = Recorder(fill(tmp_path, 5), window=3, store_failures={1: 2}, publish_failures={2: 1})
    await run_until_drained(d, 5)
    assert d.published == [1, 2, 3, 4, 5] and d.violations == []
    assert d.before_gate == [1, 2, 3]          # 2 and 3 stored while 1 hung; 4 waits outside the window
    assert d.stores.count(1) == 3            # failed twice, stored again each time
    assert d.stores.count(2) == 1            # only its publish failed: the store is kept
    assert d.stores.count(3) == 1
    assert d.metrics.upload_errors.labels("OSError")._value.get() == 3
    assert d.failing is None and d.cache.pending(DISK) == []


async def test_window_one_is_lock_step(tmp_path, monkeypatch):
    monkeypatch.setattr(drain, "FIRST_RETRY_SECONDS", 0.01)
    d = Recorder(fill(tmp_path, 3), window=1, store_failures={2: 1})
    await run_until_drained(d, 3)
    assert d.published == [1, 2, 3] and d.violations == [] and d.max_concurrent == 1 and d.before_gate == [1]
    assert d.stores == [1, 2, 2, 3]


def test_window_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="window must be at least 1"):
        Recorder(fill(tmp_path, 0), window=0)
