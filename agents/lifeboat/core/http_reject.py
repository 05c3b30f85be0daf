"""A refused HTTP request of a data listener (ingest, master target): its 4xx/5xx answer, counted and logged."""

from __future__ import annotations

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
