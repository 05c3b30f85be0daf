"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET, and the $WATCHDOG_USEC contract."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. 'READY=1' or 'STOPPING=1'; returns False when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            # MSG_DONTWAIT: called from the event loop; a receiver that does not read (a full
            # queue) must cost a lost message, never a blocked daemon.
            s.sendto(state.encode(), socket.MSG_DONTWAIT, addr)
        except OSError:
            return False
    return True


def watchdog_seconds() -> float | None:
    """The watchdog timeout systemd set (WatchdogSec=), or None when no watchdog is armed for us.

    As sd_watchdog_enabled(3): $WATCHDOG_PID, when set, must name this process, so that a child
    that inherited the environment does not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
