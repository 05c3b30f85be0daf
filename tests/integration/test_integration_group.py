"""Consistency groups: three agents on one host, three ext4 loop devices, three writers, port 20004 on loopback.

Every member keeps its reflink clones; a group point is right when, for its tag, each member's
recovered image equals that member's clone taken at that tag.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from needs_root import require_root
from grouplab import MEMBERS, three_member_group
from lab import sha256_file


@pytest.fixture
def group(lab, tmp_path):
    require_root()
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
        hang.touch()
        n = log.read_text().count("did not answer HELD in time")
        t0 = time.monotonic()
        deadline = t0 + 30
        while log.read_text().count("did not answer HELD in time") <= n:
            assert time.monotonic() < deadline, "no aborted round"
            time.sleep(0.05)
        assert time.monotonic() - t0 < 1.5 + 5.0 + 1.0  # one interval + the 5 s hold deadline + slack
        aborted = re.findall(r"event='group round aborted: every member thaws.*?TAG='([^']+)'.*?did not answer HELD",
                             log.read_text())[-1]
        # Everyone else was released: their filesystems take writes at once.
        for m in ("app01", "db01"):
            assert writable_within(group.disks[m].mountpoint, 3.0) < 3.0
        hang.unlink()
        marked = log.read_text().count("group round marked")
        while log.read_text().count("group round marked") <= marked:  # the group recovers by itself
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
        group.wait_group_points(2)  # raises unless a second group point appears
        # Kill the coordinator mid-HOLD: web01 hangs again, app01 and db01 are frozen waiting for
        # MARK when app01 dies; db01 thaws at once (lost coordinator), app01's own filesystem
        # through its external thaw watchdog (agent gone).
        holds = log.read_text().count("group hold received")
        hang.touch()
        deadline = time.monotonic() + 30
        while log.read_text().count("group hold received") < holds + 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        held = re.findall(r"event='group hold received'.*?TAG='([^']+)'", log.read_text())[-1]
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
    # Neither the aborted round nor the one whose coordinator died became a group point.
    tags = [gp["tag"] for gp in group.group_points()]
    assert aborted not in tags and held not in tags, (aborted, held, tags)


def test_hostile_connections_are_refused_counted_and_freeze_nobody(group):
    import asyncio
    import ssl

    from lifeboat.core import tls
    from lifeboat.mobility.group_wire import GROUP_HEADER, GROUP_MAGIC, HELLO, MARK, REFUSED, encode, read_frame

    db01 = group.start("db01", interval_seconds=60)  # only db01 runs: nobody coordinates (no fallback soon)
    deadline = time.monotonic() + 30
    while "group listener ready" not in group.lab.log_path.read_text():
        assert time.monotonic() < deadline and db01.poll() is None
        time.sleep(0.1)
    ca = group.lab.init["ca_cert"]

    def ctx(machine: str | None) -> ssl.SSLContext:
        c = tls.mutual_client_context(*group.certs[machine], ca) if machine else tls.client_context(ca)
        c.check_hostname = False
        return c

    async def exchange(machine: str | None, data: bytes) -> int | None:
        """Send raw bytes; return the frame type the member answers with, or None if it just closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", group.ports["db01"], ssl=ctx(machine))
        try:
            writer.write(data)
            await writer.drain()
            try:
                kind, _ = await read_frame(reader, 10)
                return kind
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return None
        finally:
            writer.close()

    async def run_all() -> dict:
        return {
            "no certificate": await exchange(None, encode(HELLO, group="shop", member="app01")),
            "not the coordinator": await exchange("web01", encode(HELLO, group="shop", member="web01")),
            "another group": await exchange("app01", encode(HELLO, group="other", member="app01")),
            "garbage": await exchange("app01", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            "huge length": await exchange("app01", GROUP_HEADER.pack(GROUP_MAGIC, 1, HELLO, 0, 2**31)),
            "MARK first": await exchange("app01", encode(HELLO, group="shop", member="app01")
                                         + encode(MARK, tag="t1")),
        }

    answers = asyncio.run(run_all())
    assert answers == {"no certificate": None, "not the coordinator": REFUSED, "another group": REFUSED,
                       "garbage": None, "huge length": None, "MARK first": None}, answers
    metrics = group.metrics("db01")
    for reason in ("unauthenticated", "not_coordinator", "wrong_group", "malformed", "protocol"):
        assert re.search(rf'^lifeboat_group_rejected_total{{reason="{reason}"}} [1-9]', metrics, re.M), reason
    assert db01.poll() is None  # still serving
    log = group.lab.log_path.read_text()
    assert "group hold received" not in log and "filesystems thawed" not in log  # nobody was frozen
    db01.terminate()
    assert db01.wait(60) == 0


def test_members_fall_back_to_their_own_points_while_the_coordinator_is_down(group, tmp_path):
    # app01 (the coordinator) never starts. After 2 × interval + deadline (8 s) without a group
    # point, each member takes per-machine crash-consistent points: its RPO stays bounded.
    agents = {m: group.start(m) for m in ("db01", "web01")}
    try:
        points = group.lab.wait_points(4, timeout=90)
    finally:
        for a in agents.values():
            a.terminate()
        for a in agents.values():
            assert a.wait(60) == 0
    assert "no group round lately: taking a per-machine point" in group.lab.log_path.read_text()
    assert group.group_points() == []
    for p in points[:4]:
        assert p["consistency"] == "crash"
        out = tmp_path / "alone.img"
        res = group.lab.failover(p["point_id"], out)  # not a group point: a member alone is fine
        assert res.returncode == 0, res.stderr
        clone = group.disks[p["machine"]].snapshot_dir / f"{p['machine']}.sda.{p['point_id']}.snap"
        assert sha256_file(out) == sha256_file(clone)
        out.unlink()

