"""Failback forwarding: cached batches go to a master target (in order, re-sent until acknowledged) instead of the repository.

This is the temporary process server of a failback: the reprotected machine's agent sends to it
as usual, and each disk's forwarder replays the cache to the master target with the same batch
protocol. A batch leaves the cache only after the master target has journaled it durably.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..core import logging as log
from ..core.config import ForwardConfig, resolve_credential
from ..core.errors import ConfigError, LifeboatError
from ..mobility.sender import BatchSender, ResyncRequired
from .cache import DiskCache
from .drain import CacheDrainer
from .metrics import ProcessServerMetrics

logger = log.get("lifeboat.process_server.forwarder")
QUERY_TIMEOUT_SECONDS = 10.0


class MasterTargetLink:
    """One HTTPS session to the master target, shared by every disk's forwarder."""

    def __init__(self, config: ForwardConfig) -> None:
        path = resolve_credential(config.token_file)
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError("forward.token_file", f"cannot read {path}: {exc.strerror}") from None
        self.sender = BatchSender(config.master_target_url, resolve_credential(config.ca_cert), token,
                                  config.timeout_seconds, config.retry_max_seconds)
        self.url = config.master_target_url

    async def __aenter__(self) -> "MasterTargetLink":
        await self.sender.__aenter__()
        return self

    async def close(self) -> None:
        await self.sender.__aexit__(None, None, None)

    async def acked_seq(self, disk_id: str) -> int:
        """One bounded attempt (the caller answers its agent 503 on failure, so nothing waits forever)."""
        assert self.sender.session
        try:
            async with self.sender.session.get(f"{self.sender.url}/api/v1/disks/{disk_id}",
                                               timeout=aiohttp.ClientTimeout(total=QUERY_TIMEOUT_SECONDS)) as resp:
                body = await self.sender._json(resp)
                if resp.status != 200:
                    raise LifeboatError(f"master target {self.url} answered HTTP {resp.status} for disk {disk_id}: "
                                        f"{body.get('message', '')}")
                return int(body["acked_seq"])
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise LifeboatError(f"master target {self.url} unreachable: {exc or type(exc).__name__}") from None


class DiskForwarder(CacheDrainer):
    """Forwards one disk's cached batches to the master target, strictly in seq order."""

    kind = "forward"

    def __init__(self, disk_id: str, cache: DiskCache, link: MasterTargetLink, metrics: ProcessServerMetrics,
                 retry_max_seconds: float, pool) -> None:
        super().__init__(disk_id, cache, metrics, retry_max_seconds, pool)
        self.link = link

    async def drain_one(self, seq: int) -> None:
        await self.forward_one(seq)

    async def recover(self, seq: int, exc: Exception) -> bool:
        """Out of order: ask the master target where it stands rather than re-sending forever."""
        if not isinstance(exc, ResyncRequired):
            return False   # a refusal (4xx) is not dropped: logged, counted, retried
        try:
            return await self.realign(seq)
        except Exception as query_exc:  # noqa: BLE001 - unreachable: retried like any failure
            logger.error("cannot ask the master target its acknowledged sequence", DISK=self.disk_id,
                         error=str(query_exc))
            return False

    async def realign(self, seq: int) -> bool:
        """After out_of_order: if the master target went back (a cancel or rollback dropped the batches these
        continue), the cached ones can never apply; drop them and continue from its acknowledged sequence."""
        acked = await self.link.acked_seq(self.disk_id)
        if seq <= acked + 1:
            return False   # it is not behind us: a transient disagreement, retried
        loop = asyncio.get_running_loop()
        dropped = await loop.run_in_executor(self.pool, self.cache.rewind, self.disk_id, acked)
        m = self.metrics
        m.forward_dropped.inc(len(dropped))
        m.uploaded_seq.labels(self.disk_id).set(acked)
        m.backlog.labels(self.disk_id).set(self.cache.backlog_bytes(self.disk_id))
        m.cache_used.set(self.cache.used_bytes)
        logger.error("master target went back: cached batches dropped (they continue a sequence it discarded); "
                     "the sender resends from its acknowledged sequence", DISK=self.disk_id,
                     master_target_acked_seq=acked, dropped=f"{dropped[0]}..{dropped[-1]}" if dropped else "",
                     count=len(dropped), reason="master target acked_seq below the cached batches (cancel or rollback)")
        return True

    async def forward_one(self, seq: int) -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self.pool, self.cache.read_batch, self.disk_id, seq)
        # BatchSender re-sends on transport errors and 5xx and honours 503 Retry-After; a
        # duplicate answer means an earlier attempt was journaled (e.g. we crashed before mark_uploaded).
        reply = await self.link.sender.send(self.disk_id, seq, body)
        await loop.run_in_executor(self.pool, self.cache.mark_uploaded, self.disk_id, seq)
        m = self.metrics
        m.forwarded_bytes.inc(len(body))
        m.uploaded_seq.labels(self.disk_id).set(seq)
        m.backlog.labels(self.disk_id).set(self.cache.backlog_bytes(self.disk_id))
        m.cache_used.set(self.cache.used_bytes)
        m.cache_free_ratio.set(self.cache.free_ratio)
        logger.info("batch forwarded", DISK=self.disk_id, BATCH=seq, bytes=len(body), status=reply.get("status"),
                    seconds=round(time.monotonic() - t0, 3))
