"""The uploader's window on Azurite: later segments are stored while an earlier one fails or hangs, yet
no catalog entry, uploaded_through or cache deletion gets ahead of the lowest segment not yet stored,
neither while it hangs nor after a restart; the newest point then fails over bit-exact."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from lifeboat.core import keys
from lifeboat.core.errors import TransientBackendError
from lifeboat.core.wire import BatchBuilder
from lifeboat.process_server.cache import DiskCache
from lifeboat.process_server.metrics import ProcessServerMetrics
from lifeboat.process_server.uploader import DiskUploader, stored_through
from lifeboat.repository.azure import AzureBackend
from lifeboat.repository.backend import Backend
from lifeboat.repository.materialize import materialize
from lifeboat.repository.repo import Repository, segment_name

DISK = "m1.sda"
DISK_BYTES = 256 * 1024
BLOCK = 4096
BATCHES = 4
HELD_SEQ = 2        # its first upload fails, its second hangs until released
WAIT_SECONDS = 60   # a deadline for a hung test, not a timed assertion


class GatedBackend(Backend):
    """The real Azurite backend, except that one segment's put fails once and then hangs until released.
    Records the order in which puts completed."""

    def __init__(self, real: Backend, held_name: str) -> None:
        self.real = real
        self.location = real.location
        self.held_name = held_name
        self.held = asyncio.Event()      # the second attempt at held_name has started
        self.release = asyncio.Event()
        self.attempts = 0
        self.completed: list[str] = []

    async def put(self, name, parts):
        if name == self.held_name:
            self.attempts += 1
            if self.attempts == 1:
                raise TransientBackendError(f"injected: first upload of {name} fails")
            self.held.set()
            await self.release.wait()
        await self.real.put(name, parts)
        self.completed.append(name)

    async def get(self, name):
        return await self.real.get(name)

    async def get_range(self, name, offset, length):
        return await self.real.get_range(name, offset, length)

    async def size(self, name):
        return await self.real.size(name)

    async def exists(self, name):
        return await self.real.exists(name)

    async def list(self, prefix=""):
        return await self.real.list(prefix)

    async def delete(self, name):
        await self.real.delete(name)


def cache_batches(cache: DiskCache, image: bytearray, rng: random.Random) -> dict[str, str]:
    """Write BATCHES batches (random writes, then a bookmark) into the cache as the ingest does;
    {point_id: SHA-256 of the image at that point}."""
    expected = {}
    for seq in range(1, BATCHES + 1):
        b = BatchBuilder(DISK, seq, DISK_BYTES)
        for _ in range(6):
            offset = rng.randrange(DISK_BYTES // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK * rng.randint(1, 4))[:DISK_BYTES - offset]
            image[offset:offset + len(data)] = data
            b.write(offset, data)
        point_id = f"p{seq}"
        b.bookmark({"point_id": point_id, "machine": "m1", "created": 1000.0 + seq, "consistency": "crash",
                    "cycle": seq, "block_size": BLOCK, "image_digest": ""})
        body = b.to_bytes()
        fd = cache.open_partial(DISK, seq)
        os.write(fd, body)
        cache.commit(DISK, seq, fd, len(body))
        cache.published(DISK, seq, len(body))
        expected[point_id] = hashlib.sha256(image).hexdigest()
    return expected


async def until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


async def catalog(repo: Repository) -> list[str]:
    return sorted(p.point_id for p in await repo.list_points(DISK))


async def failover_sha256(repo: Repository, point_id: str, target: str) -> str:
    entry = next(p for p in await repo.list_points(DISK) if p.point_id == point_id)
    await materialize(repo, entry, target, overwrite=True)
    with open(target, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.azurite
async def test_later_segments_stored_first_are_published_only_in_order(azurite, tmp_path):
    real = AzureBackend(f"window-{uuid.uuid4().hex[:16]}", azurite)
    gated = GatedBackend(real, segment_name(DISK, HELD_SEQ))
    key_file = keys.write_key_file(str(tmp_path / "key"))
    repo = await Repository.init(gated, key_file)
    cache_dir = str(tmp_path / "cache")
    cache = DiskCache(cache_dir, 1 << 30, 0.9)
    cache.adopt(DISK, 0)
    image = bytearray(DISK_BYTES)
    expected = cache_batches(cache, image, random.Random(8))
    metrics = ProcessServerMetrics(CollectorRegistry())
    pool = ThreadPoolExecutor(2)
    try:
        up = DiskUploader(DISK, cache, repo, pool, metrics, retry_max_seconds=0.5, window=3)
        up.start()
        # Segment 1 is published; 2 failed once and now hangs; 3 and 4 are stored meanwhile.
        later = {segment_name(DISK, 3), segment_name(DISK, 4)}
        await until(lambda: gated.held.is_set() and later <= set(gated.completed), "segments 3 and 4 stored while 2 hangs")
        await until(lambda: cache.uploaded_seq(DISK) == 1, "segment 1 published")
        await asyncio.sleep(0.2)   # give a wrongly ordered publish every chance to happen
        assert await catalog(repo) == ["p1"]
        assert cache.uploaded_seq(DISK) == 1 and cache.pending(DISK) == [2, 3, 4]
        assert all(os.path.exists(cache.batch_path(DISK, s)) for s in (2, 3, 4))
        assert up.failing and "injected" in up.failing
        assert metrics.upload_errors.labels("TransientBackendError")._value.get() == 1

        # A stop now (the process server restarts): the cache still holds 2..4, nothing beyond 1 is published.
        up.task.cancel()
        await asyncio.gather(up.task, return_exceptions=True)
        restarted = DiskCache(cache_dir, 1 << 30, 0.9)
        assert restarted.recover() == {DISK: BATCHES}
        assert restarted.uploaded_seq(DISK) == 1 and restarted.pending(DISK) == [2, 3, 4]
        assert await catalog(repo) == ["p1"]

        # After the restart segment 2 still hangs at first, then gets through: everything is published in order.
        up2 = DiskUploader(DISK, restarted, repo, pool, metrics, retry_max_seconds=0.5, window=3)
        up2.start()
        await until(lambda: gated.attempts >= 3, "segment 2 tried again after the restart")
        assert await catalog(repo) == ["p1"]
        gated.release.set()
        await until(lambda: restarted.uploaded_seq(DISK) == BATCHES, "every batch published")
        assert restarted.pending(DISK) == []
        assert not [n for n in os.listdir(os.path.join(cache_dir, DISK)) if n.endswith(".batch")]
        assert await catalog(repo) == [f"p{s}" for s in range(1, BATCHES + 1)]
        # Each catalog entry came after every segment up to its own seq.
        order = gated.completed
        for s in range(1, BATCHES + 1):
            point_at = order.index(f"points/{DISK}/p{s}")
            assert all(order.index(segment_name(DISK, t)) < point_at for t in range(1, s + 1))
        up2.task.cancel()
        await asyncio.gather(up2.task, return_exceptions=True)

        target = str(tmp_path / "recovered.img")
        assert await failover_sha256(repo, f"p{BATCHES}", target) == expected[f"p{BATCHES}"]
        assert await failover_sha256(repo, f"p{HELD_SEQ}", target) == expected[f"p{HELD_SEQ}"]
    finally:
        pool.shutdown(wait=True)
        await real._client.delete_container()
        await real.close()


def test_a_log_proves_stored_only_up_to_its_first_gap():
    # A process server that lost its cache adopts the disk from the log: segments stored after a
    # failed one (the window) must not count, or the agent would never resend the missing one.
    assert stored_through([]) == 0
    assert stored_through([1, 2, 3]) == 3
    assert stored_through([1, 2, 4, 5]) == 2
    assert stored_through([7, 8, 9]) == 9        # retention dropped 1..6: still contiguous
    assert stored_through([7, 9]) == 7
