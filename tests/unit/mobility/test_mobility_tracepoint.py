"""Tracepoint tracker (mobility/tracepoint.py): parser, then real tracefs instances on real loop devices."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import time
import uuid

import pytest

from lifeboat.mobility.tracepoint import (
    BioEvent,
    DirtyBlocks,
    RingLost,
    TracefsUnavailable,
    TracepointTracker,
    dev_t,
    find_tracefs,
    parse_line,
)

BS = 65536
MIB = 1 << 20

# Captured from block_bio_queue on this kernel (6.18): O_DIRECT write, discard, write-zeroes
# (blkdiscard -z prints N), read, flush, a task name with a space, and a ring-overrun marker.
WRITE = "              dd-27653   [001] ..... 38292.654738: block_bio_queue: 7,0 WS 2128 + 8 [dd]"
DISCARD = "      blkdiscard-27747   [001] ..... 38317.867538: block_bio_queue: 7,0 DS 2048 + 128 [blkdiscard]"
ZEROES = "      blkdiscard-27748   [001] ..... 38317.871555: block_bio_queue: 7,0 NS 4096 + 128 [blkdiscard]"
READ = "              dd-27655   [000] ..... 38292.658557: block_bio_queue: 7,0 RS 2208 + 8 [dd]"
READAHEAD = "              dd-27653   [000] ..... 38292.653872: block_bio_queue: 254,0 RA 29947752 + 144 [dd]"
FLUSH = "       my writer-29398   [001] ..... 38543.619266: block_bio_queue: 7,0 FWS 0 + 0 [my writer]"
SPACED = "       my writer-29398   [001] ..... 38543.619114: block_bio_queue: 7,0 WS 2048 + 128 [my writer]"
KWORKER = "    kworker/u8:3-15208   [001] ..... 38292.660791: block_bio_queue: 254,0 WM 40 + 8 [kworker/u8:3]"
LOST = "CPU:0 [LOST 816 EVENTS]"


# -- parser and bitmap (no kernel needed) ------------------------------------------------------

def test_parse_real_lines():
    assert parse_line(WRITE) == BioEvent(7, 0, "WS", 2128, 8)
    assert parse_line(DISCARD) == BioEvent(7, 0, "DS", 2048, 128)
    assert parse_line(SPACED) == BioEvent(7, 0, "WS", 2048, 128)
    assert parse_line(KWORKER) == BioEvent(254, 0, "WM", 40, 8)
    assert parse_line(LOST) == RingLost(0, 816)


def test_what_dirties():
    assert parse_line(WRITE).dirties and parse_line(DISCARD).dirties and parse_line(ZEROES).dirties
    assert not parse_line(READ).dirties and not parse_line(READAHEAD).dirties
    assert not parse_line(FLUSH).dirties


@pytest.mark.parametrize("line", ["", "garbage", "block_bio_queue: 7,0 WS x + 8 [dd]", WRITE.replace(" + ", " ")])
def test_parse_rejects(line):
    with pytest.raises(ValueError):
        parse_line(line)


def test_dirty_blocks_ranges():
    d = DirtyBlocks()
    for first, count in [(3, 1), (4, 2), (9, 30), (100, 1), (0, 1)]:
        d.add(first, count)
    assert d.ranges() == [(0, 1), (3, 3), (9, 30), (100, 1)]
    d.add(1, 200)
    assert d.ranges() == [(0, 201)]
    assert DirtyBlocks().ranges() == []


def test_dev_t_is_kernel_encoding():
    assert dev_t(7, 0) == 7 << 20
    assert dev_t(259, 3) == 259 * 2**20 + 3


# -- real tracefs and loop devices -------------------------------------------------------------

def _skip(reason: str) -> None:
    if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":  # CI: never skip these
        pytest.fail(f"{reason} (LIFEBOAT_REQUIRE_ROOT_TESTS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def tracefs():
    if os.geteuid() != 0:
        _skip("needs root: tracefs instances and loop devices")
    try:
        return find_tracefs()
    except TracefsUnavailable as exc:
        _skip(str(exc))


@pytest.fixture
def loopdev(tmp_path, tracefs):
    """Factory: a loop device on a sparse file; every one is detached at teardown."""
    attached = []

    def make(size: int = 64 * MIB, partition_start: int | None = None) -> str:
        image = tmp_path / f"disk{len(attached)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
            if partition_start is not None:
                f.write(mbr(partition_start, size // 512 - partition_start))
        dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        if partition_start is not None:
            subprocess.run(["partx", "-a", dev], check=True)
        return dev

    try:
        yield make
    finally:
        for dev in attached:
            subprocess.run(["partx", "-d", dev], capture_output=True)
            subprocess.run(["losetup", "-d", dev], check=True)


@pytest.fixture
def trackers():
    """Factory: trackers on uniquely named instances, all closed and removed at teardown."""
    made = []

    def make(disks, **kw) -> TracepointTracker:
        kw.setdefault("drain_interval", 3600)  # drains only when the test says so
        kw.setdefault("instance_name", f"lifeboat-test-{uuid.uuid4().hex[:8]}")
        t = TracepointTracker(disks, BS, **kw)
        made.append(t)
        t.start()
        return t

    try:
        yield make
    finally:
        for t in reversed(made):  # the last one may hold a re-used instance open
            t.close()


def mbr(start: int, sectors: int) -> bytes:
    """A DOS partition table with one Linux partition (sfdisk lives in another package)."""
    table = bytearray(512)
    table[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, sectors)
    table[510:512] = b"\x55\xaa"
    return bytes(table)


def write_direct(dev: str, offset: int, length: int = 4096) -> None:
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(length))
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == length
    finally:
        os.close(fd)


def ranges_of(epochs, disk="a"):
    return epochs[disk].ranges


def test_writes_reported_at_right_blocks(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev})
    write_direct(dev, 0)
    write_direct(dev, 5 * BS + 4096)
    write_direct(dev, 10 * BS - 4096, 2 * BS)  # straddles blocks 9, 10 and 11
    fd = os.open(dev, os.O_WRONLY)  # the buffered path: write + fsync on the device
    os.pwrite(fd, b"x" * 4096, 20 * BS + 8192)
    os.fsync(fd)
    os.close(fd)
    t.drain()
    assert t.lost() is None
    epochs = t.rotate()
    assert epochs["a"].ranges == [(0, 1), (5, 1), (9, 3), (20, 1)]
    assert epochs["a"].lost is None and epochs["a"].events >= 4
    assert t.stats["events"] == epochs["a"].events and t.stats["overruns"] == 0


def test_untracked_device_is_filtered_in_the_kernel(loopdev, trackers):
    tracked, other = loopdev(), loopdev()
    t = trackers({"a": tracked})
    write_direct(other, 3 * BS)
    write_direct(tracked, 4 * BS)
    st = os.stat(tracked)
    lines = [ln for ln in open(os.path.join(t.instance, "trace")).read().splitlines() if not ln.startswith("#")]
    assert lines and all(f": {os.major(st.st_rdev)},{os.minor(st.st_rdev)} " in ln for ln in lines), lines
    assert ranges_of(t.rotate()) == [(4, 1)]


def test_two_disks_one_ring(loopdev, trackers):
    a, b = loopdev(), loopdev()
    t = trackers({"a": a, "b": b})
    write_direct(a, 1 * BS)
    write_direct(b, 2 * BS)
    epochs = t.rotate()
    assert epochs["a"].ranges == [(1, 1)] and epochs["b"].ranges == [(2, 1)]


def test_rotate_separates_epochs_and_overlap_covers_race_window(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev})
    write_direct(dev, 1 * BS)
    t.drain()  # the engine drains right before the snapshot...
    write_direct(dev, 2 * BS)  # ...so this write races the snapshot
    first = t.rotate()
    write_direct(dev, 3 * BS)
    t.drain()
    second = t.rotate()
    assert ranges_of(first) == [(1, 2)]
    assert ranges_of(second) == [(2, 2)]  # the race-window extent is in both epochs
    t.drain()
    assert ranges_of(t.rotate()) == []  # and in no later one

    t.drain()
    write_direct(dev, 4 * BS)
    assert ranges_of(t.rotate(overlap=False)) == [(4, 1)]
    t.drain()
    assert ranges_of(t.rotate()) == []


def test_rotate_without_drain_carries_the_whole_epoch_over(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev})
    t.rotate()
    write_direct(dev, 5 * BS)
    assert ranges_of(t.rotate()) == [(5, 1)]
    assert ranges_of(t.rotate()) == [(5, 1)]  # no drain() marked where the race window began
    assert ranges_of(t.rotate()) == []


def test_overlap_covers_what_the_background_drainer_took(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev}, drain_interval=0.02)
    t.drain()
    write_direct(dev, 6 * BS)
    deadline = time.monotonic() + 5
    while t.stats["events"] == 0:  # wait for the background thread, not rotate(), to read it
        assert time.monotonic() < deadline, "background drainer never drained"
        time.sleep(0.01)
    assert ranges_of(t.rotate()) == [(6, 1)]
    assert ranges_of(t.rotate()) == [(6, 1)]


def test_partition_write_maps_to_whole_disk_block(loopdev, trackers):
    start = 2048  # sectors: the partition begins at 1 MiB, whole-disk block 16
    dev = loopdev(partition_start=start)
    part = dev + "p1"
    name = os.path.basename(part)
    assert int(open(f"/sys/class/block/{name}/start").read()) == start
    t = trackers({"a": dev})
    write_direct(part, 3 * BS)
    assert ranges_of(t.rotate()) == [(16 + 3, 1)]
    # A kernel that reports the partition's dev with a partition-relative sector maps the same.
    major, minor = open(f"/sys/class/block/{name}/dev").read().strip().split(":")
    t.ingest(f"  x-1 [000] ..... 1.0: block_bio_queue: {major},{minor} WS {3 * BS // 512} + 8 [x]\n".encode())
    assert ranges_of(t.rotate()) == [(16 + 3, 1)]


def test_tiny_ring_without_reader_overruns(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev}, buffer_kb=4)  # the kernel rounds it up to its minimum
    buf = mmap.mmap(-1, 4096)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(5000):
            os.pwrite(fd, buf, (i % 1000) * BS)
    finally:
        os.close(fd)
    t.drain()
    assert t.lost() == "ring_overrun"
    assert t.stats["overruns"] > 0
    epochs = t.rotate()
    assert epochs["a"].lost == "ring_overrun"
    assert epochs["a"].ranges and epochs["a"].events > 0  # a lost epoch still reports what it saw
    # Overruns are judged since the last rotate: a quiet next epoch is trustworthy again.
    assert t.rotate()["a"].lost is None


def test_discard_and_write_zeroes_are_reported(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev})
    subprocess.run(["blkdiscard", "-o", str(MIB), "-l", str(2 * BS), dev], check=True)
    subprocess.run(["blkdiscard", "-z", "-o", str(4 * MIB), "-l", str(BS), dev], check=True)
    assert ranges_of(t.rotate()) == [(16, 2), (64, 1)]


def test_unparseable_line_marks_lost(loopdev, trackers):
    dev = loopdev()
    t = trackers({"a": dev})
    write_direct(dev, 7 * BS)
    t.drain()
    # Split across two reads on purpose: the partial tail must be kept, not parsed.
    t.ingest(b"  x-1 [000] ..... 1.0: block_bio_queue: 7,0 W")
    assert t.lost() is None
    t.ingest(b"S 0 + 8 [x]\nthis is not a trace line\n")
    assert t.lost() == "unparseable_trace_line: this is not a trace line"
    assert t.stats["unparseable_lines"] == 1
    epochs = t.rotate()
    assert epochs["a"].lost.startswith("unparseable_trace_line")
    assert (7, 1) in epochs["a"].ranges


def test_reuse_after_close_without_remove_sees_writes_in_between(loopdev, trackers):
    dev = loopdev()
    name = f"lifeboat-test-{uuid.uuid4().hex[:8]}"
    first = trackers({"a": dev}, instance_name=name)
    write_direct(dev, 1 * BS)
    assert ranges_of(first.rotate()) == [(1, 1)]
    first.close(remove=False)  # the agent exits; the kernel keeps recording
    write_direct(dev, 8 * BS)
    second = trackers({"a": dev}, instance_name=name)
    epochs = second.rotate()
    assert epochs["a"].ranges == [(8, 1)] and epochs["a"].lost is None
    instance = second.instance
    second.close()
    assert not os.path.exists(instance)


def test_reuse_of_an_overrun_ring_loses_the_first_epoch(loopdev, trackers):
    dev = loopdev()
    name = f"lifeboat-test-{uuid.uuid4().hex[:8]}"
    trackers({"a": dev}, instance_name=name, buffer_kb=4).close(remove=False)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(5000):
            os.pwrite(fd, buf, (i % 1000) * BS)
    finally:
        os.close(fd)
    t = trackers({"a": dev}, instance_name=name, buffer_kb=4)
    assert t.lost() == "ring_overrun"
    assert t.rotate()["a"].lost == "ring_overrun"


def test_reuse_with_another_ring_size_resizes_and_loses_only_that_epoch(loopdev, trackers):
    dev = loopdev()
    name = f"lifeboat-test-{uuid.uuid4().hex[:8]}"
    trackers({"a": dev}, instance_name=name, buffer_kb=1024).close(remove=False)
    same = trackers({"a": dev}, instance_name=name, buffer_kb=1024)  # reads back slightly larger: no resize
    assert same.rotate()["a"].lost is None
    same.close(remove=False)
    t = trackers({"a": dev}, instance_name=name, buffer_kb=64)
    assert t.rotate()["a"].lost == "ring_resized"
    with open(os.path.join(t.instance, "buffer_size_kb")) as f:
        assert abs(int(f.read().split()[0]) - 64) <= 8
    write_direct(dev, 3 * BS)
    epoch = t.rotate()["a"]
    assert (epoch.lost, epoch.ranges) == (None, [(3, 1)])


def test_reuse_with_a_disk_the_old_filter_missed(loopdev, trackers):
    a, b = loopdev(), loopdev()
    name = f"lifeboat-test-{uuid.uuid4().hex[:8]}"
    trackers({"a": a}, instance_name=name).close(remove=False)
    t = trackers({"a": a, "b": b}, instance_name=name)
    epochs = t.rotate()
    assert epochs["a"].lost is None
    assert epochs["b"].lost == "not_tracked_before_start"
    write_direct(b, 2 * BS)
    assert t.rotate()["b"].ranges == [(2, 1)]


def test_close_removes_instance(loopdev, trackers):
    t = trackers({"a": loopdev()})
    assert os.path.isdir(t.instance)
    t.close()
    assert not os.path.exists(t.instance)
    t.close()  # idempotent


def test_background_drainer_survives_errors_and_marks_lost(loopdev, trackers, monkeypatch):
    dev = loopdev()
    t = trackers({"a": dev}, drain_interval=0.01)
    real = t._counters
    failures = []

    def flaky():
        if not failures:
            failures.append(1)
            raise OSError(5, "Input/output error")
        return real()

    monkeypatch.setattr(t, "_counters", flaky)
    deadline = time.monotonic() + 5
    while t.lost() is None:
        assert time.monotonic() < deadline, "drain error never reported"
        time.sleep(0.01)
    assert t.lost() == "drain_error: [Errno 5] Input/output error"
    write_direct(dev, 9 * BS)  # the thread is still draining after the error
    while t.stats["events"] == 0:
        assert time.monotonic() < deadline, "background drainer died"
        time.sleep(0.01)
    epochs = t.rotate()
    assert epochs["a"].lost.startswith("drain_error") and (9, 1) in epochs["a"].ranges


def test_unavailable_message_says_what_to_do():
    msg = str(TracefsUnavailable("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: EPERM"))
    assert "mounting it at /sys/kernel/tracing failed: EPERM" in msg
    assert msg.endswith("the agent falls back to the digest tracker.")
