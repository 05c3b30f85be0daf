"""Thaw watchdog: thaws the given mount points at a deadline or when the agent that froze them dies.

Run as `python -m lifeboat.mobility.thaw_watchdog --deadline SECONDS MOUNTPOINT...` with stdin a
pipe from the agent. It prints "armed" on stdout once ready, then waits: the line "thawed" on
stdin means the agent thawed everything itself (exit 0, nothing done); EOF without it means the
agent died, and the deadline passing means the agent hangs: both thaw every mount point. SIGTERM,
SIGINT and SIGHUP thaw at once too (e.g. systemd stopping the unit's whole cgroup). It logs only
to stderr (journald), and only after thawing: the log could be on a frozen filesystem.
Exit codes: 0 nothing had to be thawed, 3 it thawed at least one filesystem, 1 a thaw failed,
2 bad arguments or a mount point it could not open (before "armed": nothing was frozen yet).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import select
import signal
import sys
import time



class _Logger:
    """Imports and configures structlog only when there is something to say: the common path
    (armed, told "thawed", exit) must start fast, because every group member spawns one right
    before it freezes and the slowest spawn widens the group's hold window."""

    def __getattr__(self, level: str):
        from ..core import logging as log
        log.configure(identifier="lifeboat-thaw-watchdog")
        return getattr(log.get("lifeboat.mobility.thaw_watchdog"), level)


logger = _Logger()

FITHAW = 0xC0045878
THAW_ATTEMPTS = 3


class _Signalled(Exception):
    pass


def _on_signal(signum, _frame) -> None:
    raise _Signalled(signal.Signals(signum).name)


def _wait(deadline: float) -> str:
    """Block until "thawed" (-> "done"), EOF ("agent gone") or the deadline ("deadline")."""
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "deadline"
        ready, _, _ = select.select([0], [], [], remaining)
        if not ready:
            continue
        data = os.read(0, 4096)
        if not data:
            return "agent gone"
        buf += data
        if b"thawed\n" in buf:
            return "done"


def _thaw(fds: list[tuple[str, int]]) -> tuple[list[str], list[str], list[str]]:
    """Thaw each; (thawed, were not frozen, failed)."""
    thawed, idle, failed = [], [], []
    for path, fd in fds:
        for attempt in range(THAW_ATTEMPTS):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                thawed.append(path)
                break
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    idle.append(path)
                    break
                if attempt == THAW_ATTEMPTS - 1:
                    failed.append(f"{path}: {exc.strerror}")
                else:
                    time.sleep(0.5)
    return thawed, idle, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifeboat.mobility.thaw_watchdog")
    parser.add_argument("--deadline", type=float, required=True, help="seconds until it thaws regardless")
    parser.add_argument("mountpoints", nargs="+")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    fds = []
    for path in args.mountpoints:
        try:
            # Opened now, before anything is frozen: no path lookups are needed to thaw later.
            fds.append((path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)))
        except OSError as exc:
            logger.error("cannot open mount point; not arming", mountpoint=path, reason=exc.strerror)
            return 2
    try:
        # We are the last line of defence for a frozen filesystem: the OOM killer must pick others.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        for signum in stop_signals:
            signal.signal(signum, _on_signal)
        os.write(1, b"armed\n")
        os.close(1)
        reason = _wait(deadline)
    except _Signalled as sig:
        reason = f"signal {sig}"
    for signum in stop_signals:
        signal.signal(signum, signal.SIG_IGN)   # finish thawing even if signalled again
    if reason == "done":
        return 0
    # Thaw first, log afterwards: stderr may be a file on one of these filesystems.
    thawed, idle, failed = _thaw(fds)
    try:
        if failed:
            logger.error("thaw watchdog could not thaw; writes stay blocked until 'fsfreeze -u'",
                         reason=reason, failed=failed, thawed=thawed)
        elif thawed:
            logger.warning("thaw watchdog thawed filesystems the agent left frozen; "
                           "that cycle's point is not consistent", reason=reason, thawed=thawed,
                           deadline_seconds=args.deadline)
    except OSError:
        pass   # stderr gone with the agent: the thaw is what mattered
    if failed:
        return 1
    return 3 if thawed else 0


if __name__ == "__main__":
    sys.exit(main())
