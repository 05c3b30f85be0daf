"""The master-target daemon object: registry, journal recovery, per-disk appliers, the 9444 listener, shutdown."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..core import logging as log
from ..core import tls
from ..core.config import MasterTargetConfig, resolve_credential
from ..core.runtime import TLSSite, start_metrics_server
from .journal import Journal
from .metrics import MasterTargetMetrics
from ..core.http_reject import BodyLimits
from .receiver import Receiver
from .registry import Registry

logger = log.get("lifeboat.master_target")

# Shutdown stages; SHUTDOWN_BUDGET_SECONDS must stay below TimeoutStopSec= of its unit (tested).
STOP_LISTENER_SECONDS = 5          # per listener (data, metrics)
STOP_APPLY_DRAIN_SECONDS = 5       # an entry being applied finishes (else it is re-applied at start)
LISTENERS = 2
SHUTDOWN_BUDGET_SECONDS = LISTENERS * STOP_LISTENER_SECONDS + STOP_APPLY_DRAIN_SECONDS
APPLY_RETRY_MAX_SECONDS = 30.0


class DiskApplier:
    """Applies one disk's journal entries in seq order, retrying failures with capped backoff."""

    def __init__(self, disk_id: str, mt: "MasterTarget") -> None:
        self.disk_id = disk_id
        self.mt = mt
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.busy = False
        self.failing: str | None = None
        self.task = asyncio.create_task(self._run(), name=f"apply-{disk_id}")

    async def _run(self) -> None:
        delay = 0.2
        loop = asyncio.get_running_loop()
        journal, metrics = self.mt.journal, self.mt.metrics
        while True:
            dj = journal.disk(self.disk_id)
            if not dj.pending or dj.held:
                if not dj.pending:
                    self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            self.idle.clear()
            self.busy = True
            try:
                self.mt.registry.reload()
                target = self.mt.registry.disks.get(self.disk_id)
                if target is None:
                    raise RuntimeError(f"disk {self.disk_id} has journaled batches but is no longer registered")
                t0 = time.monotonic()
                result = await loop.run_in_executor(self.mt.pool, journal.apply_next, target)
                self.failing, delay = None, 0.2
                if result is None:
                    continue
                metrics.applied_bytes.inc(result.written_bytes + result.zeroed_bytes)
                metrics.applied_seq.labels(self.disk_id).set(result.seq)
                metrics.lag.labels(self.disk_id).set(dj.lag_bytes)
                if result.points:
                    metrics.points.inc(len(result.points))
                    metrics.last_point.labels(self.disk_id).set(max(float(p["created"]) for p in result.points))
                logger.info("batch applied", DISK=self.disk_id, BATCH=result.seq, frames=result.frames,
                            written_bytes=result.written_bytes, zeroed_bytes=result.zeroed_bytes,
                            seconds=round(time.monotonic() - t0, 3),
                            POINT=",".join(p["point_id"] for p in result.points) or None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, logged, counted; the entry stays journaled
                self.failing = f"{type(exc).__name__}: {exc}"
                metrics.apply_errors.inc()
                logger.error("apply failed, will retry", DISK=self.disk_id, error=str(exc), retry_in_seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, APPLY_RETRY_MAX_SECONDS)
            finally:
                self.busy = False


class MasterTarget:
    def __init__(self, config: MasterTargetConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = MasterTargetMetrics(registry)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="mt-work")
        self.registry = Registry(config.state_dir)
        self.journal = Journal(os.path.join(config.state_dir, "journal"), config.failback.retention_seconds)
        self.appliers: dict[str, DiskApplier] = {}
        self._runners: list[web.AppRunner] = []
        self.data_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        cfg = self.config
        disks = await asyncio.get_running_loop().run_in_executor(self.pool, self.journal.recover)
        for disk_id, dj in disks.items():
            if dj.rollback is not None:  # a switch to an earlier point was interrupted: finish it first
                target = self.registry.disks.get(disk_id)
                if target is None:
                    raise RuntimeError(f"disk {disk_id} was being switched back to point "
                                       f"{dj.rollback['point_id']} but is no longer registered")
                done = await asyncio.get_running_loop().run_in_executor(self.pool, self.journal.resume_rollback, target)
                logger.warning("interrupted switch to an earlier point finished", DISK=disk_id, **done)
            self.metrics.applied_seq.labels(disk_id).set(dj.applied_seq)
            self.metrics.acked_seq.labels(disk_id).set(dj.acked_seq)
            self.metrics.lag.labels(disk_id).set(dj.lag_bytes)
            self._applier(disk_id).wakeup.set()   # resume an interrupted apply at once
        logger.info("journal recovered", disks=len(disks), pending_bytes=self.journal.lag_bytes,
                    registered_disks=len(self.registry.disks))
        alternate = cfg.ingest.alternate_dir or os.path.join(cfg.state_dir, "alternate")
        receiver = Receiver(self.registry, self.journal, self.metrics, self.pool, cfg.ingest.max_batch_bytes,
                            cfg.ingest.journal_max_bytes, cfg.ingest.retry_after_seconds, alternate,
                            self._stored, self.wait_applied,
                            BodyLimits(cfg.ingest.body_idle_timeout_seconds, cfg.ingest.body_min_bytes_per_second))
        runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False)
        await runner.setup()
        ssl_ctx = tls.server_context(resolve_credential(cfg.ingest.tls_cert), resolve_credential(cfg.ingest.tls_key))
        site = TLSSite(runner, cfg.ingest.host, cfg.ingest.port, ssl_context=ssl_ctx)
        await site.start()
        self.data_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runners.append(runner)
        mrunner, self.metrics_port = await start_metrics_server(self.metrics.registry, cfg.metrics.host,
                                                                cfg.metrics.port, self.health)
        self._runners.append(mrunner)
        logger.info("master target ready", data_port=self.data_port, metrics_port=self.metrics_port)

    def _applier(self, disk_id: str) -> DiskApplier:
        ap = self.appliers.get(disk_id)
        if ap is None:
            ap = self.appliers[disk_id] = DiskApplier(disk_id, self)
        return ap

    def _stored(self, disk_id: str) -> None:
        ap = self._applier(disk_id)
        ap.idle.clear()
        ap.wakeup.set()

    async def wait_applied(self, disk_id: str, timeout: float) -> bool:
        if not self.journal.disk(disk_id).pending:
            return True
        try:
            await asyncio.wait_for(self._applier(disk_id).idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return not self.journal.disk(disk_id).pending

    def health(self) -> tuple[bool, dict]:
        failing = {d: a.failing for d, a in self.appliers.items() if a.failing}
        now = time.time()
        rpo = self.config.failback.rpo_threshold_seconds
        disks = {}
        for disk_id, dj in self.journal.disks.items():
            newest = max((float(p.get("created", 0)) for p in dj.points), default=None)
            disks[disk_id] = {"acked_seq": dj.acked_seq, "applied_seq": dj.applied_seq, "lag_bytes": dj.lag_bytes,
                              "applied_bytes": dj.applied_bytes, "points": len(dj.points),
                              "rpo_seconds": round(now - newest, 1) if newest else None,
                              "rpo_exceeded": bool(newest and now - newest > rpo)}
        return not failing, {"role": "master-target", "failing_applies": failing, "disks": disks}

    def progress(self) -> tuple[bool, str]:
        for disk_id, ap in self.appliers.items():
            if ap.task.done() and self.journal.disk(disk_id).pending:
                return False, f"the applier of {disk_id} has ended with entries journaled"
        return True, ""

    async def stop(self) -> None:
        for runner in self._runners:
            try:
                await asyncio.wait_for(runner.cleanup(), STOP_LISTENER_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("listener did not close in time", seconds=STOP_LISTENER_SECONDS)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_APPLY_DRAIN_SECONDS
        while any(a.busy for a in self.appliers.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for ap in self.appliers.values():
            ap.task.cancel()
        await asyncio.gather(*(a.task for a in self.appliers.values()), return_exceptions=True)
        # A running apply_next finishes in its thread or is re-applied from its first frame at the next start.
        self.pool.shutdown(wait=False, cancel_futures=True)
