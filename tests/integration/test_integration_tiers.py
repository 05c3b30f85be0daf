"""Forced change-log tier steps under a busy writer: each still ends in bit-exact recovered images.

data kept (memory pool → .hrl spill) → extents only → dirty bitmap → resync required. The
reflink cases run ext4 and compare with the clones the agent keeps. The freeze-copy cases write
to the raw loop device and pause the writer with the demo's pre/post scripts, whose post step
records the device's SHA-256 as the oracle of each point (with a filesystem there is no such
oracle: ext4 rewrites its superblock on thaw, before any script could hash the device).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from needs_root import require_root
from blockdev import tracked_ext4
from lab import DEMO_DIR, sha256_file

from test_integration_tracking import agent_extra, assert_points_equal_oracles, cycle_lines, field


def _disk(tmp_path, filesystem: bool):
    require_root()
    return tracked_ext4(tmp_path, 64, xfs_mib=1024, filesystem=filesystem)


@pytest.fixture
def disk(tmp_path):
    with _disk(tmp_path, filesystem=True) as d:
        yield d


@pytest.fixture
def raw_disk(tmp_path):
    with _disk(tmp_path, filesystem=False) as d:
        yield d


def paused_writer(disk, tmp_path):
    """The demo writer on the raw device, pausable by demo/pause.sh through `ctl`."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = subprocess.Popen([sys.executable, str(DEMO_DIR / "writer.py"), disk.device, str(ctl), "5"])
    return proc, ctl


def stop_writer(proc, ctl) -> None:
    (ctl / "stop").touch()
    (ctl / "pause").unlink(missing_ok=True)
    proc.wait(30)


def run_paused(lab, disk, tmp_path, cycles: int, **more) -> list[dict]:
    proc, ctl = paused_writer(disk, tmp_path)
    scripts = {"pre_script": str(DEMO_DIR / "pause.sh"), "post_script": str(DEMO_DIR / "pause.sh"),
               "app_interval_seconds": 0}
    extra = agent_extra(disk, consistency=scripts, **more)
    try:
        rc = lab.run_agent("db01", {"sda": disk.device}, cycles=cycles, extra=extra,
                           env={"DEMO_CTL": str(ctl), "DEMO_IMAGE": disk.device})
    finally:
        stop_writer(proc, ctl)
    assert rc == 0
    points = lab.wait_points(cycles)
    for p in points:
        out = tmp_path / "recovered.img"
        assert lab.failover(p["point_id"], out).returncode == 0
        assert sha256_file(out) == (ctl / "oracle" / f"{p['point_id']}.sha256").read_text().strip(), p
        out.unlink()
    return points


def hrl_tier_events(lab) -> list[str]:
    return [line for line in lab.log_path.read_text().splitlines() if "change log tier changed" in line]


def test_freeze_copy_data_spills_from_a_tiny_memory_pool_to_the_change_log(lab, raw_disk, tmp_path):
    lab.start_ps()
    points = run_paused(lab, raw_disk, tmp_path, 4, snapshot={"providers": ["freeze-copy", "none"]},
                        tracking={"memory_pool_bytes": 64 * 1024, "spill_bytes": 256 << 20})
    lines = cycle_lines(lab)
    # After the first (full, live) pass, every cycle was served from kept data: consistent.
    assert [field(line, "snapshots") for line in lines[1:]] == ["freeze-copy"] * 3, lines
    # Writers were held by the scripts, but nothing froze a filesystem: not called consistent.
    assert [p["consistency"] for p in points] == ["app"] + ["none"] * 3
    # More than the pool was kept, so it spilled to the .hrl; spilling is still the data tier.
    assert all(int(field(line, "kept_bytes")) > 64 * 1024 for line in lines[1:]), lines
    assert not [e for e in hrl_tier_events(lab) if "new='EXTENTS'" in e or "new='BITMAP'" in e]


def test_a_tiny_spill_cap_drops_to_extents_and_reads_live_while_writers_are_held(lab, raw_disk, tmp_path):
    lab.start_ps()
    run_paused(lab, raw_disk, tmp_path, 3, snapshot={"providers": ["freeze-copy", "none"]},
               tracking={"memory_pool_bytes": 64 * 1024, "spill_bytes": 64 * 1024})
    events = hrl_tier_events(lab)
    assert any("new='EXTENTS'" in e and "spill_full" in e for e in events), events


def run_busy(lab, disk, seed: int, **tracking) -> list[dict]:
    """Four cycles of the tracked ext4 under a random writer; returns the points."""
    from blockdev import start_writer, stop
    lab.start_ps()
    writer = start_writer(disk.mountpoint / "data.bin", 24 << 20, 4e6, seed=seed)
    try:
        assert lab.run_agent("db01", {"sda": disk.device}, cycles=4, extra=agent_extra(disk, tracking=tracking)) == 0
    finally:
        stop(writer)
    return lab.wait_points(4)


def test_a_tiny_extent_budget_falls_back_to_a_dirty_bitmap(lab, disk, tmp_path):
    points = run_busy(lab, disk, 7, extent_budget=2, bitmap_budget_bytes=64)
    events = hrl_tier_events(lab)
    assert any("new='BITMAP'" in e and "extent_budget" in e for e in events), events
    assert_points_equal_oracles(lab, disk, points, tmp_path)


def test_no_bitmap_budget_means_resync_and_the_next_points_are_still_exact(lab, disk, tmp_path):
    points = run_busy(lab, disk, 8, extent_budget=2, bitmap_budget_bytes=0)
    events = hrl_tier_events(lab)
    assert any("new='RESYNC'" in e and "bitmap_budget" in e for e in events), events
    # Each resync reads the whole disk again.
    reads = [int(field(line, "read_bytes")) for line in cycle_lines(lab)]
    assert reads.count(64 << 20) >= 2, reads
    assert_points_equal_oracles(lab, disk, points, tmp_path)


def test_tier_and_its_reason_are_visible_in_status_and_metrics(lab, disk, tmp_path):
    import json
    import re
    import urllib.request

    from blockdev import start_writer, stop
    lab.start_ps()
    writer = start_writer(disk.mountpoint / "data.bin", 24 << 20, 4e6, seed=9)
    extra = agent_extra(disk, tracking={"extent_budget": 2, "bitmap_budget_bytes": 64},
                        replication={"interval_seconds": 3600})  # one cycle, then the epoch keeps growing
    agent = lab.start_agent("db01", {"sda": disk.device}, extra=extra)
    try:
        lab.wait_points(1)
        port = int(re.search(r"event='agent ready'.*metrics_port=(\d+)", lab.log_path.read_text()).group(1))

        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.read().decode()

        status = json.loads(get("/healthz"))["disks"]["db01.sda"]
        assert status["tracker"] == "tracepoint" and status["tier"] in ("data", "extents", "bitmap"), status
        metrics = get("/metrics")
        assert 'lifeboat_mobility_tier_changes_total{reason="caught_up",tier="data"} 1.0' in metrics
        assert 'lifeboat_mobility_tracking_tier{disk="db01.sda"}' in metrics
    finally:
        stop(writer)
        agent.terminate()
        agent.wait(30)
    # On the clean stop, the epoch drained since the cycle went into the change log, over budget.
    events = hrl_tier_events(lab)
    assert any("new='BITMAP'" in e and "extent_budget" in e for e in events), events
