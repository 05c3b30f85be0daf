"""structlog set-up for journald: syslog priority prefixes, key=value or JSON lines on stderr."""

from __future__ import annotations

import logging
import sys

import structlog

# sd-daemon(3) priority prefixes: journald strips "<N>" and stores it as PRIORITY=N.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _priority_prefix(_logger, method: str, event_dict: dict) -> dict:
    event_dict["_prio"] = _PRIORITY.get(method, 6)
    return event_dict


class _PrefixRenderer:
    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, logger, method, event_dict):
        prio = event_dict.pop("_prio", 6)
        return f"<{prio}>{self.inner(logger, method, event_dict)}"


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured (a test
    harness or a daemonising parent may replace it later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def configure(level: str = "info", fmt: str = "auto", identifier: str = "lifeboat") -> None:
    tty = sys.stderr.isatty()
    if fmt == "auto":
        fmt = "console" if tty else "kv"
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        processors.append(_priority_prefix)
        inner = (structlog.processors.JSONRenderer(sort_keys=True) if fmt == "json"
                 else structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], sort_keys=True))
        renderer = _PrefixRenderer(inner)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(SYSLOG_IDENTIFIER=identifier)


def get(name: str | None = None):
    return structlog.get_logger(name)
