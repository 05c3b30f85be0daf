"""FIFREEZE/FITHAW of a disk's mounted filesystems, guarded by a thaw watchdog in a separate process."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

from ..core import logging as log
from ..core.errors import LifeboatError

logger = log.get("lifeboat.mobility.freeze")

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
WATCHDOG_START_TIMEOUT = 15.0   # seconds for the watchdog's interpreter to start and say "armed"
WATCHDOG_EXIT_TIMEOUT = 5.0     # seconds for it to exit after "thawed" before we kill it
_AGENT_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # the directory holding "lifeboat/"


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _syncfs(fd: int) -> None:
    """syncfs(2): best effort (FIFREEZE flushes whatever is left)."""
    _libc.syncfs(fd)


class FreezeError(LifeboatError):
    """Filesystem freeze failed: {}."""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(major:minor, root inside the filesystem, mount point) for every mount, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            entries.append((fields[2], _unescape(fields[3]), _unescape(fields[4])))
    return entries


def _device_numbers(device_path: str) -> list[str]:
    """"major:minor" of the block device and of each of its partitions (from sysfs)."""
    try:
        st = os.stat(device_path)
    except OSError as exc:
        raise FreezeError(f"cannot stat {device_path}: {exc.strerror}; nothing was frozen") from None
    if not stat.S_ISBLK(st.st_mode):
        raise FreezeError(f"{device_path} is not a block device; nothing was frozen")
    own = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    numbers = [own]
    sysdir = f"/sys/dev/block/{own}"
    try:
        children = os.listdir(sysdir)
    except OSError:
        return numbers
    for child in sorted(children):
        # A partition is a subdirectory with a "partition" file; its "dev" holds major:minor.
        if os.path.exists(f"{sysdir}/{child}/partition"):
            try:
                numbers.append(Path(f"{sysdir}/{child}/dev").read_text().strip())
            except OSError:
                continue
    return numbers


def mounted_filesystems(device_path: str) -> list[str]:
    """Mount points of the block device and its partitions, one per superblock (bind mounts listed once)."""
    wanted = set(_device_numbers(device_path))
    chosen: dict[str, tuple[str, str]] = {}   # major:minor -> (root, mount point)
    for number, root, mountpoint in _mountinfo():
        if number not in wanted:
            continue
        # FIFREEZE acts on the superblock: freezing it twice fails with EBUSY, so keep one mount
        # per device, preferring the one that shows the filesystem's root.
        if number not in chosen or (chosen[number][0] != "/" and root == "/"):
            chosen[number] = (root, mountpoint)
    return [mountpoint for _root, mountpoint in chosen.values()]


def _mount_table() -> dict[str, str]:
    """Visible mount point -> major:minor; a later mount over the same path hides the earlier one."""
    return {mountpoint: number for number, _root, mountpoint in _mountinfo()}


class Frozen:
    """Context manager: freeze the mount points on entry, thaw them on exit; a watchdog thaws if we cannot.

    The watchdog is a separate process in its own session, started and armed before the first
    FIFREEZE: it thaws everything when `timeout` seconds pass or when its stdin (a pipe from
    this process) reaches EOF without the line "thawed", i.e. when this process died. Nothing is
    logged between the first freeze and the last thaw (the log may live on a frozen filesystem).
    __exit__ never raises (the body has already run, e.g. rotated a tracker's epoch); check
    `intact` afterwards: False when a filesystem was thawed before __exit__ (normally by the
    watchdog at its deadline; listed in thawed_early) or could not be thawed (thaw_errors): the
    point taken inside the block is then not consistent.
    """

    def __init__(self, mountpoints: list[str], timeout: float) -> None:
        self.mountpoints = list(mountpoints)
        self.timeout = timeout
        self.window_seconds = 0.0
        self.thawed_early: list[str] = []
        self.thaw_errors: list[tuple[str, str]] = []
        self._frozen: list[tuple[str, int]] = []   # (mount point, fd) in freeze order
        self._fds: list[tuple[str, int]] = []
        self._watchdog: subprocess.Popen | None = None
        self._t0 = 0.0

    # -- entry -----------------------------------------------------------------------------------

    def _open_targets(self) -> None:
        table = _mount_table()
        seen: set[str] = set()
        for path in self.mountpoints:
            real = os.path.realpath(path)
            number = table.get(real)
            if number is None:
                # FIFREEZE on any directory freezes the filesystem that holds it: refuse a path that
                # is not a mount point, or we could freeze / (and the whole machine) by mistake.
                raise FreezeError(f"{path} is not a mount point; nothing was frozen")
            if number in seen:
                continue
            seen.add(number)
            try:
                fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise FreezeError(f"cannot open mount point {path}: {exc.strerror}; nothing was frozen") from None
            self._fds.append((real, fd))

    def _start_watchdog(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_AGENT_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "lifeboat.mobility.thaw_watchdog", "--deadline", f"{self.timeout:g}",
                "--", *(path for path, _fd in self._fds)]
        try:
            # Own session: a signal to our process group (Ctrl-C, killpg) must not take the
            # watchdog with us. cwd "/" so that it pins no mount point.
            self._watchdog = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              start_new_session=True, close_fds=True, cwd="/", env=env)
        except OSError as exc:
            raise FreezeError(f"cannot start the thaw watchdog: {exc.strerror}; nothing was frozen") from None
        out = self._watchdog.stdout
        ready, _, _ = select.select([out], [], [], WATCHDOG_START_TIMEOUT)
        line = out.readline() if ready else b""
        if line.strip() != b"armed":
            self._stop_watchdog(done=True)
            raise FreezeError(f"the thaw watchdog did not arm within {WATCHDOG_START_TIMEOUT:g} s "
                              f"(said {line!r}); nothing was frozen")
        out.close()

    def __enter__(self) -> "Frozen":
        self.thawed_early, self.thaw_errors, self.window_seconds = [], [], 0.0
        try:
            self._open_targets()
            if not self._fds:
                return self
            logger.debug("freezing", mountpoints=[p for p, _ in self._fds], deadline=self.timeout)
            self._start_watchdog()
            # Write dirty data back before freezing: FIFREEZE must flush whatever is still dirty,
            # and the writers are blocked for as long as that takes.
            for _path, fd in self._fds:
                _syncfs(fd)
        except BaseException:
            self._close_fds()
            raise
        # From here until the last thaw: no logging, no imports, no file writes.
        self._t0 = time.monotonic()
        self.frozen_at = time.time()   # wall clock of the first FIFREEZE (group rounds compare members)
        failure: tuple[str, OSError] | None = None
        try:
            for path, fd in self._fds:
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                except OSError as exc:
                    failure = (path, exc)
                    break
                self._frozen.append((path, fd))
        except BaseException:   # Ctrl-C mid-way
            self._undo_freeze()
            raise
        if failure is None:
            return self
        self._undo_freeze()
        path, exc = failure
        reason = {errno.EBUSY: "it is already frozen (fsfreeze or another agent?)",
                  errno.EOPNOTSUPP: "the filesystem does not support freezing",
                  errno.EPERM: "freezing needs CAP_SYS_ADMIN"}.get(exc.errno, exc.strerror)
        logger.error("freeze failed", mountpoint=path, reason=reason)
        raise FreezeError(f"cannot freeze {path}: {reason}; the filesystems frozen before it were thawed")

    def _undo_freeze(self) -> None:
        # Thaws what we froze, never what someone else had frozen (that freeze failed with EBUSY).
        self.thaw_errors = self._thaw_all()
        self._stop_watchdog(done=not self.thaw_errors)
        self._close_fds()

    # -- exit ------------------------------------------------------------------------------------

    def _thaw_all(self) -> list[tuple[str, str]]:
        """Thaw in reverse order; returns (mount point, error) for thaws that failed for real."""
        failed = []
        for path, fd in reversed(self._frozen):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    # Not frozen any more: someone (the watchdog) thawed it before we were done.
                    self.thawed_early.append(path)
                else:
                    failed.append((path, exc.strerror))
        self._frozen.clear()
        return failed

    def _stop_watchdog(self, done: bool) -> int | None:
        """Tell the watchdog we thawed (done) or just close its stdin (EOF: it thaws), then reap it."""
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return None
        try:
            if done:
                proc.stdin.write(b"thawed\n")
                proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass   # it already exited (deadline passed): nothing to tell
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            return proc.wait(WATCHDOG_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _close_fds(self) -> None:
        for _path, fd in self._fds:
            os.close(fd)
        self._fds.clear()

    @property
    def intact(self) -> bool:
        """True if every filesystem stayed frozen from the freeze until our own thaw."""
        return not self.thawed_early and not self.thaw_errors

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._fds:
            return
        self.thaw_errors = self._thaw_all()
        self.window_seconds = time.monotonic() - self._t0
        self.thawed_at = self.frozen_at + self.window_seconds
        # Only claim "thawed" if every thaw worked; otherwise EOF makes the watchdog try again.
        code = self._stop_watchdog(done=not self.thaw_errors)
        self._close_fds()
        # Logging is safe again from here on.
        logger.info("filesystems thawed", window_seconds=round(self.window_seconds, 4),
                    mountpoints=self.mountpoints, watchdog_exit=code)
        if self.thaw_errors:
            logger.error("cannot thaw; the thaw watchdog retries, run 'fsfreeze -u' if writes stay blocked; "
                         "this cycle's point is not consistent", failed=self.thaw_errors)
        if self.thawed_early:
            logger.warning("filesystems thawed before the snapshot was finished (the watchdog's deadline "
                           "passed?); this cycle's point is not consistent", thawed_early=self.thawed_early,
                           deadline_seconds=self.timeout, window_seconds=round(self.window_seconds, 4))
