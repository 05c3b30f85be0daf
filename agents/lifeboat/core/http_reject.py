"""A refused HTTP request of a data listener (ingest, master target): its 4xx/5xx answer, counted and
logged; and the bounded body read both use (408 on a body that stalls or trickles)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web


class Reject(Exception):
    """Raised inside a handler: status, a bounded-label reason (the metric's), what was wrong and what to do."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers, self.extra = status, reason, message, headers or {}, extra


def reject_response(exc: Reject, request: web.Request, rejections, logger) -> web.Response:
    """Count the refusal in `rejections` (a Counter labelled by reason), log it on the listener's logger,
    answer it as JSON."""
    rejections.labels(exc.reason).inc()
    logger.warning("request rejected", reason=exc.reason, status=exc.status, detail=exc.message,
                   path=request.path, peer=request.remote)
    return web.json_response({"error": exc.reason, "message": exc.message, **exc.extra},
                             status=exc.status, headers=exc.headers)


@dataclass
class BodyLimits:
    """How long a batch body may take: `idle_seconds` without a byte, and `idle_seconds` + length /
    `min_bytes_per_second` in all (a slowloris sender cannot hold a receive slot for ever)."""

    idle_seconds: float = 30.0
    min_bytes_per_second: int = 65536

    def deadline(self, length: int) -> float:
        return time.monotonic() + self.idle_seconds + length / max(1, self.min_bytes_per_second)

    async def read(self, request: web.Request, size: int, deadline: float) -> bytes:
        """One read of at most `size` bytes, bounded by the idle limit and the body's deadline."""
        wait = min(self.idle_seconds, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            async with asyncio.timeout(wait):  # unlike wait_for, no task per chunk
                return await request.content.read(size)
        except asyncio.TimeoutError:
            raise Reject(408, "timeout", f"body not received in time (idle limit {self.idle_seconds:g} s, at least "
                         f"{self.min_bytes_per_second} bytes/s); the sender retries") from None
