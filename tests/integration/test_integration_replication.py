"""End to end through real processes: agent → process server → repository → test failover, bytes compared."""

from __future__ import annotations

import shutil
import time

from disk_images import make_image, scribble
from lab import sha256_file


def failover_hash(lab, point: str, target) -> str:
    res = lab.failover(point, target)
    assert res.returncode == 0, res.stderr
    return sha256_file(target)


def test_initial_then_delta_cycles_recover_each_point(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 24)
    lab.start_ps()
    expected = []
    for cycle in range(3):
        if cycle:
            scribble(disk, 50, seed=cycle)
        assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
        expected.append(sha256_file(disk))
    points = lab.wait_points(3)
    assert len(points) == 3
    for point, want in zip(points, expected):
        assert failover_hash(lab, point["point_id"], tmp_path / "out.img") == want
        (tmp_path / "out.img").unlink()
    # Delta cycles sent only what changed: 24 MiB of data once, then ~50 blocks per cycle.
    received = lab.ps_metrics()["lifeboat_ps_received_bytes_total"]
    assert received < 24 * 2**20 + 4 * 2**20, received


def test_two_disks_one_point_and_disk_selection(lab, tmp_path):
    a = make_image(tmp_path / "a.img", 8, seed=1)
    b = make_image(tmp_path / "b.img", 12, seed=2)
    lab.start_ps()
    assert lab.run_agent("db01", {"a": a, "b": b}, cycles=1) == 0
    [point] = lab.wait_points(1)
    assert sorted(point["disks"]) == ["db01.a", "db01.b"]
    out = tmp_path / "out"
    res = lab.failover("latest", out)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out / "db01.a.img") == sha256_file(a)
    assert sha256_file(out / "db01.b.img") == sha256_file(b)
    res = lab.failover(point["point_id"], tmp_path / "only-b.img", "--disk", "b")
    assert res.returncode == 0, res.stderr
    assert sha256_file(tmp_path / "only-b.img") == sha256_file(b)


def test_agent_restart_continues_without_resync(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 16)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    before = lab.ps_metrics()["lifeboat_ps_received_bytes_total"]
    scribble(disk, 10, seed=3)
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0  # a new agent process, same state dir
    delta = lab.ps_metrics()["lifeboat_ps_received_bytes_total"] - before
    assert delta < 2 * 2**20, f"restart re-sent {delta} bytes: it resynced instead of continuing"
    points = lab.wait_points(2)
    assert failover_hash(lab, points[-1]["point_id"], tmp_path / "out.img") == sha256_file(disk)
    assert "full resync" not in lab.log_path.read_text()


def test_lost_agent_state_forces_full_resync(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 16)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    shutil.rmtree(lab.work / "agent-web01")  # the machine was rebuilt; its digest map is gone
    scribble(disk, 10, seed=4)
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    log = lab.log_path.read_text()
    assert "full resync" in log and "no_local_state" in log
    points = lab.wait_points(2)
    assert failover_hash(lab, points[-1]["point_id"], tmp_path / "out.img") == sha256_file(disk)


def test_process_server_with_empty_cache_adopts_the_repository_log(lab, tmp_path):
    """A replacement process server (new cache disk) continues each disk's log where the repository ends."""
    disk = make_image(tmp_path / "sda.img", 16)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    lab.wait_points(1)
    assert lab.stop_ps() == 0
    shutil.rmtree(lab.work / "cache")
    lab.start_ps()
    scribble(disk, 10, seed=5)
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    points = lab.wait_points(2)
    assert failover_hash(lab, points[-1]["point_id"], tmp_path / "out.img") == sha256_file(disk)
    assert failover_hash(lab, points[0]["point_id"], tmp_path / "first.img") != sha256_file(disk)


def test_a_disk_that_grows_gets_no_point_until_restart_then_resyncs_at_the_new_size(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 16, seed=11)
    lab.start_ps()
    agent = lab.start_agent("web01", {"sda": disk}, extra={"replication": {"interval_seconds": 0.2}})
    first = lab.wait_points(1)[0]
    with open(disk, "r+b") as f:
        f.truncate(24 << 20)  # the operator grew the virtual disk
    scribble(disk, 20, seed=12)
    deadline = time.monotonic() + 60
    while "changed size from 16777216 to 25165824" not in lab.log_path.read_text():
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.1)
    before = len(lab.points())
    time.sleep(1.0)  # several more cycles: none may produce a point while the size is wrong
    assert len(lab.points()) == before
    agent.terminate()
    assert agent.wait(30) == 0
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    points = lab.wait_points(before + 1)
    assert "geometry_changed" in lab.log_path.read_text()
    assert failover_hash(lab, points[-1]["point_id"], tmp_path / "out.img") == sha256_file(disk)
    (tmp_path / "out.img").unlink()
    assert first["point_id"] == points[0]["point_id"]
