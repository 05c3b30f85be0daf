"""Continuous tracking on a real filesystem: tracepoint tracker, freeze, reflink snapshots, scripts.

Each test protects ext4 on a loop device whose backing image lives on a reflink XFS, with a
writer running. The agent keeps its reflink clones (snapshot.keep), which are the oracles: the
kernel's copy of the backing image at the instant of each point.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from needs_root import require_root
from blockdev import start_writer, stop, tracked_ext4
from lab import sha256_file

DISK_MIB = 128


@pytest.fixture
def disk(tmp_path):
    require_root()
    with tracked_ext4(tmp_path, DISK_MIB) as d:
        yield d


def agent_extra(disk, **more) -> dict:
    extra = {"replication": {"interval_seconds": 1.0, "batch_bytes": 4 << 20},
             "tracking": {"tracker": "tracepoint"},
             "snapshot": {"providers": ["reflink"], "dir": str(disk.snapshot_dir), "keep": 100},
             "consistency": {"freeze_timeout_seconds": 10.0}}
    for key, value in more.items():
        extra[key] = {**extra.get(key, {}), **value}
    return extra


def cycle_lines(lab) -> list[str]:
    return [line for line in lab.log_path.read_text().splitlines() if "cycle complete" in line]


def field(line: str, name: str) -> str:
    m = re.search(rf"\b{name}=('?)([^' ]*)\1", line)
    assert m, (name, line)
    return m.group(2)


def assert_points_equal_oracles(lab, disk, points, tmp_path) -> None:
    assert points
    for p in points:
        out = tmp_path / "recovered.img"
        res = lab.failover(p["point_id"], out)
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == disk.clone_sha256(p["point_id"], "db01.sda"), p["point_id"]
        out.unlink()


def test_points_of_a_busy_filesystem_equal_their_reflink_clones(lab, disk, tmp_path):
    lab.start_ps()
    writer = start_writer(disk.mountpoint / "data.bin", 48 << 20, 4e6, seed=1)
    try:
        time.sleep(0.5)
        assert lab.run_agent("db01", {"sda": disk.device}, cycles=5, extra=agent_extra(disk)) == 0
    finally:
        stop(writer)
    points = lab.wait_points(5)
    assert {p["consistency"] for p in points} == {"crash"}
    assert_points_equal_oracles(lab, disk, points, tmp_path)
    lines = cycle_lines(lab)
    assert all(field(line, "snapshots") == "reflink" for line in lines), lines
    assert all(field(line, "freeze_ms") not in ("None", "") for line in lines), lines
    # After the first (full) pass, cycles read only the tracked blocks, not the whole disk.
    later = [int(field(line, "read_bytes")) for line in lines[1:]]
    assert max(later) < (DISK_MIB << 20) // 2, later


def test_ring_overrun_forces_a_digest_resync_and_the_next_point_is_exact(lab, disk, tmp_path):
    lab.start_ps()
    writer = start_writer(disk.mountpoint / "data.bin", 32 << 20, 8e6, seed=2)
    try:
        time.sleep(0.5)
        # A one-page ring that is read only at each cycle: the writer overruns it.
        extra = agent_extra(disk, tracking={"trace_buffer_kb": 4, "drain_interval_seconds": 3600})
        assert lab.run_agent("db01", {"sda": disk.device}, cycles=3, extra=extra) == 0
    finally:
        stop(writer)
    log = lab.log_path.read_text()
    assert "digest resync: change tracking lost" in log and "ring_overrun" in log
    assert_points_equal_oracles(lab, disk, lab.wait_points(3), tmp_path)


def test_agent_killed_mid_cycle_resyncs_by_digest_and_never_leaves_the_filesystem_frozen(lab, disk, tmp_path):
    lab.start_ps()
    writer = start_writer(disk.mountpoint / "data.bin", 48 << 20, 4e6, seed=3)
    try:
        extra = agent_extra(disk, replication={"batch_bytes": 1 << 20})
        for round_ in range(3):
            agent = lab.start_agent("db01", {"sda": disk.device}, cycles=None, extra=extra)
            time.sleep(1.5 + round_ * 0.37)  # lands in different phases of the cycle each round
            agent.send_signal(signal.SIGKILL)
            agent.wait(30)
            # Whatever phase it died in, the filesystem is writable again within the watchdog deadline.
            probe = subprocess.run(["dd", "if=/dev/zero", f"of={disk.mountpoint}/probe", "bs=4k", "count=1",
                                    "conv=fsync"], capture_output=True, timeout=15)
            assert probe.returncode == 0, probe.stderr
        before = len(lab.points())
        assert lab.run_agent("db01", {"sda": disk.device}, cycles=2, extra=extra) == 0
    finally:
        stop(writer)
    log = lab.log_path.read_text()
    assert "digest resync: writes while the agent was stopped are unknown" in log
    points = lab.wait_points(before + 2)
    assert_points_equal_oracles(lab, disk, points[-2:], tmp_path)


def test_app_consistent_scripts_run_around_the_freeze(lab, disk, tmp_path):
    order = tmp_path / "order.log"
    script = tmp_path / "app.sh"
    # pre: the application flushes its state into the filesystem (must be writable: not frozen yet).
    # post: writes again (must be writable: already thawed), after the snapshot, so not in the point.
    script.write_text(f"""#!/bin/sh
