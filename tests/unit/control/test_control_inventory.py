"""Policies, groups, protection, heartbeats and status through the API (real TLS, SQLite, repository)."""

from __future__ import annotations

import pytest

from lifeboat.control.client import ApiCallFailed
from lifeboat.core.catalog import PointEntry
from openapi_check import check, load, response_schema


async def agent(control, machine: str) -> str:
    async with control.client() as api:
        return (await api.call("POST", "/register", {"passphrase": control.passphrase, "kind": "agent",
                                                    "name": machine}))["token"]


async def failure(coro) -> ApiCallFailed:
    with pytest.raises(ApiCallFailed) as exc:
        await coro
    return exc.value


async def test_policies_default_create_update_and_validation(control):
    async with control.operator() as op:
        (default,) = (await op.call("GET", "/policies"))["policies"]
        assert default["name"] == "default" and default["crash_interval_seconds"] == 300
        p = await op.call("PUT", "/policies/gold", {"retention_seconds": 15 * 86400, "rpo_threshold_seconds": 60})
        assert p["retention_seconds"] == 15 * 86400 and p["app_interval_seconds"] == default["app_interval_seconds"]
        p = await op.call("PUT", "/policies/gold", {"crash_interval_seconds": 30})
        assert p["crash_interval_seconds"] == 30 and p["rpo_threshold_seconds"] == 60
        e = await failure(op.call("PUT", "/policies/gold", {"retention_seconds": -1}))
        assert e.status == 400 and "retention_seconds -1 is outside" in e.message
        e = await failure(op.call("PUT", "/policies/gold", {"retention_seconds": 3600, "keep_all_seconds": 7200}))
        assert e.status == 400 and "keep_all_seconds (7200) exceeds retention_seconds (3600)" in e.message
        e = await failure(op.call("PUT", "/policies/gold", {"rpo": 5}))
        assert e.status == 400 and "unknown policy field 'rpo'" in e.message
        e = await failure(op.call("GET", "/policies/silver"))
        assert e.status == 404 and "lifeboat policy set" in e.message


async def test_protect_machine_with_disks_policy_group(control):
    async with control.operator() as op:
        e = await failure(op.call("PUT", "/machines/web01", {"disks": ["sda"], "group": "shop"}))
        assert e.status == 404 and "lifeboat group create shop" in e.message
        await op.call("POST", "/groups", {"name": "shop"})
        m = await op.call("PUT", "/machines/web01", {"disks": ["sda", "sdb"], "group": "shop"})
        assert m["disks"] == ["sda", "sdb"] and m["group"] == "shop" and m["process_server"] == "primary"
        e = await failure(op.call("PUT", "/machines/web02", {"disks": ["sda"], "policy": "none-such"}))
        assert e.status == 404 and "no replication policy 'none-such'" in e.message
        e = await failure(op.call("PUT", "/machines/web02", {"disks": ["sd.a"]}))
        assert e.status == 400 and "disk name 'sd.a'" in e.message
        e = await failure(op.call("PUT", "/machines/web02", {"disks": []}))
        assert e.status == 400
        assert (await op.call("GET", "/groups"))["groups"] == [{"name": "shop", "members": ["web01"]}]
        e = await failure(op.call("GET", "/machines/db09"))
        assert e.status == 404 and "lifeboat protect db09" in e.message


async def test_group_holds_at_most_16_machines(control):
    async with control.operator() as op:
        await op.call("POST", "/groups", {"name": "big"})
        for i in range(16):
            await op.call("PUT", f"/machines/m{i:02d}", {"disks": ["sda"], "group": "big"})
        e = await failure(op.call("PUT", "/machines/m16", {"disks": ["sda"], "group": "big"}))
        assert e.status == 409 and e.code == "group_full" and "16" in e.message


async def test_agent_heartbeats_for_its_own_machine_only(control_repo):
    control = control_repo
    async with control.operator() as op:
        await op.call("PUT", "/policies/fast", {"crash_interval_seconds": 2, "app_interval_seconds": 10})
        await op.call("PUT", "/machines/web01", {"disks": ["sda"], "policy": "fast"})
        await op.call("PUT", "/machines/web02", {"disks": ["sda"]})
    web01 = await agent(control, "web01")
    report = {"state": "replicating", "disks": {"web01.sda": {"tier": "data", "tracker": "digest",
                                                              "backlog_bytes": 4096, "churn_bytes_per_second": 1.5,
                                                              "acked_seq": 3, "last_resync_reason": "initial_copy",
                                                              "last_resync_at": 1000.0}}}
    async with control.client(web01) as api:
        reply = await api.call("POST", "/machines/web01/heartbeat", report)
        assert reply["policy"]["crash_interval_seconds"] == 2 and reply["hold"] is False
        assert reply["process_server"] == {"name": "primary", "url": "https://127.0.0.1:9443"}
        assert check(load(), response_schema(load(), "/api/v1/machines/{machine}/heartbeat", "post", 200), reply) == []
        before = control.refusals("forbidden")
        e = await failure(api.call("POST", "/machines/web02/heartbeat", report))
        assert e.status == 403 and "may act only on its own machine 'web01'" in e.message
        e = await failure(api.call("GET", "/machines/web02/status"))
        assert e.status == 403
        assert control.refusals("forbidden") == before + 2
        e = await failure(api.call("POST", "/machines/web01/heartbeat",
                                   {"disks": {"web02.sda": {"tier": "data"}}}))
        assert e.status == 400 and "not a disk of machine web01" in e.message
        own = await api.call("GET", "/machines/web01/status")
    assert own["backlog_bytes"] == 4096 and own["tracking_tier"] == "data"
    assert own["last_resync"] == {"disk": "web01.sda", "reason": "initial_copy", "at": 1000.0}
    assert own["health"] == "warning" and own["health_reasons"] == ["no complete recovery point yet"]


def entry(machine: str, disk: str, point: str, created: float, consistency: str, seq: int) -> PointEntry:
    return PointEntry(point_id=point, machine=machine, disk_id=f"{machine}.{disk}", seq=seq, frame_index=0,
                      disk_size=1 << 20, created=created, consistency=consistency, cycle=seq, block_size=65536,
                      image_digest="0" * 32)


async def test_status_takes_rpo_and_app_point_from_the_catalog(control_repo):
    import time

    control = control_repo
    now = time.time()
    # web01 has two disks; its newest point lacks sdb's entry (not uploaded yet): not complete.
    for e in (entry("web01", "sda", "p1", now - 600, "app", 1), entry("web01", "sdb", "p1", now - 600, "app", 1),
              entry("web01", "sda", "p2", now - 300, "crash", 2), entry("web01", "sdb", "p2", now - 300, "crash", 2),
              entry("web01", "sda", "p3", now - 10, "crash", 3)):
        await control.repo.put_point(e)
    async with control.operator() as op:
        await op.call("PUT", "/policies/tight", {"rpo_threshold_seconds": 120})
        await op.call("PUT", "/machines/web01", {"disks": ["sda", "sdb"], "policy": "tight"})
        await op.call("PUT", "/machines/web02", {"disks": ["sda"]})
        rows = (await op.call("GET", "/status"))["machines"]
    doc = load()
    assert check(doc, response_schema(doc, "/api/v1/status", "get", 200), {"machines": rows}) == []
    web01, web02 = rows
    assert web01["latest_point"] == "p2" and 290 < web01["rpo_seconds"] < 400
    assert web01["last_app_point"]["point_id"] == "p1"
    assert web01["health"] == "critical" and any("over the policy's threshold 120 s" in r for r in web01["health_reasons"])
    assert web02["latest_point"] is None and web02["health"] == "critical"
