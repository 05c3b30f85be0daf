"""One cycle's point in time: freeze, tracker epoch switch and snapshots, with provider fallback."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import stat
import time
from dataclasses import dataclass

from ..core import logging as log
from ..core.config import MobilityConfig
from .change_log import merge_ranges
from .freeze import FreezeError, Frozen, mounted_filesystems
from .snapshot import Snapshot, SnapshotError, SnapshotProvider, SnapshotTooLarge, make_provider

logger = log.get("lifeboat.mobility.capture")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4   # WAIT_BEFORE | WRITE | WAIT_AFTER


def write_back(path: str) -> None:
    """Submit and wait for the block device's own dirty page cache (writes made to the raw device
    and filesystem metadata buffers). The tracker sees a write when its bio is queued, which for
    buffered writes happens at writeback: until then a dirty page is invisible to it, yet a read
    through the page cache would already return it. sync_file_range issues no device cache
    flush, so this stays cheap inside the freeze window."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_ALL) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sync_file_range on {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass
class DiskCapture:
    """What one disk's cycle reads: which blocks (None = all of them) from which snapshot."""
    disk_id: str
    ranges: list[tuple[int, int]] | None
    snapshot: Snapshot
    full_reason: str | None          # why every block is read (initial copy, resync, digest tracker)
    consistent: bool
    epoch_ranges: list[tuple[int, int]] | None = None   # what the tracker saw this epoch (None: no tracker)
    epoch_lost: str | None = None                       # why the tracker's epoch cannot be trusted


@dataclass
class Capture:
    disks: dict[str, DiskCapture]
    frozen: list[str]                # mount points that were frozen
    freeze_seconds: float | None     # first freeze to last thaw, None when nothing was frozen
    freeze_error: str | None = None
    seconds: float = 0.0             # drain + snapshots + rotate (inside the freeze window when frozen)
    phases: dict[str, float] | None = None   # seconds per step: freeze (incl. watchdog start), drain, snapshot, rotate
    frozen_at: float = 0.0           # wall clock: everything frozen (group rounds compare members' windows)
    thawed_at: float = 0.0

    @property
    def consistent(self) -> bool:
        return all(d.consistent for d in self.disks.values())

    def drop(self) -> None:
        for d in self.disks.values():
            try:
                d.snapshot.drop()
            except SnapshotError as exc:
                logger.error("snapshot not dropped", DISK=d.disk_id, error=str(exc))


