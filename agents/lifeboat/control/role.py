"""The configuration-server role inside the primary process server: store, bootstrap, HTTPS listener."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..core import logging as log
from ..core import tls
from ..core.config import ProcessServerConfig, resolve_credential
from ..core.errors import ConfigError
from ..core.runtime import TLSSite
from . import auth
from . import inventory as inv
from .api import ControlContext, build_app
from .failback import powered_off
from .metrics import ControlMetrics
from .store import Store, transaction

logger = log.get("lifeboat.control")
STOP_LISTENER_SECONDS = 5


def _secret(key: str, path: str) -> str:
    if not path:
        return ""
    try:
        value = auth.read_secret_file(resolve_credential(path))
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if len(value) < 16:
        raise ConfigError(key, f"{path} holds fewer than 16 characters: use the file 'lifeboat init' wrote")
    return value


class ControlRole:
    """Start: open + migrate the database, store the bootstrap secrets' hashes, listen. Stop: the reverse."""

    def __init__(self, config: ProcessServerConfig, registry: CollectorRegistry | None = None,
                 customize: Callable[[web.Application, ControlContext], None] | None = None,
                 server=None) -> None:
        self.config = config
        self.metrics = ControlMetrics(registry)
        self.store = Store(config.control.state_dir)
        self.ctx = ControlContext(self.store, self.metrics,
                                  credential_ttl_seconds=config.control.credential_ttl_seconds or None,
                                  server_name=config.control.name)
        self.customize = customize
        self.server = server          # the ProcessServer this role runs in (its repository, its cache)
        self.ctx.server = server
        self.runner: web.AppRunner | None = None
        self.port = 0

    def public_url(self, ingest_port: int) -> str:
        c = self.config
        host = c.ingest.host if c.ingest.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return c.control.public_url or f"https://{host}:{ingest_port}"

    async def start(self, ingest_port: int) -> None:
        cc = self.config.control
        passphrase = _secret("control.registration_passphrase_file", cc.registration_passphrase_file)
        operator = _secret("control.operator_credential_file", cc.operator_credential_file)
        await self.store.open()
        self.metrics.schema_version.set(self.store.schema_version)
        url = self.public_url(ingest_port)

        def bootstrap(conn) -> tuple[bool, bool]:
            new_pass = bool(passphrase) and auth.install_passphrase(conn, passphrase)
            new_op = bool(operator) and auth.install_token(conn, operator, "operator", "admin")
            with transaction(conn):
                conn.execute("INSERT INTO process_servers (name, url, is_primary, registered) VALUES (?, ?, 1, ?) "
                             "ON CONFLICT(name) DO UPDATE SET url = excluded.url, is_primary = 1",
                             (cc.name, url, time.time()))
            return new_pass, new_op

        new_pass, new_op = await self.store.call(bootstrap)
        # The heartbeat gauge outlives a restart: a machine that went silent before it must still alert.
        protected = {m["name"] for m in await self.store.call(inv.list_machines)}
        for machine, (received, _) in (await self.store.call(inv.heartbeats)).items():
            if machine in protected:
                self.metrics.last_heartbeat.labels(machine).set(received)
        if new_pass or new_op:
            logger.info("bootstrap secrets stored", passphrase=new_pass, operator_credential=new_op)
        operators = await self.store.call(lambda c: c.execute(
            "SELECT COUNT(*) FROM credentials WHERE kind = 'operator' AND revoked IS NULL").fetchone()[0])
        if not operators:
            logger.warning("no live operator credential: nobody can manage this deployment; set "
                           "control.operator_credential_file to a new file holding a fresh token "
                           "(e.g. from 'lifeboat init' on another directory) and restart")
        from .jobs import JobRunner, interrupt_leftovers

        interrupted = await self.store.call(interrupt_leftovers)
        if interrupted:
            logger.warning("jobs interrupted by the previous stop marked failed", jobs=interrupted)
        self.ctx.extra["jobs"] = JobRunner(self.store)
        app = build_app(self.ctx)
        if self.customize:
            self.customize(app, self.ctx)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        ssl_ctx = tls.server_context(resolve_credential(cc.tls_cert or self.config.ingest.tls_cert),
                                     resolve_credential(cc.tls_key or self.config.ingest.tls_key))
        site = TLSSite(self.runner, cc.host, cc.port, ssl_context=ssl_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        from .retention_task import RetentionTask

        # Checkpoints are built in a sparse image of the disk: on the state directory's disk, never in
        # /tmp (a tmpfs would hold the disk's used bytes in memory).
        self.retention = RetentionTask(self.store, lambda: getattr(self.server, "repo", None),
                                       cc.retention_interval_seconds, work_dir=cc.state_dir)
        self.retention.start()
        logger.info("management API ready", port=self.port, schema_version=self.store.schema_version,
                    database=self.store.path)

    async def machine_of(self, token: str) -> str:
        """The ingest's check of a per-machine agent credential (the primary has the store)."""
        from ..process_server.ingest import CredentialRefused
        from .link import agent_machine

        if self.store.conn is None:
            raise CredentialRefused(503, "auth_unavailable", "the configuration server is starting; retry shortly")
        try:
            principal = await self.store.call(auth.authenticate, token)
        except auth.Refused as exc:
            self.metrics.refusals.labels(exc.reason).inc()
            logger.warning("ingest credential refused", reason=exc.reason, detail=exc.message)
            raise CredentialRefused(exc.status, exc.reason, exc.message) from None
        machine = agent_machine(principal)
        state = await self.store.call(powered_off, machine)
        if state is not None:   # the failed-over copy is being replicated back over this machine's disks
            logger.warning("batches of a powered-off machine refused", MACHINE=machine, state=state)
            raise CredentialRefused(409, "powered_off", f"machine {machine} is {state}: the on-prem machine is "
                                    "powered off until its failback ends; run 'lifeboat reenable "
                                    f"{machine}' after 'lifeboat failback {machine} --stage switch'")
        return machine

    async def stop(self) -> None:
        if getattr(self, "retention", None) is not None:
            await self.retention.stop()
        if "jobs" in self.ctx.extra:
            await self.ctx.extra["jobs"].stop()
        if self.runner is not None:
            try:
                await asyncio.wait_for(self.runner.cleanup(), STOP_LISTENER_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("management API did not close in time", seconds=STOP_LISTENER_SECONDS)
            self.runner = None
        await self.store.close()
