"""Consistency groups: three agents on one host, three ext4 loop devices, three writers, port 20004 on loopback.

Every member keeps its reflink clones; a group point is right when, for its tag, each member's
recovered image equals that member's clone taken at that tag.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from grouplab import MEMBERS, three_member_group
from lab import sha256_file


@pytest.fixture
def group(lab, tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail("these tests need root (loop devices, mount, tracefs)", pytrace=False)
        pytest.skip("needs root: loop devices, mount, tracefs")
    with three_member_group(lab, tmp_path) as g:
        yield g


def writable_within(mountpoint, seconds: float) -> float:
    """Seconds until a write + fsync to the filesystem completes (it blocks while frozen)."""
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={mountpoint}/probe", "bs=4k", "count=1", "conv=fsync"],
                   check=True, capture_output=True, timeout=seconds)
    return time.monotonic() - t0


def test_group_points_recover_every_member_at_the_same_instant(group, tmp_path):
    agents = [group.start(m) for m in MEMBERS]
    try:
        points = group.wait_group_points(3)
        # The coordinator exports the hold window (first member freeze to last member thaw).
        metrics = group.metrics("app01")
        count = float(re.search(r"^lifeboat_group_hold_seconds_count (\S+)$", metrics, re.M).group(1))
        assert count >= 3, metrics
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            assert a.wait(60) == 0
    for gp in points[:3]:
        assert sorted(gp["members"]) == list(MEMBERS) and gp["consistency"] == "crash"
        out = tmp_path / f"out-{gp['tag']}"
        res = group.lab.cli("failover", "--test", "--group", "shop", "--point", gp["tag"], "--to", str(out), "-q")
        assert res.returncode == 0, res.stderr
        for machine, point_id in gp["members"].items():
            clone = group.disks[machine].snapshot_dir / f"{machine}.sda.{point_id}.snap"
            assert sha256_file(out / f"{machine}.sda.img") == sha256_file(clone), (gp["tag"], machine)
    # A member alone would not match the others' instant: refused, with the way out.
    some = points[0]["members"]["db01"]
    res = group.lab.failover(some, tmp_path / "alone.img")
    assert res.returncode != 0 and "consistency group shop" in res.stderr and "--group shop" in res.stderr
    # The hold window is exported by the coordinator.
    log = group.lab.log_path.read_text()
    holds = [float(x) for x in re.findall(r"event='group round marked'.*?hold_ms=([0-9.]+)", log)]
    assert len(holds) >= 3, holds


def test_a_member_that_never_answers_hold_aborts_the_round_and_everyone_thaws(group, tmp_path):
    # web01's pre script hangs while tmp/hang exists: it never gets to answer HELD. app01 and db01
    # freeze on HOLD and wait for a MARK that cannot come.
    hang = tmp_path / "hang"
    script = tmp_path / "pre.sh"
    script.write_text(f"#!/bin/sh\nwhile [ -e {hang} ] && [ \"$LIFEBOAT_PHASE\" = pre ]; do sleep 0.1; done\n")
    script.chmod(0o755)
    agents = {m: group.start(m, app_interval_seconds=0) for m in ("app01", "db01")}
    agents["web01"] = group.lab.start_agent("web01", {"sda": group.disks["web01"].device}, extra={
        **group.extra("web01"), "consistency": {"pre_script": str(script), "post_script": str(script),
                                                "script_timeout_seconds": 30.0, "freeze_timeout_seconds": 20.0}})
    log = group.lab.log_path
    try:
        group.wait_group_points(1)
        assert group.group_points()[0]["consistency"] == "crash"  # app01/db01 have no scripts
        before = len(group.group_points())
        hang.touch()
        n = log.read_text().count("did not answer HELD in time")
        t0 = time.monotonic()
        deadline = t0 + 30
        while log.read_text().count("did not answer HELD in time") <= n:
            assert time.monotonic() < deadline, "no aborted round"
            time.sleep(0.05)
        assert time.monotonic() - t0 < 1.5 + 5.0 + 1.0  # one interval + the 5 s hold deadline + slack
        # Everyone else was released: their filesystems take writes at once.
        for m in ("app01", "db01"):
            assert writable_within(group.disks[m].mountpoint, 3.0) < 3.0
        hang.unlink()
        marked = log.read_text().count("group round marked")
        while log.read_text().count("group round marked") <= marked:  # the group recovers by itself
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
        before = len(group.wait_group_points(before + 1))
        # Kill the coordinator mid-HOLD: web01 hangs again, app01 and db01 are frozen waiting for
        # MARK when app01 dies; db01 thaws at once (lost coordinator), app01's own filesystem
        # through its external thaw watchdog (agent gone).
        holds = log.read_text().count("group hold received")
        hang.touch()
        deadline = time.monotonic() + 30
        while log.read_text().count("group hold received") < holds + 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        agents["app01"].send_signal(signal.SIGKILL)
        agents["app01"].wait(30)
        for m in ("app01", "db01"):
            assert writable_within(group.disks[m].mountpoint, 3.0) < 3.0
        deadline = time.monotonic() + 10  # the watchdog thaws first and logs after
        while "reason='agent gone'" not in (text := log.read_text()):
            assert time.monotonic() < deadline, "app01's thaw watchdog did not report"
            time.sleep(0.1)
        assert "the coordinator went away during the hold" in text
    finally:
        hang.unlink(missing_ok=True)
        for a in agents.values():
            if a.poll() is None:
                a.terminate()
                a.wait(60)
    assert len(group.group_points()) == before