class Capturer:
    """Takes each cycle's snapshots; remembers providers that cannot work for a disk (no reflink, not LVM)."""

    def __init__(self, config: MobilityConfig, devices: dict[str, str], tracker) -> None:
        self.config = config
        self.devices = devices              # disk_id -> path
        self.tracker = tracker              # TracepointTracker covering the block-device disks, or None
        snap = config.snapshot
        options = {"reflink": {"dir": snap.dir or None, "keep": snap.keep},
                   "lvm": {"size": snap.lvm_size},
                   "freeze-copy": {"max_bytes": snap.freeze_copy_max_bytes},
                   "none": {}}
        self.providers: list[SnapshotProvider] = [make_provider(n, **options[n]) for n in snap.providers]
        if not any(p.name == "none" for p in self.providers):
            # Without a last resort a disk with no usable provider could never replicate; its points
            # are then honestly "none" (not consistent), which the operator sees in `lifeboat points`.
            self.providers.append(make_provider("none"))
        self.unusable: dict[str, set[str]] = {d: set() for d in devices}

    def mountpoints(self) -> list[str]:
        if not self.config.consistency.freeze:
            return []
        found: list[str] = []
        for path in self.devices.values():
            if is_block_device(path):
                found += [m for m in mounted_filesystems(path) if m not in found]
        return found

    def capture(self, tag: str, wanted: dict[str, tuple[list[tuple[int, int]] | None, str | None]],
                hold=None) -> Capture:
        """wanted: disk_id -> (ranges still owed from failed cycles, reason to read everything or None).
        hold(), if given, is called once everything is frozen and returns when the snapshot may be
        taken (a consistency group's MARK); if it raises, everything thaws and nothing is captured."""
        mounts = self.mountpoints()
        freeze_error = None
        if mounts:
            try:
                return self._capture(tag, wanted, mounts, hold)
            except FreezeError as exc:
                # Frozen() thawed whatever it had frozen. A snapshot alone is still one instant of the
                # block device, only without the filesystem's cooperation.
                freeze_error = str(exc)
                logger.error("filesystem freeze failed: snapshot taken without it", error=freeze_error,
                             mountpoints=mounts)
        cap = self._capture(tag, wanted, [], hold)
        cap.freeze_error = freeze_error
        return cap

    def _capture(self, tag: str, wanted, mounts: list[str], hold=None) -> Capture:
        """Drain the tracker, snapshot, then rotate its epoch with overlap: a write racing the
        snapshot is reported in both epochs (over-reporting is safe, under-reporting loses data).
        Nothing is logged while frozen (the log could live on a frozen filesystem): messages wait."""
        block_size = self.config.replication.block_size
        done: dict[str, DiskCapture] = {}
        early: dict[str, Snapshot | None] = {}
        self._deferred: list[tuple[str, str, dict]] = []
        frozen = Frozen(mounts, self.config.consistency.freeze_timeout_seconds) if mounts else None
        tracked = [self.devices[d] for d in (self.tracker.disks if self.tracker else ())]
        t0 = time.monotonic()
        for path in tracked:
            write_back(path)  # the bulk, before the freeze window opens
        try:
            with frozen if frozen else contextlib.nullcontext():
                frozen_at = time.time()
                if hold:
                    hold()
                t1 = time.monotonic()
                if self.tracker:
                    for path in tracked:
                        write_back(path)
                    self.tracker.drain()
                t2 = time.monotonic()
                for d in self.devices:
                    early[d] = self._create(d, tag, None, block_size, ("reflink", "lvm"))
                t3 = time.monotonic()
                epochs = self.tracker.rotate(overlap=True) if self.tracker else {}
                t4 = time.monotonic()
                for disk_id in self.devices:
                    owed, full_reason = wanted[disk_id]
                    epoch = epochs.get(disk_id)
                    if epoch is None:
                        full_reason = full_reason or "digest_tracker"
                    elif epoch.lost:
                        full_reason = full_reason or epoch.lost
                    ranges = None if full_reason else merge_ranges((owed or []) + epoch.ranges)
                    snap = early[disk_id] or self._create(disk_id, tag, ranges, block_size, ("freeze-copy", "none"))
                    consistent = snap.consistent and (snap.provider != "freeze-copy" or bool(frozen))
                    done[disk_id] = DiskCapture(disk_id, ranges, snap, full_reason, consistent,
                                                epoch.ranges if epoch else None, epoch.lost if epoch else None)
            if frozen and not frozen.intact:
                # Someone thawed a filesystem before we did: the snapshot may hold a torn state.
                for d in done.values():
                    d.consistent = False
                self._deferred.append(("error", "a filesystem was thawed before the snapshot was complete: "
                                       "this point is not consistent", {"thawed_early": frozen.thawed_early,
                                                                        "thaw_errors": frozen.thaw_errors}))
        except BaseException:
            made = [d.snapshot for d in done.values()] + [e for e in early.values() if e]
            for snap in made:
                snap.drop()  # idempotent: one may be in both lists
            raise
        finally:
            for level, event, kw in self._deferred:
                getattr(logger, level)(event, **kw)
        phases = {"freeze": t1 - t0, "drain": t2 - t1, "snapshot": t3 - t2, "rotate": t4 - t3}
        if frozen and frozen.window_seconds:  # the freeze's own clock: not the watchdog's reaping after it
            frozen_at, thawed_at = frozen.frozen_at, frozen.thawed_at
        else:
            thawed_at = time.time()
        return Capture(done, mounts, frozen.window_seconds if frozen else None, None, time.monotonic() - t0, phases,
                       frozen_at, thawed_at)

    def _create(self, disk_id: str, tag: str, ranges, block_size: int, allowed: tuple[str, ...]) -> Snapshot | None:
        path = self.devices[disk_id]
        for provider in self.providers:
            if provider.name not in allowed or provider.name in self.unusable[disk_id]:
                continue
            if ranges is None and provider.name == "freeze-copy":
                continue  # it would copy the whole disk while frozen
            try:
                return provider.create(disk_id, path, tag, ranges or [], block_size)
            except SnapshotTooLarge as exc:
                self._deferred.append(("info", "snapshot provider skipped this cycle",
                                       {"DISK": disk_id, "provider": provider.name, "reason": str(exc)}))
            except SnapshotError as exc:
                # Structural (no reflink on this filesystem, not a logical volume): stop trying it.
                self.unusable[disk_id].add(provider.name)
                self._deferred.append(("warning", "snapshot provider unusable for this disk",
                                       {"DISK": disk_id, "provider": provider.name, "reason": str(exc)}))
        return None
