"""Snapshot providers: the point-in-time image a cycle reads its dirty extents from."""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import re
import stat
import subprocess
import time
from pathlib import Path

from ..core import logging as log
from ..core.errors import LifeboatError

logger = log.get("lifeboat.mobility.snapshot")

FICLONE = 0x40049409
_TAG_RE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*")   # safe in a file name and an LV name


class SnapshotError(LifeboatError):
    """Snapshot failed: {}."""


class SnapshotTooLarge(SnapshotError):
    """Snapshot too large: {}."""


def _check_tag(tag: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise SnapshotError(f"tag {tag!r} may only hold letters, digits and _.+- (not first); no snapshot was made")


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """preadv until `view` is full or EOF (a block device or file can return short reads)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _drop_cache(fd: int, offset: int, length: int) -> None:
    # A mounted filesystem writes file data around the block device's page cache, so a buffered
    # read of the device can return stale pages cached by an earlier read (measured here: it
    # does). Dropping the clean cached pages of the range makes the read go to the disk.
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


class Snapshot:
    """A cycle's image of one disk: read it with readinto(), release it with drop()."""

    provider = "base"
    consistent = True

    def __init__(self, disk_id: str, tag: str) -> None:
        self.disk_id = disk_id
        self.tag = tag
        self.dropped = False

    def readinto(self, view: memoryview, offset: int) -> int:
        raise NotImplementedError

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self._release()

    def _release(self) -> None:
        pass

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.drop()


class _FileSnapshot(Snapshot):
    """Reads a file or device path, opened lazily (after the thaw) and closed by drop()."""

    def __init__(self, provider: str, disk_id: str, tag: str, path: str, consistent: bool = True,
                 fd: int = -1, fresh_cache: bool = True) -> None:
        super().__init__(disk_id, tag)
        self.provider = provider
        self.consistent = consistent
        self.path = path
        self._fd = fd
        self._fresh_cache = fresh_cache   # False: the page cache may be stale (a mounted device)

    def readinto(self, view: memoryview, offset: int) -> int:
        if self.dropped:
            raise SnapshotError(f"read from the dropped snapshot {self.path}; this is a bug in the caller")
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SnapshotError(f"cannot open snapshot {self.path}: {exc.strerror}; the cycle fails "
                                    f"and is retried") from None
            if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
                # A regular file's page cache is the file: only a block device's can be stale.
                self._fresh_cache = True
        if not self._fresh_cache:
            _drop_cache(self._fd, offset, len(view))
        return _pread_full(self._fd, view, offset)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _release(self) -> None:
        self._close()


class SnapshotProvider:
    """Makes a Snapshot of one disk; create() runs while the disk's filesystems are frozen: be fast."""

    name = "base"

    def create(self, disk_id: str, device_path: str, tag: str, dirty_ranges: list[tuple[int, int]],
               block_size: int) -> Snapshot:
        raise NotImplementedError


# -- none ---------------------------------------------------------------------------------------


class NoneProvider(SnapshotProvider):
    """No snapshot: reads the live device, so the point is not called consistent."""

    name = "none"

    def create(self, disk_id, device_path, tag, dirty_ranges, block_size) -> Snapshot:
        return _FileSnapshot(self.name, disk_id, tag, device_path, consistent=False, fresh_cache=False)


# -- reflink ------------------------------------------------------------------------------------


def backing_file(device_path: str) -> str | None:
    """The image file behind a disk: the path itself if a regular file, a loop device's backing file, else None."""
    real = os.path.realpath(device_path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return real
    if not stat.S_ISBLK(st.st_mode):
        return None
    # /sys/block/<name> exists for whole disks only, so a loop partition (loop0p1) gets None:
    # cloning the whole image would not be that partition's bytes.
    try:
        return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
                    ).read_text().rstrip("\n") or None
    except OSError:
        return None


def _filesystem_of(path: str) -> str:
    """"<mount point> (<type>)" of the filesystem holding path, for error messages."""
    best, best_type = "/", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split()[4])
                inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
                if inside and len(mountpoint) >= len(best):
                    best, best_type = mountpoint, right.split()[0]
    except OSError:
        pass
    return f"{best} ({best_type})"


class _CloneSnapshot(_FileSnapshot):
    def __init__(self, owner: "ReflinkProvider", disk_id: str, tag: str, path: str, fd: int) -> None:
        super().__init__("reflink", disk_id, tag, path, fd=fd)
        self._owner = owner

    def _release(self) -> None:
        self._close()
        self._owner._retire(self.disk_id, os.path.dirname(self.path), self.path)


class ReflinkProvider(SnapshotProvider):
    """FICLONE of the disk's image file (XFS with reflink=1, btrfs): instant and copy-on-write.

    Clones are "<disk_id>.<tag>.snap" in `dir` (default: ".lifeboat-snapshots" next to the image,
    which must be on the same reflink-capable filesystem). keep=N leaves the N most recent clones
    of a disk on disk after drop() (for quick local restores) and deletes older ones.
    """

    name = "reflink"

    def __init__(self, dir: str | None = None, keep: int = 0) -> None:
        self.dir = dir
        self.keep = keep

    def create(self, disk_id, device_path, tag, dirty_ranges, block_size) -> Snapshot:
        _check_tag(tag)
        source = backing_file(device_path)
        if source is None:
            raise SnapshotError(f"{device_path} has no backing image file (neither a regular file nor a loop "
                                f"device), so it cannot be reflinked; use the lvm, freeze-copy or none provider")
        folder = self.dir or os.path.join(os.path.dirname(source), ".lifeboat-snapshots")
        path = os.path.join(folder, f"{disk_id}.{tag}.snap")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"cannot prepare a reflink of {source} into {folder}: {exc.strerror}; "
                                f"no snapshot was made") from None
        try:
            if os.path.exists(path):
                os.unlink(path)   # a leftover of an interrupted cycle with the same tag
            # 0600: the clone holds the whole disk's data.
            dst = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            os.close(src)
            raise SnapshotError(f"cannot create {path}: {exc.strerror}; no snapshot was made") from None
        try:
            fcntl.ioctl(dst, FICLONE, src)
            # Order clones by creation even within one timestamp tick of the filesystem.
            os.utime(dst, ns=(time.time_ns(), time.time_ns()))
        except OSError as exc:
            os.close(dst)
            os.unlink(path)
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise SnapshotError(f"the filesystem at {_filesystem_of(folder)} cannot reflink {source} into "
                                    f"{folder} ({exc.strerror}); the image and the snapshot folder must be on one "
                                    f"XFS (reflink=1) or btrfs filesystem; no snapshot was made") from None
            raise SnapshotError(f"FICLONE of {source} to {path} failed: {exc.strerror}; no snapshot was made") from None
        finally:
            os.close(src)
        return _CloneSnapshot(self, disk_id, tag, path, dst)

    def _retire(self, disk_id: str, folder: str, path: str) -> None:
        """After drop(): delete this clone, or keep the `keep` most recent of the disk and delete the rest."""
        victims = [path]
        if self.keep > 0:
            clones = []
            for entry in os.scandir(folder):
                if entry.name.startswith(f"{disk_id}.") and entry.name.endswith(".snap"):
                    clones.append((entry.stat().st_mtime_ns, entry.name, entry.path))
            clones.sort()
            victims = [p for _m, _n, p in clones[:-self.keep]]
        for victim in victims:
            try:
                os.unlink(victim)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot delete snapshot clone; it uses space until removed", path=victim,
                               reason=exc.strerror)


# -- lvm ----------------------------------------------------------------------------------------


def subprocess_runner(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a command, capturing text output (LvmProvider's default runner; tests inject fakes)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found (is lvm2 installed?)")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} timed out after {timeout:g} s")


class _LvmSnapshot(_FileSnapshot):
    def __init__(self, owner: "LvmProvider", disk_id: str, tag: str, vg: str, lv: str) -> None:
        super().__init__("lvm", disk_id, tag, os.path.join(owner.dev_dir, vg, lv))
        self._owner = owner
        self.lv = f"{vg}/{lv}"

    def _release(self) -> None:
        self._close()   # an open snapshot device makes lvremove fail with "in use"
        self._owner._remove(self.lv)


class LvmProvider(SnapshotProvider):
    """LVM snapshot of /dev/<vg>/<lv> or /dev/mapper/<vg>-<lv>: classic (COW extents) or thin.

    The live path needs a real LVM host: device-mapper does not work on the development and CI
    machines, so the tests check the command lines through an injected runner. On a real host
    mind that lvcreate writes /etc/lvm/{backup,archive}: if the filesystem holding /etc is among
    the frozen ones, lvcreate blocks until the thaw watchdog fires (and the cycle then fails).
    """

    name = "lvm"

    def __init__(self, size: str = "10%ORIGIN", run=subprocess_runner, dev_dir: str = "/dev") -> None:
        self.size = size
        self.run = run
        self.dev_dir = dev_dir

    def _check(self, argv: list[str], what: str) -> str:
        result = self.run(argv)
        if result.returncode != 0:
            raise SnapshotError(f"{what}: '{' '.join(argv)}' exited with {result.returncode}: "
                                f"{(result.stderr or '').strip()}")
        return result.stdout or ""

    def create(self, disk_id, device_path, tag, dirty_ranges, block_size) -> Snapshot:
        _check_tag(tag)
        out = self._check(["lvs", "--noheadings", "-o", "vg_name,lv_name,segtype", device_path],
                          f"cannot resolve {device_path} to an LVM volume; no snapshot was made")
        fields = out.split()
        if len(fields) != 3:
            raise SnapshotError(f"lvs printed {out.strip()!r} for {device_path}, not 'vg lv segtype'; "
                                f"no snapshot was made")
        vg, lv, segtype = fields
        snap = f"{lv}-lifeboat-{tag}"
        if segtype == "thin":
            self._check(["lvcreate", "--snapshot", "--name", snap, "--setactivationskip", "n", f"{vg}/{lv}"],
                        f"cannot create the thin snapshot {vg}/{snap}; no snapshot was made")
            try:
                self._check(["lvchange", "-ay", "-K", f"{vg}/{snap}"],
                            f"cannot activate the thin snapshot {vg}/{snap}; it was removed again")
            except SnapshotError:
                self._remove(f"{vg}/{snap}", quiet=True)
                raise
        else:
            self._check(["lvcreate", "--snapshot", "--name", snap, "--extents", self.size, f"{vg}/{lv}"],
                        f"cannot create the snapshot {vg}/{snap}; no snapshot was made")
        return _LvmSnapshot(self, disk_id, tag, vg, snap)

    def _remove(self, lv: str, quiet: bool = False) -> None:
        result = self.run(["lvremove", "-f", lv])
        if result.returncode != 0 and not quiet:
            raise SnapshotError(f"cannot remove the snapshot volume {lv}: {(result.stderr or '').strip()}; "
                                f"it keeps using space in the volume group (and a classic snapshot slows "
                                f"writes) until 'lvremove -f {lv}' succeeds")


# -- freeze-copy --------------------------------------------------------------------------------


class FreezeCopySnapshot(Snapshot):
    provider = "freeze-copy"

    def __init__(self, disk_id: str, tag: str, starts: list[int], ends: list[int], buffers: list[memoryview],
                 arena: mmap.mmap) -> None:
        super().__init__(disk_id, tag)
        self._starts, self._ends, self._buffers, self._arena = starts, ends, buffers, arena
        self.nbytes = sum(len(b) for b in buffers)

    def readinto(self, view: memoryview, offset: int) -> int:
        if self.dropped:
            raise SnapshotError("read from a dropped freeze-copy snapshot; this is a bug in the caller")
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + len(view)
        if i < 0 or end > self._ends[i]:
            # Serving anything else would silently read live data into a "consistent" point.
            raise SnapshotError(f"read of {len(view)} bytes at offset {offset} of disk {self.disk_id} is outside "
                                f"the extents copied while frozen; this is a bug in the caller, the cycle fails")
        start = offset - self._starts[i]
        view[:] = self._buffers[i][start:start + len(view)]
        return len(view)

    def extents(self):
        """(byte offset, bytes) of each copied extent, in disk order."""
        for start, buf in zip(self._starts, self._buffers):
            yield start, bytes(buf)

    def _release(self) -> None:
        _free(self._buffers, self._arena)
        self._buffers = []


def _free(views: list[memoryview], arena: mmap.mmap) -> None:
    # An mmap cannot close while memoryviews of it exist: release them first.
    for view in views:
        view.release()
    arena.close()


def _merge(ranges: list[tuple[int, int]], block_size: int, size: int) -> list[tuple[int, int]]:
    """Byte [start, end) extents of the (first block, count) ranges: sorted, clipped to size, merged."""
    out: list[list[int]] = []
    for first, count in sorted(ranges):
        start, end = first * block_size, min((first + count) * block_size, size)
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


class FreezeCopyProvider(SnapshotProvider):
    """No snapshot at all: copy the dirty extents into memory while frozen; only for small deltas.

    The freeze window grows with the bytes copied, so a total over max_bytes raises
    SnapshotTooLarge before anything is read. Reads outside the copied extents are errors.
    """

    name = "freeze-copy"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def create(self, disk_id, device_path, tag, dirty_ranges, block_size) -> Snapshot:
        try:
            fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"cannot open {device_path}: {exc.strerror}; nothing was copied") from None
        arena: mmap.mmap | None = None
        buffers: list[memoryview] = []
        try:
            extents = _merge(dirty_ranges, block_size, _device_size(fd))
            is_device = stat.S_ISBLK(os.fstat(fd).st_mode)   # a regular file's page cache is never stale
            total = sum(e - s for s, e in extents)
            if total > self.max_bytes:
                raise SnapshotTooLarge(f"disk {disk_id} has {total} dirty bytes, over the freeze-copy bound of "
                                       f"{self.max_bytes}; nothing was copied, so this cycle needs another "
                                       f"provider or a resync")
            # One anonymous mapping for all extents: page-aligned, and released at once by drop().
            arena = mmap.mmap(-1, max(total, 1))
            starts, ends, buffers, at = [], [], [], 0
            for start, end in extents:
                buf = memoryview(arena)[at:at + end - start]
                buffers.append(buf)
                if is_device:
                    _drop_cache(fd, start, end - start)
                got = _pread_full(fd, buf, start)
                if got != len(buf):
                    _free(buffers, arena)
                    raise SnapshotError(f"short read of {device_path} at {start}: {got} of {len(buf)} bytes; "
                                        f"nothing is kept")
                starts.append(start)
                ends.append(end)
                at += end - start
        except OSError as exc:
            if arena is not None:
                _free(buffers, arena)
            raise SnapshotError(f"cannot copy the dirty extents of {device_path}: {exc.strerror}; "
                                f"nothing is kept") from None
        finally:
            os.close(fd)
        return FreezeCopySnapshot(disk_id, tag, starts, ends, buffers, arena)


# -- factory ------------------------------------------------------------------------------------

_PROVIDERS = {"reflink": ReflinkProvider, "lvm": LvmProvider, "freeze-copy": FreezeCopyProvider,
              "none": NoneProvider}


def make_provider(name: str, **options) -> SnapshotProvider:
    """The provider called `name`, constructed with `options`."""
    try:
        cls = _PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown snapshot provider {name!r}; choose one of {', '.join(_PROVIDERS)}") from None
    return cls(**options)
