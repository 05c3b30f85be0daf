"""systemd watchdog pings that stop when the daemon's pipeline stops making progress."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Hashable

from . import logging as log
from . import sd_notify

logger = log.get("lifeboat.watchdog")

# A probe answers (progressing, why-not). It runs on the event loop, so it must be cheap.
Probe = Callable[[], tuple[bool, str]]


class StallDetector:
    """Progress of one piece of work seen from outside: stalled when it has work to do and its
    fingerprint (counters it moves as it goes) stayed the same for longer than `stall_seconds`.

    Idle work (nothing to do) is never stalled: a quiet machine must not be restarted.
    """

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._fingerprint: Hashable = None
        self._since = clock()

    def check(self, busy: bool, fingerprint: Hashable) -> float | None:
        """Seconds without progress when stalled, else None."""
        now = self._clock()
        if not busy or fingerprint != self._fingerprint:
            self._fingerprint = fingerprint if busy else None
            self._since = now
            return None
        stuck = now - self._since
        return stuck if stuck > self.stall_seconds else None


async def ping_while_progressing(probe: Probe) -> None:
    """Send WATCHDOG=1 every WATCHDOG_USEC/2 while probe() says the pipeline progresses.

    Returns at once when systemd armed no watchdog. The task itself runs on the event loop, so a
    blocked loop also stops the pings (sd_watchdog_enabled(3) recommends half the timeout).
    """
    timeout = sd_notify.watchdog_seconds()
    if timeout is None:
        return
    withheld = False
    while True:
        try:
            ok, why = probe()
        except Exception:  # noqa: BLE001 - a bug in a probe is not a stalled pipeline
            # Keep pinging on the loop's liveness alone: restarting the daemon over a probe bug
            # would turn it into an outage. Logged every time, so it cannot go unnoticed.
            logger.exception("watchdog probe failed; pinging on event-loop liveness only")
            ok, why = True, ""
        if ok:
            sd_notify.notify("WATCHDOG=1")
            if withheld:
                logger.info("pipeline progressing again, watchdog pings resumed")
            withheld = False
        elif not withheld:
            # Logged once: systemd restarts us within `timeout` unless progress resumes.
            logger.error("pipeline stalled, withholding watchdog pings", reason=why,
                         watchdog_seconds=timeout)
            withheld = True
        await asyncio.sleep(timeout / 2)
