"""The agent's link to the configuration server: a heartbeat per cycle, its policy, and moves between process servers."""

from __future__ import annotations

import asyncio
import time

from ..control.auth import read_secret_file
from ..control.client import ApiCallFailed, ApiClient
from ..core import logging as log
from ..core.config import MobilityConfig, resolve_credential
from ..core.errors import ConfigError
from .sender import BatchSender

logger = log.get("lifeboat.mobility.control")
HOLD_POLL_SECONDS = 1.0


class ControlLink:
    def __init__(self, config: MobilityConfig) -> None:
        c = config.control
        self.config = config
        cred = c.credential_file or config.process_server.token_file
        try:
            token = read_secret_file(resolve_credential(cred))
        except OSError as exc:
            raise ConfigError("control.credential_file", f"cannot read {cred}: {exc.strerror}") from None
        self.ca = resolve_credential(c.ca_cert or config.process_server.ca_cert)
        self.client = ApiClient(c.api_url, self.ca, token, c.timeout_seconds)
        self.reply: dict | None = None
        self._task: asyncio.Task | None = None
        self._last_changed: dict[str, float] = {}
        self._last_at = time.monotonic()
        self.failures = 0

    def report(self, agent, state: str) -> dict:
        """What `lifeboat status` shows for this machine: per disk tier, backlog, churn, last resync."""
        now = time.monotonic()
        elapsed = max(now - self._last_at, 1e-3)
        self._last_at = now
        status = agent.status()
        disks = {}
        for s in agent.disks:
            changed = agent.metrics.changed_bytes.labels(s.disk_id)._value.get()
            churn = (changed - self._last_changed.get(s.disk_id, changed)) / elapsed
            self._last_changed[s.disk_id] = changed
            bs = s.dmap.block_size
            owed = sum(n for _, n in (s.owed or ())) * bs
            kept = 0
            if s.change_log is not None:
                st = s.change_log.stats
                kept = st["pool_bytes"] + st["spill_bytes"]
            resync = agent.resyncs_seen.get(s.disk_id)
            d = status["disks"].get(s.disk_id, {})
            disks[s.disk_id] = {"tracker": d.get("tracker"), "tier": d.get("tier") or "data",
                                "tier_reason": d.get("tier_reason") or "", "backlog_bytes": owed + kept,
                                "churn_bytes_per_second": round(max(churn, 0.0), 1), "acked_seq": s.dmap.seq,
                                **({"last_resync_reason": resync[0], "last_resync_at": resync[1]} if resync else {})}
        return {"state": state, "last_point": status["last_point"], "disks": disks}

    async def heartbeat(self, agent, state: str = "replicating") -> dict | None:
        try:
            reply = await self.client.call("POST", f"/machines/{self.config.machine}/heartbeat", self.report(agent, state))
        except ApiCallFailed as exc:
            self.failures += 1
            logger.warning("heartbeat failed; replication goes on", error=str(exc), failures=self.failures)
            return None
        self.failures = 0
        self.reply = reply
        self._apply_policy(agent, reply.get("policy") or {})
        return reply

    def after_cycle(self, agent, ok: bool) -> None:
        """Report in the background: a slow API never delays the next cycle (one heartbeat in flight)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.heartbeat(agent, "replicating" if ok else "cycle_failed"),
                                             name="heartbeat")

    def _apply_policy(self, agent, policy: dict) -> None:
        if not self.config.control.apply_policy or not policy:
            return
        rep, q = agent.config.replication, agent.config.consistency
        crash, app = policy.get("crash_interval_seconds"), policy.get("app_interval_seconds")
        if isinstance(crash, (int, float)) and crash > 0 and crash != rep.interval_seconds:
            logger.info("policy: crash-consistent interval", seconds=crash, was=rep.interval_seconds,
                        policy=policy.get("name"))
            rep.interval_seconds = float(crash)
        if isinstance(app, (int, float)) and app >= 0 and app != q.app_interval_seconds:
            logger.info("policy: app-consistent interval", seconds=app, was=q.app_interval_seconds,
                        policy=policy.get("name"))
            q.app_interval_seconds = float(app)

    async def before_cycle(self, agent, stop: asyncio.Event) -> None:
        """Wait out a move's drain (no batches meanwhile), then switch to the assigned process server."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=self.config.control.timeout_seconds)
        deadline = time.monotonic() + self.config.control.hold_max_seconds
        while self.reply and self.reply.get("hold") and not stop.is_set():
            if time.monotonic() > deadline:
                logger.warning("move still draining; replicating to the old process server meanwhile",
                               reason=self.reply.get("hold_reason"))
                return
            logger.info("holding cycles for a move", reason=self.reply.get("hold_reason"))
            try:
                await asyncio.wait_for(stop.wait(), HOLD_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            if await self.heartbeat(agent, "moving") is None:
                return
        url = ((self.reply or {}).get("process_server") or {}).get("url")
        if url and url.rstrip("/") != agent.sender.url:
            await self._switch(agent, url)

    async def _switch(self, agent, url: str) -> None:
        link = self.config.process_server
        token = read_secret_file(resolve_credential(link.token_file))
        new = BatchSender(url, resolve_credential(link.ca_cert), token, link.timeout_seconds, link.retry_max_seconds)
        await new.__aenter__()
        old, agent.sender = agent.sender, new
        await old.__aexit__(None, None, None)
        for s in agent.disks:
            # The new process server continues each disk's log from the repository (no resync):
            # its acknowledged sequence must be the agent's.
            acked = await new.acked_seq(s.disk_id)
            if acked != s.dmap.seq:
                logger.error("new process server is not at the agent's sequence (a resync will follow)",
                             DISK=s.disk_id, server_seq=acked, agent_seq=s.dmap.seq)
        logger.warning("moved to another process server", old=old.url, new=new.url,
                       process_server=(self.reply or {}).get("process_server", {}).get("name"))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=self.config.control.timeout_seconds)
        await self.client.close()
