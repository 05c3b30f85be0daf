"""Daemon start-up plumbing: glibc malloc pinning, uvloop, signals, the metrics/health listener."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import time
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import sd_notify
from .malloc import pin_malloc


def config_reloader(cls, path: str, identifier: str, current) -> Callable[[], None]:
    """A SIGHUP action: re-read the config file and apply what is cheap to apply live (the log level
    and format); other changed sections are logged as needing a restart. A bad file changes nothing."""
    from . import config as cfgmod
    from . import logging as log
    from .errors import LifeboatError

    state = {"cfg": current}

    def reload() -> None:
        logger = log.get("lifeboat.reload")
        try:
            new = cfgmod.load(cls, path)
        except LifeboatError as exc:
            logger.error("configuration reload refused: the running configuration is kept", path=path,
                         error=str(exc))
            return
        old = state["cfg"]
        log.configure(new.log.level, new.log.format, identifier)
        restart = sorted(f.name for f in dataclasses.fields(new)
                         if f.name != "log" and getattr(new, f.name) != getattr(old, f.name))
        state["cfg"] = dataclasses.replace(old, log=new.log)
        logger.info("configuration reloaded", path=path, log_level=new.log.level,
                    needs_restart=",".join(restart) or None)

    return reload


def run(main: Callable[[asyncio.Event], Awaitable[int]], reload: Callable[[], None] | None = None) -> int:
    """Run main(stop_event) on uvloop; SIGTERM/SIGINT set the event and send STOPPING=1 (no exit from handlers).

    With `reload`, SIGHUP runs it between RELOADING=1 and READY=1 (sd_notify(3)), on the loop.
    """
    pin_malloc()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep working without it
        runner = asyncio.Runner()

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # Only schedule the stop and tell systemd; the daemon's own shutdown runs on the loop.
            if not stop.is_set():
                sd_notify.notify("STOPPING=1")
                stop.set()
            # A second Ctrl-C kills at once, as an operator expects; a repeated SIGTERM does not,
            # so that an impatient `kill` cannot cut the agent's shutdown short (systemd follows
            # up with SIGKILL after TimeoutStopSec= anyway).
            loop.remove_signal_handler(signal.SIGINT)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if reload is not None:
            def on_hup() -> None:
                # MONOTONIC_USEC lets systemd (Type=notify-reload) match this reload to its signal.
                sd_notify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
                try:
                    reload()
                finally:
                    sd_notify.notify("READY=1")

            loop.add_signal_handler(signal.SIGHUP, on_hup)
        # Everything imported so far lives as long as the daemon: keep the cyclic collector from
        # re-walking it (full collections were ~2% of the agent's CPU while replicating, perf record).
        gc.freeze()
        return await main(stop)

    with runner:
        return runner.run(wrapper())


# A TLS client must finish its handshake within this: a peer that sends a partial record (or nothing)
# and waits would otherwise hold its socket for asyncio's default of 60 s.
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0


class TLSSite(web.TCPSite):
    """web.TCPSite whose TLS handshake is bounded (TCPSite itself passes no ssl_handshake_timeout)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context,
                 handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner; TCPSite.start would bind too
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout)


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int,
                               healthy: Callable[[], tuple[bool, dict]]) -> tuple[web.AppRunner, int]:
    """Serve /metrics (Prometheus text) and /healthz on their own port; returns (runner, bound port)."""

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        ok, detail = healthy()
        return web.json_response({"ok": ok, **detail}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound
