"""The mobility agent: reconcile state with the process server, then run replication cycles."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ..core import logging as log
from ..core.config import MobilityConfig, resolve_credential
from ..core.errors import ConfigError, LifeboatError
from .digest_map import DigestMap
from .digest_tracker import PendingBatch, ScanAborted, device_size, scan_disk
from .metrics import MobilityMetrics
from .quiescer import run_script
from .sender import BatchSender

logger = log.get("lifeboat.mobility")
# Batches read ahead of the sender per disk. Peak memory per disk is about (QUEUE_BATCHES + 2) ×
# batch_bytes of payload plus the copy made by to_bytes(): measured ~7 × batch_bytes (bench/README.md).
QUEUE_BATCHES = 2


@dataclass
class DiskState:
    name: str        # as configured ("sda")
    disk_id: str     # repository-wide id ("web01.sda")
    path: str
    dmap: DigestMap
    resync_reason: str | None = None


class Agent:
    def __init__(self, config: MobilityConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = MobilityMetrics(registry)
        self.disks: list[DiskState] = []
        self.sender: BatchSender | None = None
        self.cycle = 0
        self.last_point: dict | None = None

    def _token(self) -> str:
        path = resolve_credential(self.config.process_server.token_file)
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError("process_server.token_file", f"cannot read {path}: {exc.strerror}") from None

    async def start(self) -> None:
        cfg = self.config
        os.makedirs(cfg.state_dir, exist_ok=True)
        link = cfg.process_server
        self.sender = BatchSender(link.url, resolve_credential(link.ca_cert), self._token(),
                                  link.timeout_seconds, link.retry_max_seconds)
        await self.sender.__aenter__()
        for i, d in enumerate(cfg.disks):
            try:
                size = device_size(d.path)
            except OSError as exc:
                raise ConfigError(f"disks[{i}].path", f"cannot open {d.path}: {exc.strerror}") from None
            if size == 0 or size % 512:
                raise ConfigError(f"disks[{i}].path", f"{d.path} has {size} bytes, not a positive multiple of 512")
            disk_id = f"{cfg.machine}.{d.id}"
            acked = await self.sender.acked_seq(disk_id)
            state = self._reconcile(disk_id, d.path, size, acked)
            state.name = d.id
            self.disks.append(state)
        self.cycle = max(s.dmap.cycle for s in self.disks)

    def _reconcile(self, disk_id: str, path: str, size: int, acked: int) -> DiskState:
        """Decide whether the persisted map can be trusted against what the process server has."""
        bs = self.config.replication.block_size
        map_path = os.path.join(self.config.state_dir, f"{disk_id}.digests")
        dmap = DigestMap.load(map_path)
        reason = None
        if dmap is None:
            if acked == 0:
                dmap = DigestMap.fresh(map_path, bs, size, replica_is_zero=True)  # initial replication
            else:
                reason = "no_local_state" if not os.path.exists(map_path) else "map_damaged"
        elif dmap.disk_size != size or dmap.block_size != bs:
            reason = "geometry_changed"
        elif dmap.seq > acked:
            reason = "server_behind"
        if reason:
            self.metrics.resyncs.labels(reason).inc()
            logger.warning("full resync: replica state unknown", DISK=disk_id, reason=reason, acked_seq=acked,
                           local_seq=dmap.seq if dmap else None)
            # Point ids carry the cycle number; every cycle used at least one sequence number, so
            # continuing past the acked seq keeps ids unique even when the local count was lost.
            cycle = max(dmap.cycle if dmap else 0, acked)
            dmap = DigestMap.fresh(map_path, bs, size, replica_is_zero=False)
            dmap.cycle = cycle
        # Batches past the last completed cycle may have reached the server; their blocks were
        # marked UNKNOWN in the map file before they were sent, so continuing is safe.
        dmap.seq = acked
        dmap.save()
        return DiskState("", disk_id, path, dmap, reason)

    async def close(self) -> None:
        if self.sender:
            await self.sender.__aexit__(None, None, None)

    async def run_cycle(self) -> dict:
        """One cycle: pre script → read + send every disk → post script → bookmark acked → map saved."""
        cfg = self.config
        self.cycle += 1
        t0 = time.monotonic()
        created = time.time()
        point_id = f"{cfg.machine}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(created))}-{self.cycle:06d}"
        env = {"LIFEBOAT_POINT_ID": point_id, "LIFEBOAT_MACHINE": cfg.machine, "LIFEBOAT_CYCLE": str(self.cycle)}
        q = cfg.consistency
        consistency = "none"
        if q.pre_script:
            ok, why = await run_script(q.pre_script, "pre", q.script_timeout_seconds, env)
            if ok:
                consistency = "crash"
            else:
                self.metrics.script_failures.labels("pre").inc()
                logger.error("pre script failed: this point will not be marked consistent", POINT=point_id, reason=why)
            created = time.time()
        try:
            results = await self._read_and_send(point_id, created, consistency, run_post=bool(q.post_script), env=env)
        except BaseException:
            if q.post_script and not self._post_done:
                await self._post(env, point_id)
            self.cycle -= 1
            self.metrics.cycles.labels("failed").inc()
            raise
        seconds = time.monotonic() - t0
        self.metrics.cycles.labels("ok").inc()
        self.metrics.cycle_seconds.observe(seconds)
        self.metrics.last_point.set(created)
        self.last_point = {"point_id": point_id, "created": created, "consistency": consistency}
        logger.info("cycle complete", POINT=point_id, consistency=consistency, seconds=round(seconds, 3),
                    changed_bytes=sum(r.changed_bytes for r in results),
                    zeroed_bytes=sum(r.zero_bytes for r in results), disks=len(results))
        return {**self.last_point, "cycle": self.cycle}

    async def _post(self, env: dict, point_id: str) -> None:
        self._post_done = True
        ok, why = await run_script(self.config.consistency.post_script, "post",
                                   self.config.consistency.script_timeout_seconds, env)
        if not ok:
            self.metrics.script_failures.labels("post").inc()
            logger.error("post script failed", POINT=point_id, reason=why)

    async def _read_and_send(self, point_id: str, created: float, consistency: str, run_post: bool, env: dict):
        self._post_done = False
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        rep = self.config.replication

        queues: dict[str, asyncio.Queue] = {}
        scans: dict[str, asyncio.Future] = {}
        for state in self.disks:
            queue: asyncio.Queue[PendingBatch] = asyncio.Queue(QUEUE_BATCHES)
            queues[state.disk_id] = queue

            def put(pending: PendingBatch, queue=queue) -> None:
                while True:  # bounded hand-off to the event loop, abandoned if the cycle aborts
                    if abort.is_set():
                        raise ScanAborted()
                    fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(queue.put(pending), 1.0), loop)
                    try:
                        return fut.result()
                    except asyncio.TimeoutError:
                        continue

            def bookmark(image_digest: str) -> dict:
                return {"point_id": point_id, "machine": self.config.machine, "created": created,
                        "consistency": consistency, "cycle": self.cycle, "block_size": rep.block_size,
                        "image_digest": image_digest}

            scans[state.disk_id] = loop.run_in_executor(
                None, scan_disk, state.path, state.disk_id, state.dmap, state.dmap.seq + 1, rep.extent_max_bytes,
                rep.batch_bytes, bookmark, put, abort.is_set)

        async def send_disk(state: DiskState):
            queue = queues[state.disk_id]
            while True:
                pending = await queue.get()
                await loop.run_in_executor(None, state.dmap.mark_unknown_on_disk, pending.block_ranges)
                body = pending.builder.to_bytes()
                await self.sender.send(state.disk_id, pending.builder.seq, body)
                self.metrics.sent_bytes.inc(len(body))
                if pending.last:
                    break
            result = await scans[state.disk_id]
            self.metrics.read_bytes.labels(state.disk_id).inc(result.read_bytes)
            self.metrics.changed_bytes.labels(state.disk_id).inc(result.changed_bytes)
            return state, result

        async def post_after_reads() -> None:
            # Writers resume as soon as every disk has been read; the last batches may still be in flight.
            await asyncio.gather(*scans.values(), return_exceptions=True)
            if run_post:
                await self._post(env, point_id)

        post_task = asyncio.create_task(post_after_reads())
        tasks = [asyncio.create_task(send_disk(s)) for s in self.disks]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            abort.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, *scans.values(), return_exceptions=True)
            await post_task
            raise
        await post_task
        for state, result in done:
            state.dmap.digests = result.digests
            state.dmap.seq = result.last_seq
            state.dmap.cycle = self.cycle
            await loop.run_in_executor(None, state.dmap.save)
        return [r for _, r in done]

    async def run(self, stop: asyncio.Event, cycles: int | None = None) -> None:
        """Cycle every interval until stopped (or for `cycles` cycles); a failed cycle is retried next time."""
        interval = self.config.replication.interval_seconds
        n = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await self.run_cycle()
            except LifeboatError as exc:
                logger.error("cycle failed", error=str(exc))
            n += 1
            if cycles is not None and n >= cycles:
                return
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass
