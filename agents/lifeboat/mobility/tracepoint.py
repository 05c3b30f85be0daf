"""Tracepoint change tracker: blocks written or discarded, from block/block_bio_queue in a private tracefs instance."""

from __future__ import annotations

import contextlib
import hashlib
import ctypes
import os
import re
import stat
import threading
from dataclasses import dataclass, field

from ..core import logging as log
from ..core.errors import ConfigError, LifeboatError

logger = log.get("lifeboat.mobility.tracepoint")

DEFAULT_TRACEFS = "/sys/kernel/tracing"
EVENT = "events/block/block_bio_queue"
SECTOR = 512
MAX_TRACE_LINE_BYTES = 4096  # a trace_pipe line is ~100 bytes; a longer "line" is damage, not buffered

# "<task>-<pid> [cpu] flags ts: block_bio_queue: 7,0 WS 2128 + 8 [dd]"; the task name may hold
# spaces, so anchor on the event name rather than on column positions.
_EVENT_RE = re.compile(r"block_bio_queue: (\d+),(\d+) (\S+) (\d+) \+ (\d+) \[")
# What trace_pipe prints in place of the events the ring overwrote before we read them.
_LOST_RE = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]")
# Runs of full bytes in one match, other non-zero bytes one at a time: ranges() stays linear in
# the bitmap size whatever the write pattern.
_NONZERO_RE = re.compile(rb"\xff+|[^\x00\xff]")


class TracefsUnavailable(LifeboatError):
    """Tracepoint change tracking is unavailable: {}; the agent falls back to the digest tracker."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass
class Epoch:
    ranges: list[tuple[int, int]]  # sorted, merged (first_block, block_count) in whole-disk blocks
    lost: str | None  # None, or why this epoch's tracking cannot be trusted
    events: int  # trace events counted into this epoch for this disk


@dataclass(frozen=True)
class BioEvent:
    major: int
    minor: int
    rwbs: str
    sector: int
    nr_sectors: int

    @property
    def dirties(self) -> bool:
        # Everything but reads changes data: W (write), D (discard), DE (secure erase) and N, which
        # is how this kernel prints write-zeroes (verified with blkdiscard -z) and zone ops; an
        # unknown op counts too, since over-reporting is safe. Flushes carry no sectors.
        return self.nr_sectors > 0 and "R" not in self.rwbs


@dataclass(frozen=True)
class RingLost:
    cpu: int
    count: int


def parse_line(line: str) -> BioEvent | RingLost:
    """Parse one trace_pipe line; ValueError if it is neither a block_bio_queue event nor a LOST marker."""
    if m := _EVENT_RE.search(line):
        major, minor, rwbs, sector, nr = m.groups()
        return BioEvent(int(major), int(minor), rwbs, int(sector), int(nr))
    if m := _LOST_RE.search(line):
        return RingLost(int(m[1]), int(m[2]))
    raise ValueError(line)


def instance_name(machine: str, state_dir: str) -> str:
    """The agent's tracefs instance: stable across restarts of one agent (same state directory),
    distinct for two agents on one host (tests, or an agent per container)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]
    return f"lifeboat-{machine}-{digest}"


def remove_instance(name: str) -> bool:
    """Remove an instance a stopped agent left recording (uninstall, tests); False if there was none."""
    try:
        path = os.path.join(find_tracefs(), "instances", name)
    except TracefsUnavailable:
        return False
    if not os.path.isdir(path):
        return False
    with contextlib.suppress(OSError):
        _write(os.path.join(path, EVENT, "enable"), "0")
    os.rmdir(path)
    return True


def find_tracefs() -> str:
    """The tracefs mount point, mounting it at /sys/kernel/tracing if none is mounted."""
    lockdown = _read("/sys/kernel/security/lockdown", "")
    if "[confidentiality]" in lockdown:
        raise TracefsUnavailable("kernel lockdown is in confidentiality mode, which forbids tracefs")
    path = _mounted_tracefs()
    if path is None:
        path = DEFAULT_TRACEFS
        try:
            _mount_tracefs(path)
        except OSError as exc:
            raise TracefsUnavailable(f"tracefs is not mounted and mounting it at {path} failed: {exc}") from exc
    if not os.path.isdir(os.path.join(path, EVENT)):
        raise TracefsUnavailable(f"{path}/{EVENT} is missing (kernel without block trace events)")
    if not os.path.isdir(os.path.join(path, "instances")):
        raise TracefsUnavailable(f"{path}/instances is missing (kernel without tracefs instances)")
    return path


def _mounted_tracefs() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "tracefs":
                return fields[1].replace("\\040", " ")
    return None


def _mount_tracefs(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", path.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _read(path: str, default: str | None = None) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        if default is None:
            raise
        return default


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _same_ring_size(read_back: str, requested_kb: int) -> bool:
    """buffer_size_kb reads back a little more than was asked (8192 gives 8195, 4 gives 7: the kernel
    rounds up to whole pages plus its own header), so compare with that slack."""
    first = read_back.split()[0] if read_back.split() else ""
    return first.isdigit() and abs(int(first) - requested_kb) <= max(8, requested_kb // 50)


def dev_t(major: int, minor: int) -> int:
    """The kernel-internal dev_t encoding the event filter compares against (not the userspace one)."""
    return major << 20 | minor


def _device_bytes(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def disk_devices(path: str) -> dict[tuple[int, int], int]:
    """(major, minor) -> start sector, for the whole disk at path (start 0) and each of its partitions."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise ConfigError(path, "not a block device")
    sysdir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if os.path.exists(os.path.join(sysdir, "partition")):
        raise ConfigError(path, "is a partition; the tracepoint tracker tracks whole disks")
    out = {(os.major(st.st_rdev), os.minor(st.st_rdev)): 0}
    for entry in sorted(os.listdir(sysdir)):
        part = os.path.join(sysdir, entry)
        if os.path.isfile(os.path.join(part, "partition")):
            major, minor = _read(os.path.join(part, "dev")).strip().split(":")
            out[(int(major), int(minor))] = int(_read(os.path.join(part, "start")))
    return out


class DirtyBlocks:
    """Dirty blocks of one disk as a bitmap: memory is bounded by the disk size, not by the number of writes."""

    def __init__(self) -> None:
        self.bits = bytearray()

    def add(self, first: int, count: int) -> None:
        end = first + count
        if (need := (end + 7) // 8) > len(self.bits):
            self.bits.extend(bytes(need - len(self.bits)))
        b = first
        while b < end and b % 8:
            self.bits[b >> 3] |= 1 << (b & 7)
            b += 1
        whole_end = end - end % 8
        if b < whole_end:  # a whole-disk discard must not loop per block
            self.bits[b >> 3 : whole_end >> 3] = b"\xff" * ((whole_end - b) >> 3)
            b = whole_end
        while b < end:
            self.bits[b >> 3] |= 1 << (b & 7)
            b += 1

    def ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for m in _NONZERO_RE.finditer(self.bits):
            base = m.start() * 8
            if m[0][0] == 0xFF:
                runs = [(base, len(m[0]) * 8)]
            else:
                runs = [(base + i, 1) for i in range(8) if m[0][0] >> i & 1]
            for first, count in runs:
                if out and out[-1][0] + out[-1][1] == first:
                    out[-1] = (out[-1][0], out[-1][1] + count)
                else:
                    out.append((first, count))
        return out


@dataclass
class _EpochState:
    disks: list[str]
    baseline: dict[str, int]  # per-cpu lost-event counters this epoch is judged against
    lost: str | None = None
    disk_lost: dict[str, str] = field(default_factory=dict)
    dirty: dict[str, DirtyBlocks] = field(init=False)
    events: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.dirty = {d: DirtyBlocks() for d in self.disks}
        self.events = {d: 0 for d in self.disks}

    def mark_lost(self, reason: str) -> None:
        self.lost = self.lost or reason  # the first reason is the one that explains the rest

    def result(self) -> dict[str, Epoch]:
        return {d: Epoch(self.dirty[d].ranges(), self.lost or self.disk_lost.get(d), self.events[d]) for d in self.disks}


def _increased(now: dict[str, int], baseline: dict[str, int]) -> bool:
    return any(v > baseline.get(cpu, 0) for cpu, v in now.items())


class TracepointTracker:
    """Dirty blocks of whole disks from block_bio_queue, in epochs the cycle engine rotates.

    One private tracefs instance (never the global buffer) holds one ring for all the disks,
    filtered in the kernel on their dev_t values and on non-reads. On this kernel (6.18) a bio
    to a partition is reported with the whole disk's dev and absolute sector; a partition dev is
    still mapped through its sysfs start, in case a kernel reports it before remapping.

    Agent restarts: if the instance already exists, start() re-uses it without clearing it, so
    the writes the kernel recorded while no agent ran are drained into the first epoch;
    close(remove=False) leaves the instance recording for that. A ring that overran meanwhile
    (its counters are judged against 0), a disk the old filter did not cover, or an instance
    that was not recording make the first epoch lost. A re-used ring keeps its size.
    """

    def __init__(self, disks: dict[str, str], block_size: int, instance_name: str,
                 buffer_kb: int = 8192, drain_interval: float = 0.1) -> None:
        self.disks = dict(disks)
        self.block_size = block_size
        self.instance_name = instance_name
        self.buffer_kb = buffer_kb
        self.drain_interval = drain_interval
        self.stats = {"events": 0, "overruns": 0, "unparseable_lines": 0}
        self.reused = False   # start() found the instance a previous agent left recording
        self.instance: str | None = None
        self._devices: dict[tuple[int, int], tuple[str, int]] = {}
        self._blocks: dict[str, int] = {}  # blocks per disk: an event past the end must not grow the bitmap
        for disk_id, path in self.disks.items():
            for dev, start in disk_devices(path).items():
                self._devices[dev] = (disk_id, start)
            self._blocks[disk_id] = -(-_device_bytes(path) // block_size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._tail = b""
        self._cur = _EpochState(list(self.disks), {})
        # What was drained since the last explicit drain() (or the epoch start): the writes that
        # may have raced the snapshot, which rotate(overlap=True) also puts in the new epoch.
        self._window = _EpochState(list(self.disks), {})

    # -- set-up and tear-down ------------------------------------------------------------------

    def start(self, handover: dict[str, int] | None = None) -> None:
        """handover: the previous agent's handover() for a re-used instance; without it the lost-event
        counters of a re-used ring are compared with 0 (any overrun in its history loses the first epoch)."""
        tracefs = find_tracefs()
        self.instance = os.path.join(tracefs, "instances", self.instance_name)
        reused = self.reused = os.path.isdir(self.instance)
        try:
            if not reused:
                os.mkdir(self.instance)
            # Opened before any reconfiguration, so that a re-used ring is drained first.
            self._fd = os.open(os.path.join(self.instance, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            with self._lock:
                # A fresh ring starts from its current counters; a re-used one from where the
                # previous agent left it (or 0), so an overrun while no agent ran loses the first epoch.
                baseline = dict(handover or {}) if reused else self._counters()
                self._cur.baseline = self._window.baseline = baseline
                if reused:
                    self._check_reused()
                    self._drain_locked()
                self._configure(reused)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the set-up error is the one worth reporting
                self.close(remove=not reused)
            raise TracefsUnavailable(f"cannot set up tracefs instance {self.instance}: {exc}") from exc
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"tracepoint-{self.instance_name}", daemon=True)
        self._thread.start()
        logger.info("tracepoint_started", instance=self.instance, reused=reused, disks=sorted(self.disks))

    def _check_reused(self) -> None:
        ev = os.path.join(self.instance, EVENT)
        if _read(os.path.join(ev, "enable")).strip() != "1" or _read(os.path.join(self.instance, "tracing_on")).strip() != "1":
            self._cur.mark_lost("instance_was_not_recording")
        old = _read(os.path.join(ev, "filter")).strip()
        if old != "none":
            covered = {int(n) for n in re.findall(r"dev == (\d+)", old)}
            for (major, minor), (disk_id, start) in self._devices.items():
                if start == 0 and dev_t(major, minor) not in covered:
                    self._cur.disk_lost[disk_id] = "not_tracked_before_start"

    def _configure(self, reused: bool) -> None:
        size_file = os.path.join(self.instance, "buffer_size_kb")
        if not reused:
            _write(size_file, str(self.buffer_kb))
        elif not _same_ring_size(_read(size_file), self.buffer_kb):
            # The configured size changed since the instance was made. Resizing a ring that holds
            # unread events can drop some, so this epoch is not trusted (one digest resync).
            self._drain_locked()
            _write(size_file, str(self.buffer_kb))
            self._cur.mark_lost("ring_resized")
        ev = os.path.join(self.instance, EVENT)
        devs = " || ".join(f"dev == {dev_t(*d)}" for d in sorted(self._devices))
        try:
            # Reads filtered in the kernel too, so a busy reader cannot overrun the ring.
            _write(os.path.join(ev, "filter"), f'({devs}) && nr_sector > 0 && !(rwbs ~ "*R*")')
        except OSError:
            _write(os.path.join(ev, "filter"), devs)  # older filter syntax; reads dropped on parse
        _write(os.path.join(ev, "enable"), "1")
        _write(os.path.join(self.instance, "tracing_on"), "1")

    def handover(self) -> dict[str, int]:
        """The lost-event counters the current epoch is measured from: pass them to the next
        agent's start() after close(remove=False), so only overruns after this point count."""
        with self._lock:
            return dict(self._cur.baseline)

    def close(self, remove: bool = True) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if remove and self.instance and os.path.isdir(self.instance):
            _write(os.path.join(self.instance, EVENT, "enable"), "0")
            os.rmdir(self.instance)
            logger.info("tracepoint_removed", instance=self.instance)

    # -- epochs --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Read everything now in the ring into the current epoch; call it right before a snapshot."""
        with self._lock:
            before = self._drain_locked()
            self._window = _EpochState(list(self.disks), before)

    def rotate(self, overlap: bool = True) -> dict[str, Epoch]:
        """End the current epoch after a final drain and return it, per disk.

        With overlap, what was drained since the last drain() (the snapshot's race window, whether
        this final drain or the background thread read it) is in both the returned epoch and the
        new one: over-reporting is safe, under-reporting is not. Without a drain() since the epoch
        began, that is the whole epoch.
        """
        with self._lock:
            before = self._drain_locked()
            if self._tail:  # the rest of that line will only be read into the new epoch
                self._cur.mark_lost("partial_trace_line_at_rotate")
            old = self._cur
            self._cur = self._window if overlap else _EpochState(list(self.disks), before)
            self._window = _EpochState(list(self.disks), before)
            return old.result()

    def lost(self) -> str | None:
        with self._lock:
            if self._cur.lost:
                return self._cur.lost
            return next((f"{d}: {r}" for d, r in sorted(self._cur.disk_lost.items())), None)

    def ingest(self, data: bytes) -> None:
        """Parse trace_pipe output into the current epoch: what drain() does with what it reads."""
        with self._lock:
            self._ingest_locked(data)

    # -- internals -----------------------------------------------------------------------------

    def _run(self) -> None:
        last_error = None
        while not self._stop.wait(self.drain_interval):
            try:
                with self._lock:
                    self._drain_locked(limit=4 * 1024 * self.buffer_kb)
                last_error = None
            except Exception as exc:  # the drainer must never die: a gap in it is a gap in tracking
                reason = f"drain_error: {exc}"
                with self._lock:
                    self._cur.mark_lost(reason)
                    self._window.mark_lost(reason)
                if reason != last_error:  # log each new failure once, not every interval
                    logger.exception("tracepoint_drain_failed", instance=self.instance)
                last_error = reason

    def _drain_locked(self, limit: int | None = None) -> dict[str, int]:
        """Read the ring until it is empty (or limit bytes); returns the counters read before."""
        if self._fd is None:
            raise LifeboatError(f"tracepoint tracker {self.instance_name} is not started")
        before = self._counters()
        done = 0
        while limit is None or done < limit:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            done += len(data)
            self._ingest_locked(data)
        # Counters read after the pipe: an overrun up to the end of this read is seen now.
        after = self._counters()
        self.stats["overruns"] = sum(after.values())
        for state in (self._cur, self._window):
            if _increased(after, state.baseline):
                state.mark_lost("ring_overrun")
        return before

    def _counters(self) -> dict[str, int]:
        """Per-cpu count of events the ring lost (overwritten, dropped, or lost in nested commits)."""
        out = {}
        per_cpu = os.path.join(self.instance, "per_cpu")
        for cpu in os.listdir(per_cpu):
            total = 0
            for line in _read(os.path.join(per_cpu, cpu, "stats")).splitlines():
                key, _, value = line.partition(":")
                if key in ("overrun", "commit overrun", "dropped events"):
                    total += int(value)
            out[cpu] = total
        return out

    def _ingest_locked(self, data: bytes) -> None:
        *lines, self._tail = (self._tail + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.strip():
                self._ingest_line(line)
        if len(self._tail) > MAX_TRACE_LINE_BYTES:  # no newline in sight: not trace_pipe output, and unbounded
            self._tail = b""
            self.stats["unparseable_lines"] += 1
            reason = f"unparseable_trace_line: no newline in {MAX_TRACE_LINE_BYTES} bytes"
            self._cur.mark_lost(reason)
            self._window.mark_lost(reason)

    def _ingest_line(self, line: str) -> None:
        try:
            ev = parse_line(line)
        except ValueError:
            self.stats["unparseable_lines"] += 1
            reason = f"unparseable_trace_line: {line[:200]}"
            self._cur.mark_lost(reason)
            self._window.mark_lost(reason)
            return
        if isinstance(ev, RingLost):
            self._cur.mark_lost("ring_overrun")
            self._window.mark_lost("ring_overrun")
            return
        target = self._devices.get((ev.major, ev.minor))
        if target is None or not ev.dirties:
            return
        disk_id, start = target
        first = (start + ev.sector) * SECTOR // self.block_size
        last = ((start + ev.sector + ev.nr_sectors) * SECTOR - 1) // self.block_size
        if last >= self._blocks[disk_id]:
            # Impossible for a disk of this size (it grew, or the line is damaged): the bitmap would grow
            # to the event's end (a sector near 2^64 is exabytes), so distrust the epoch instead.
            reason = f"event_past_disk_end: {disk_id} block {last} of {self._blocks[disk_id]}"
            self._cur.mark_lost(reason)
            self._window.mark_lost(reason)
            return
        self.stats["events"] += 1
        for state in (self._cur, self._window):
            state.dirty[disk_id].add(first, last - first + 1)
            state.events[disk_id] += 1
