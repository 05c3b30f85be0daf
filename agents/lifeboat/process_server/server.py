"""The process-server daemon object: cache recovery, ingest listener, uploaders, metrics, shutdown."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..core import logging as log
from ..core import tls
from ..core.config import ProcessServerConfig, resolve_credential
from ..core.errors import ConfigError
from ..core.runtime import TLSSite, start_metrics_server
from ..core.watchdog import StallDetector
from ..repository.open import open_repository
from ..repository.repo import Repository
from .cache import DiskCache
from .forwarder import DiskForwarder, MasterTargetLink
from .ingest import IngestService
from .metrics import ProcessServerMetrics
from .uploader import UPLOAD_SLOTS, DiskUploader, stored_through

logger = log.get("lifeboat.process_server")

# Shutdown stages, in order. Their sum (SHUTDOWN_BUDGET_SECONDS) must stay below TimeoutStopSec=
# of systemd/lifeboat-process-server.service; tests/unit/ops checks it against the unit file.
STOP_LISTENER_SECONDS = 5          # per listener (ingest, metrics): in-flight requests finish
STOP_UPLOAD_DRAIN_SECONDS = 20     # segment uploads in progress finish (cached batches persist anyway)
STOP_CANCEL_SECONDS = 5            # cancelled uploaders unwind
STOP_REPOSITORY_CLOSE_SECONDS = 5  # the backend's connections close
LISTENERS = 3                      # ingest, metrics, management API (control role)
SHUTDOWN_BUDGET_SECONDS = (LISTENERS * STOP_LISTENER_SECONDS + STOP_UPLOAD_DRAIN_SECONDS + STOP_CANCEL_SECONDS
                           + STOP_REPOSITORY_CLOSE_SECONDS)
# Watchdog progress: a disk with cached batches must see its oldest batch uploaded, or an upload
# attempt end (a failure is retried with backoff, which is progress of a kind a restart cannot
# speed up), within this long. Longer than any sane single-segment upload (64 MiB at 1 MiB/s).
UPLOAD_STALL_SECONDS = 300.0


class ProcessServer:
    def __init__(self, config: ProcessServerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = ProcessServerMetrics(registry)
        self.pool = ThreadPoolExecutor(max(2, config.upload.threads), thread_name_prefix="ps-work")
        self.cache = DiskCache(config.cache.dir, config.cache.max_bytes, config.cache.high_water_ratio)
        self.repo: Repository | None = None
        self.uploaders: dict[str, DiskUploader | DiskForwarder] = {}
        self.forward: MasterTargetLink | None = None  # failback: deliver to a master target, not the repository
        self._runners: list[web.AppRunner] = []
        self.ingest_port = 0
        self.metrics_port = 0
        self._stalls: dict[str, StallDetector] = {}
        self.control = None   # ControlRole when [control] enabled = true (the primary)
        self.primary = None   # PrimaryLink when [control] primary_url is set (a scale-out)
        self._upload_slots: asyncio.Semaphore | None = None

    def _token(self) -> str:
        if not self.config.ingest.accept_shared_token:
            return ""
        path = resolve_credential(self.config.ingest.agent_token_file)
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError("ingest.agent_token_file", f"cannot read {path}: {exc.strerror}") from None
        if len(token) < 16:
            raise ConfigError("ingest.agent_token_file", f"{path} holds a token shorter than 16 characters")
        return token

    async def start(self) -> None:
        cfg = self.config
        token = self._token()
        if cfg.forward.master_target_url:
            self.forward = await MasterTargetLink(cfg.forward).__aenter__()
        else:
            self.repo = await open_repository(cfg.repository)
        acked = await asyncio.get_running_loop().run_in_executor(self.pool, self.cache.recover)
        for disk in self.cache.disks():
            self._uploader(disk)
        self.metrics.cache_capacity.set(self.cache.capacity_bytes)
        self.metrics.cache_used.set(self.cache.used_bytes)
        self.metrics.cache_free_ratio.set(self.cache.free_ratio)
        logger.info("cache recovered", disks=len(acked), pending_bytes=self.cache.used_bytes,
                    repository=self.repo.backend.location if self.repo else None,
                    forward=cfg.forward.master_target_url or None)
        ingest = IngestService(self.cache, token, cfg.ingest.max_batch_bytes, cfg.cache.retry_after_seconds,
                               self.metrics, self.pool, self._stored, self._adopt,
                               self._machine_of if (cfg.control.enabled or cfg.control.primary_url) else None)
        ingest.body_idle_timeout_seconds = cfg.ingest.body_idle_timeout_seconds
        ingest.body_min_bytes_per_second = cfg.ingest.body_min_bytes_per_second
        runner = web.AppRunner(ingest.app(), access_log=None, handle_signals=False)
        await runner.setup()
        ssl_ctx = tls.server_context(resolve_credential(cfg.ingest.tls_cert), resolve_credential(cfg.ingest.tls_key))
        site = TLSSite(runner, cfg.ingest.host, cfg.ingest.port, ssl_context=ssl_ctx)
        await site.start()
        self.ingest_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runners.append(runner)
        mrunner, self.metrics_port = await start_metrics_server(
            self.metrics.registry, cfg.metrics.host, cfg.metrics.port, self.health)
        self._runners.append(mrunner)
        if cfg.control.primary_url:
            from ..control.link import PrimaryLink  # a scale-out checks agent credentials with the primary
            self.primary = PrimaryLink(cfg.control)
            await self.primary.start()
        if cfg.control.enabled:
            from ..control.role import ControlRole  # only the primary pays for the control role's imports
            self.control = ControlRole(cfg, self.metrics.registry, server=self)
            await self.control.start(self.ingest_port)
        logger.info("process server ready", ingest_port=self.ingest_port, metrics_port=self.metrics_port)

    async def _machine_of(self, token: str) -> str:
        """Per-machine agent credentials: the machine a token belongs to (control/link.py)."""
        checker = self.control or self.primary
        if checker is None:
            from .ingest import CredentialRefused
            raise CredentialRefused(503, "auth_unavailable", "the configuration server is starting; retry shortly")
        return await checker.machine_of(token)

    def health(self) -> tuple[bool, dict]:
        failing = {d: u.failing for d, u in self.uploaders.items() if u.failing}
        return not failing, {"cache_free_ratio": round(self.cache.free_ratio, 4), "failing_uploads": failing}

    def progress(self) -> tuple[bool, str]:
        """Watchdog probe: (True, "") unless some disk's uploads stopped moving; see UPLOAD_STALL_SECONDS."""
        attempts_failed = sum(s.value for m in self.metrics.upload_errors.collect() for s in m.samples
                              if s.name.endswith("_total"))
        for disk, up in self.uploaders.items():
            pending = self.cache.pending(disk)
            if pending and (up.task is None or up.task.done()):
                return False, f"the uploader of {disk} has ended with {len(pending)} batches cached"
            stall = self._stalls.setdefault(disk, StallDetector(UPLOAD_STALL_SECONDS))
            stuck = stall.check(bool(pending), (pending[0] if pending else None, attempts_failed))
            if stuck is not None:
                return False, f"batch {disk}/{pending[0]} neither uploaded nor failed for {stuck:.0f} s"
        return True, ""

    def _uploader(self, disk: str) -> DiskUploader:
        up = self.uploaders.get(disk)
        if up is None and self.forward is not None:
            up = self.uploaders[disk] = DiskForwarder(disk, self.cache, self.forward, self.metrics,
                                                      self.config.forward.retry_max_seconds, self.pool)
            up.start()
        if up is None:
            assert self.repo is not None
            if self._upload_slots is None:  # created on the loop that runs the uploaders
                self._upload_slots = asyncio.Semaphore(UPLOAD_SLOTS)
            up = self.uploaders[disk] = DiskUploader(disk, self.cache, self.repo, self.pool, self.metrics,
                                                     self.config.upload.retry_max_seconds, self._upload_slots)
            up.start()
        return up

    def _stored(self, disk: str, seq: int) -> None:
        self.metrics.cache_used.set(self.cache.used_bytes)
        self.metrics.cache_free_ratio.set(self.cache.free_ratio)
        self.metrics.backlog.labels(disk).set(self.cache.backlog_bytes(disk))
        self._uploader(disk).wakeup.set()

    async def _adopt(self, disk: str) -> None:
        """First contact for a disk this cache has no state for: continue from the repository's log."""
        if self.cache.known(disk):
            return
        if self.forward is not None:  # continue from what the master target has journaled
            seqs = [await self.forward.acked_seq(disk)]
        else:
            assert self.repo is not None
            seqs = await self.repo.list_segments(disk)
            through = stored_through(seqs)   # not past a gap left by the uploader's window
            seqs = [s for s in seqs if s <= through]
        if not self.cache.known(disk):
            self.cache.adopt(disk, seqs[-1] if seqs else 0)
            if seqs:
                logger.warning("disk adopted from the repository log", DISK=disk, uploaded_seq=seqs[-1])
            self._uploader(disk)

    async def stop(self) -> None:
        """Stop accepting, give in-progress uploads time to finish, then cancel (cached batches persist)."""
        if self.control is not None:
            await self.control.stop()
        if self.primary is not None:
            await self.primary.close()
        for runner in self._runners:
            try:
                await asyncio.wait_for(runner.cleanup(), STOP_LISTENER_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("listener did not close in time", seconds=STOP_LISTENER_SECONDS)
        deadline = asyncio.get_running_loop().time() + STOP_UPLOAD_DRAIN_SECONDS
        while any(u.busy for u in self.uploaders.values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        tasks = [u.task for u in self.uploaders.values() if u.task]
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_CANCEL_SECONDS)
            if late:
                logger.warning("uploaders did not unwind in time", disks=len(late), seconds=STOP_CANCEL_SECONDS)
        if self.forward:
            await self.forward.close()
        if self.repo:
            try:
                await asyncio.wait_for(self.repo.backend.close(), STOP_REPOSITORY_CLOSE_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("repository did not close in time", seconds=STOP_REPOSITORY_CLOSE_SECONDS)
        # Queued encode work is dropped; a running slice (FRAMES_PER_TASK frames) takes milliseconds.
        self.pool.shutdown(wait=True, cancel_futures=True)
