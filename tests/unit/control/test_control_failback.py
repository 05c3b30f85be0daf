"""Failback states through the management API: each step refused out of order with the way out, and the
primary's ingest check refusing a powered-off machine's agent credential."""

from __future__ import annotations

import time

import pytest

from lifeboat.control import failover as fo
from lifeboat.control.client import ApiCallFailed
from lifeboat.control.store import transaction
from lifeboat.process_server.ingest import CredentialRefused


async def step(op, machine: str, name: str) -> dict:
    return await op.call("POST", f"/machines/{machine}/failback", {"step": name})


async def refused(op, machine: str, name: str) -> ApiCallFailed:
    with pytest.raises(ApiCallFailed) as exc:
        await step(op, machine, name)
    return exc.value


def failed_over(conn, machine: str, job_id: str) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO jobs (id, kind, machine, state, principal, params, created) VALUES "
                     "(?, 'failover', ?, 'succeeded', 'operator:admin', '{}', ?)", (job_id, machine, time.time()))
    fo.record_failover(conn, machine, job_id, False, "p1", {f"{machine}.sda": "/tmp/x.img"})


async def test_failback_steps_follow_the_states_and_refuse_with_the_way_out(control):
    async with control.operator() as op:
        await op.call("PUT", "/machines/web01", {"disks": ["sda"]})
        e = await refused(op, "web01", "reprotect")
        assert (e.status, e.code) == (409, "wrong_state") and "protected" in e.message
        e = await refused(op, "web01", "rewind")
        assert (e.status, e.code) == (400, "bad_request") and "reenable" in e.message
        await control.role.store.call(failed_over, "web01", "j1")
        e = await refused(op, "web01", "reprotect")
        assert e.code == "not_committed" and "lifeboat failover commit web01" in e.message
        await control.role.store.call(fo.set_failover_state, "web01", "j1", "committed")
        e = await refused(op, "web01", "prepare")
        assert e.code == "wrong_state" and "lifeboat reprotect web01" in e.message

        # The agent's credential still works while failed-over ...
        reg = await op.call("POST", "/credentials", {"kind": "agent", "name": "web01"})
        assert await control.role.machine_of(reg["token"]) == "web01"
        out = await step(op, "web01", "reprotect")
        assert (out["from"], out["state"], out["powered_off"]) == ("failed-over", "reprotecting", True)
        # ... and is refused while the copy is replicated back over the machine's disk.
        with pytest.raises(CredentialRefused) as exc:
            await control.role.machine_of(reg["token"])
        assert exc.value.status == 409 and exc.value.reason == "powered_off" and "reenable" in exc.value.message
        assert (await step(op, "web01", "reprotect"))["state"] == "reprotecting"       # a re-run is fine
        assert (await step(op, "web01", "prepare"))["state"] == "failing-back"
        e = await refused(op, "web01", "reenable")
        assert e.code == "wrong_state" and "--stage switch" in e.message
        assert (await step(op, "web01", "cancel"))["state"] == "reprotecting"
        assert (await step(op, "web01", "prepare"))["state"] == "failing-back"
        assert (await step(op, "web01", "switch"))["state"] == "failing-back"
        out = await step(op, "web01", "reenable")
        assert (out["state"], out["powered_off"]) == ("protected", False)
        assert await control.role.machine_of(reg["token"]) == "web01"
        steps = (await op.call("GET", "/machines/web01/failback"))["steps"]
        assert [s["step"] for s in steps] == ["reprotect", "reprotect", "prepare", "cancel", "prepare", "switch",
                                              "reenable"]
        assert all(s["principal"] == "operator:admin" for s in steps)
        e = await refused(op, "web01", "reenable")
        assert e.code == "wrong_state"
