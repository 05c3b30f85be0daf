"""Daemon start-up plumbing: glibc malloc pinning, uvloop, signals, the metrics/health listener."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import signal
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import sd_notify

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def pin_malloc() -> bool:
    """Stop glibc returning ~1 MiB chunk buffers to the kernel after every chunk.

    With dynamic thresholds each 1 MiB buffer is page-faulted in again; pinning them doubles
    encrypt and upload throughput here (shared/PERF-LIMITS.md, "First: glibc malloc").
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
        ok &= libc.mallopt(_M_ARENA_MAX, 2)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run main(stop_event) on uvloop; SIGTERM/SIGINT set the event and send STOPPING=1 (no exit from handlers)."""
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
        return await main(stop)

    with runner:
        return runner.run(wrapper())


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
