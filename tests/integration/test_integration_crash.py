"""Crashes in the middle of an initial replication: SIGKILL the process server or the agent, restart, compare bytes."""

from __future__ import annotations

import signal
import time

from disk_images import make_image
from lab import sha256_file

SMALL_BATCHES = {"replication": {"batch_bytes": 1 << 20}}  # many batches, so a kill lands mid-stream


def stored_batches(lab) -> float:
    try:
        return lab.ps_metrics().get('lifeboat_ps_batches_total{result="stored"}', 0.0)
    except OSError:
        return 0.0


def wait_for_batches(lab, count: int, agent, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while (n := stored_batches(lab)) < count:
        assert agent.poll() is None, f"agent exited with {agent.returncode} before {count} batches were stored"
        assert time.monotonic() < deadline, f"only {n} batches stored after {timeout} s"
        time.sleep(0.005)
    return n


def test_sigkill_process_server_mid_initial_replication(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 96)
    source = sha256_file(disk)
    lab.start_ps()
    agent = lab.start_agent("web01", {"sda": disk}, cycles=1, extra=SMALL_BATCHES)
    stored_before_kill = wait_for_batches(lab, 8, agent)
    lab.ps_proc.kill()  # SIGKILL: no drain, no state saved beyond what was fsynced
    lab.ps_proc.wait()
    assert agent.poll() is None, "the kill must land while the agent is still replicating"
    time.sleep(1.0)  # the agent keeps retrying against a closed port
    lab.start_ps()
    assert agent.wait(300) == 0
    [point] = lab.wait_points(1)
    out = tmp_path / "recovered.img"
    res = lab.failover(point["point_id"], out)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == source
    log = lab.log_path.read_text()
    assert "full resync" not in log, "acknowledged batches must survive the crash"
    assert "process server unreachable, retrying" in log
    # The second process server started from what the first had acknowledged.
    assert stored_before_kill >= 8


def test_sigkill_process_server_twice_with_uploads_in_flight(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 64, seed=11)
    source = sha256_file(disk)
    lab.start_ps()
    agent = lab.start_agent("web01", {"sda": disk}, cycles=1, extra=SMALL_BATCHES)
    for threshold in (6, 4):
        wait_for_batches(lab, threshold, agent)
        lab.stop_ps(signal.SIGKILL)
        lab.start_ps()
    assert agent.wait(300) == 0
    [point] = lab.wait_points(1)
    out = tmp_path / "recovered.img"
    assert lab.failover(point["point_id"], out).returncode == 0
    assert sha256_file(out) == source
    assert lab.cli("verify", "-q").returncode == 0


def test_sigkill_agent_mid_initial_replication_then_restart(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 64, seed=12)
    source = sha256_file(disk)
    lab.start_ps()
    agent = lab.start_agent("web01", {"sda": disk}, cycles=1, extra=SMALL_BATCHES)
    wait_for_batches(lab, 8, agent)
    agent.kill()
    agent.wait()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1, extra=SMALL_BATCHES) == 0
    [point] = lab.wait_points(1)
    out = tmp_path / "recovered.img"
    assert lab.failover(point["point_id"], out).returncode == 0
    assert sha256_file(out) == source
    # The restarted agent continued the log after the acknowledged batches: the blocks it had sent
    # were marked unknown in its map before sending, so no full resync was needed.
    assert "full resync" not in lab.log_path.read_text()
