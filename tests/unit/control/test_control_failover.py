"""Failover choices refused before any job starts (outside retention, group member alone, no app point), and
the periodic retention pass over every protected machine."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from lifeboat.control.client import ApiCallFailed
from lifeboat.control.retention_task import RetentionTask
from lifeboat.core.catalog import PointEntry


def entry(machine: str, point: str, created: float, consistency: str, seq: int, **group) -> PointEntry:
    return PointEntry(point_id=point, machine=machine, disk_id=f"{machine}.sda", seq=seq, frame_index=0,
                      disk_size=1 << 20, created=created, consistency=consistency, cycle=seq, block_size=65536,
                      image_digest="0" * 32, **group)


async def refused(op, machine: str, **body) -> ApiCallFailed:
    with pytest.raises(ApiCallFailed) as exc:
        await op.call("POST", f"/machines/{machine}/failover", {"to": "/tmp/lifeboat-never-written", **body})
    return exc.value


async def test_impossible_failover_choices_are_refused_with_the_way_out(control_repo):
    control = control_repo
    now = time.time()
    for e in (entry("web01", "old", now - 3 * 86400, "app", 1), entry("web01", "new", now - 60, "crash", 2),
              entry("db01", "g1", now - 60, "crash", 1, group="shop", group_tag="t1", group_members=("db01", "db02"))):
        await control.repo.put_point(e)
    async with control.operator() as op:
        await op.call("PUT", "/policies/day", {"retention_seconds": 86400, "keep_all_seconds": 3600})
        await op.call("PUT", "/machines/web01", {"disks": ["sda"], "policy": "day"})
        await op.call("PUT", "/machines/web02", {"disks": ["sda"]})
        await op.call("POST", "/groups", {"name": "shop"})
        await op.call("PUT", "/machines/db01", {"disks": ["sda"], "group": "shop"})

        e = await refused(op, "web01", point="old")
        assert e.status == 409 and e.code == "outside_retention" and "retention of 1.00 days" in e.message
        e = await refused(op, "web01", point="nope")
        assert e.status == 404 and "lifeboat points --machine web01" in e.message
        e = await refused(op, "web02", point="latest")
        assert e.status == 409 and e.code == "no_point"
        e = await refused(op, "db01", point="latest", test=True)
        assert e.status == 409 and e.code == "group_member" and "--group shop --point latest-group" in e.message
        e = await refused(op, "web01", point="latest", to="relative/dir")
        assert e.status == 400 and "absolute directory" in e.message
        e = await refused(op, "nobody", point="latest")
        assert e.status == 404 and "lifeboat protect nobody" in e.message
        with pytest.raises(ApiCallFailed) as exc:
            await op.call("POST", "/machines/web01/failover/commit")
        assert exc.value.status == 409 and "no failover to commit" in exc.value.message
        with pytest.raises(ApiCallFailed) as exc:
            await op.call("POST", "/machines/web01/failover/cleanup")
        assert exc.value.status == 409 and "no test failover" in exc.value.message
        assert (await op.call("GET", "/jobs"))["jobs"] == []   # nothing was started


async def test_retention_pass_covers_every_machine_with_points_and_skips_the_others(control_repo):
    control = control_repo
    now = time.time()
    for e in (entry("web02", "a", now - 120, "crash", 1), entry("web02", "b", now - 60, "app", 2)):
        await control.repo.put_point(e)
    async with control.operator() as op:
        await op.call("PUT", "/machines/web01", {"disks": ["sda"]})   # protected, no point uploaded yet
        await op.call("PUT", "/machines/web02", {"disks": ["sda"]})
    task = RetentionTask(control.role.store, lambda: control.repo, 3600, work_dir=str(control.role.config.control.state_dir))
    with capture_logs() as logs:
        first = await task.run_once()
        second = await task.run_once()
    assert [r.machine for r in first] == ["web02"] == [r.machine for r in second]
    assert sorted(first[0].kept_points) == ["a", "b"] and first[0].dropped_points == []   # both inside keep-all
    assert [p.point_id for p in await control.repo.list_points()] == ["a", "b"]
    assert not [e for e in logs if e["log_level"] in ("error", "warning")], logs
    assert task.passes == 2