set -e
echo "$LIFEBOAT_PHASE $LIFEBOAT_POINT_ID" >> {order}
if [ "$LIFEBOAT_PHASE" = pre ]; then
    [ -e {tmp_path}/fail-pre ] && exit 3
    echo "flushed by pre for $LIFEBOAT_POINT_ID" > {disk.mountpoint}/app-state.txt
    sync {disk.mountpoint}/app-state.txt
else
    echo "written by post for $LIFEBOAT_POINT_ID" > {disk.mountpoint}/after.txt
fi
""")
    script.chmod(0o755)
    lab.start_ps()
    extra = agent_extra(disk, consistency={"pre_script": str(script), "post_script": str(script),
                                           "app_interval_seconds": 0})
    assert lab.run_agent("db01", {"sda": disk.device}, cycles=1, extra=extra) == 0
    (tmp_path / "fail-pre").touch()
    assert lab.run_agent("db01", {"sda": disk.device}, cycles=1, extra=extra) == 0
    app, after_failure = lab.wait_points(2)
    assert app["consistency"] == "app"
    assert after_failure["consistency"] == "crash"  # the snapshot still happened; the app was not quiesced
    assert "pre script failed: no app-consistent point this cycle" in lab.log_path.read_text()
    lines = order.read_text().split("\n")
    assert lines[:2] == [f"pre {app['point_id']}", f"post {app['point_id']}"]
    assert_points_equal_oracles(lab, disk, [app, after_failure], tmp_path)
    # The recovered app point holds what pre flushed, and nothing post wrote.
    out = tmp_path / "app.img"
    assert lab.failover(app["point_id"], out).returncode == 0
    mnt = tmp_path / "check"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(out), str(mnt)], check=True)
    try:
        assert (mnt / "app-state.txt").read_text() == f"flushed by pre for {app['point_id']}\n"
        assert not (mnt / "after.txt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        os.unlink(out)


def test_discarded_blocks_travel_as_zero_ranges(lab, disk, tmp_path):
    lab.start_ps()
    data = disk.mountpoint / "big.bin"
    data.write_bytes(os.urandom(16 << 20))
    subprocess.run(["sync"], check=True)
    assert lab.run_agent("db01", {"sda": disk.device}, cycles=1, extra=agent_extra(disk)) == 0
    data.unlink()
    subprocess.run(["sync"], check=True)  # ext4 frees the blocks at its journal commit
    subprocess.run(["fstrim", str(disk.mountpoint)], check=True)  # the loop device punches holes: zeros
    assert lab.run_agent("db01", {"sda": disk.device}, cycles=1, extra=agent_extra(disk)) == 0
    last = cycle_lines(lab)[-1]
    # A clean restart continues tracking (fstrim discards all free space, so much is read anyway).
    second_run = lab.log_path.read_text().split("change tracking continues from the previous run", 1)
    assert len(second_run) == 2 and "digest resync" not in second_run[1]
    assert int(field(last, "zeroed_bytes")) >= 8 << 20, last   # sent as zero frames, not as data
    assert int(field(last, "changed_bytes")) < 4 << 20, last
    assert_points_equal_oracles(lab, disk, lab.wait_points(2), tmp_path)
