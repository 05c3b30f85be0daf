"""The periodic retention pass: every protected machine's points thinned by its replication policy."""

from __future__ import annotations

import asyncio
from typing import Callable

from ..core import logging as log
from ..core.errors import LifeboatError, PointNotFound
from ..repository import retention
from . import inventory as inv
from .store import Store

logger = log.get("lifeboat.control.retention")
FIRST_PASS_DELAY_SECONDS = 5.0    # let the process server settle (uploads of its cache) before the first pass


class RetentionTask:
    def __init__(self, store: Store, repository: Callable[[], object], interval_seconds: float,
                 work_dir: str | None = None) -> None:
        self.store = store
        self.work_dir = work_dir   # where checkpoint builds keep their sparse image (None: $TMPDIR)
        self.repository = repository
        self.interval_seconds = interval_seconds
        self.task: asyncio.Task | None = None
        self.passes = 0

    def start(self) -> None:
        if self.interval_seconds > 0:
            self.task = asyncio.create_task(self._loop(), name="retention")

    async def _loop(self) -> None:
        await asyncio.sleep(min(FIRST_PASS_DELAY_SECONDS, self.interval_seconds))
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval_seconds)

    async def run_once(self) -> list[retention.RetentionReport]:
        """One pass over every protected machine; a failing machine is logged and the pass goes on."""
        repo = self.repository()
        if repo is None:
            return []
        reports = []
        machines = await self.store.call(inv.list_machines)
        for m in machines:
            policy = await self.store.call(inv.get_policy, m["policy"])
            rp = retention.RetentionPolicy(retention_seconds=policy["retention_seconds"],
                                           keep_all_seconds=policy["keep_all_seconds"])
            try:
                report = await retention.apply_retention(repo, m["name"], rp, work_dir=self.work_dir)
            except PointNotFound:
                continue   # protected, but no point uploaded yet (initial copy): nothing to thin
            except (LifeboatError, OSError) as exc:
                logger.error("retention pass failed for a machine", MACHINE=m["name"], error=str(exc))
                continue
            reports.append(report)
            logger.info("retention pass", MACHINE=m["name"], policy=policy["name"], kept=len(report.kept_points),
                        dropped=len(report.dropped_points), checkpoints=len(report.checkpoints_written),
                        deleted_objects=len(report.deleted_objects), bytes_before=report.bytes_before,
                        bytes_after=report.bytes_after)
        self.passes += 1
        return reports

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
