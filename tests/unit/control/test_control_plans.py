"""Recovery plans through the API: validation, order of groups and scripts, manual pauses, restarts.

Real TLS, SQLite, a real local repository with real segments, real scripts that append to a file (the
observed order); the job is polled, never timed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from lifeboat.control.client import ApiCallFailed
from lifeboat.control.store import Store, bundled_migrations
from openapi_check import check, load, response_schema
from plan_helpers import image_files, order_script, put_point, sha256_file

POLL_SECONDS = 0.05
HANG_GUARD_SECONDS = 120.0   # only stops a hung test; nothing asserts a duration


async def failure(coro) -> ApiCallFailed:
    with pytest.raises(ApiCallFailed) as exc:
        await coro
    return exc.value


async def wait_state(op, job_id: str, states: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while True:
        job = await op.call("GET", f"/jobs/{job_id}")
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['state']}"
        await asyncio.sleep(POLL_SECONDS)


async def log_lines(op, job_id: str) -> list[str]:
    return [line["line"] for line in (await op.call("GET", f"/jobs/{job_id}/log"))["lines"]]


async def protect(op, *names: str, group: str | None = None) -> None:
    if group:
        await op.call("POST", "/groups", {"name": group})
    for n in names:
        await op.call("PUT", f"/machines/{n}", {"disks": ["sda"], **({"group": group} if group else {})})


async def test_plan_validation_names_what_is_wrong(control, tmp_path):
    script = order_script(tmp_path / "ok.sh", tmp_path / "order")
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    async with control.operator() as op:
        await protect(op, "web01", "web02")
        await protect(op, "db01", "db02", group="shop")

        async def refused(body: dict, status: int, text: str) -> None:
            e = await failure(op.call("PUT", "/plans/p1", body))
            assert e.status == status and text in e.message, (e.status, e.message)

        await refused({"groups": []}, 400, "1 to 7 ordered groups")
        await refused({"groups": [{"machines": ["web01"]}] * 8}, 400, "has 8 groups")
        await refused({"groups": [{"machines": ["web09"]}]}, 404, "machine 'web09' is not protected")
        await refused({"groups": [{"machines": ["web01"]}, {"machines": ["web02", "web01"]}]}, 400,
                      "machine web01 is already in group 1")
        await refused({"groups": [{"machines": ["db01"]}, {"machines": ["db02"]}]}, 409,
                      "db02 (group 2) are not in plan group 1")
        await refused({"groups": [{"machines": ["db01", "web01"]}]}, 409, "db02 (not in the plan)")
        await refused({"groups": [{"machines": ["web01"], "pre_script": str(tmp_path / "none.sh")}]}, 400,
                      "none.sh does not exist")
        await refused({"groups": [{"machines": ["web01"], "pre_script": str(plain)}]}, 400, "is not executable")
        await refused({"groups": [{"machines": ["web01"], "pre_script": "rel.sh"}]}, 400, "absolute path")
        await refused({"groups": [{"machines": ["web01"], "manual_after": ""}]}, 400, "operator's instruction")
        await refused({"groups": [{"machines": ["web01"], "wait": 1}]}, 400, "group 1 field 'wait'")
        await refused({"groups": [{"machines": ["web01"]}], "retries": 2}, 400, "'retries'")
        await refused({"groups": [{"machines": ["web01"]}], "script_timeout_seconds": 0}, 400,
                      "script_timeout_seconds")

        good = {"groups": [{"machines": ["web01", "web02"], "pre_script": script, "manual_after": "check"},
                           {"machines": ["db01", "db02"]}]}
        plan = await op.call("PUT", "/plans/p1", good)
        assert plan["name"] == "p1" and plan["groups"][1]["machines"] == ["db01", "db02"]
        doc = load()
        assert check(doc, response_schema(doc, "/api/v1/plans/{plan}", "put", 200), plan) == []
        assert [p["name"] for p in (await op.call("GET", "/plans"))["plans"]] == ["p1"]
        e = await failure(op.call("PUT", "/plans/Bad.Name", good))
        assert e.status == 400 and "plan name" in e.message
        e = await failure(op.call("POST", "/plans/nope/run", {"to": str(tmp_path)}))
        assert e.status == 404 and "no recovery plan 'nope'" in e.message
        e = await failure(op.call("POST", "/plans/p1/run", {"to": str(tmp_path), "point": "p-123"}))
        assert e.status == 400 and "latest, latest-processed, latest-app" in e.message
        e = await failure(op.call("POST", "/plans/p1/run", {"to": "relative"}))
        assert e.status == 400 and "absolute directory" in e.message
        e = await failure(op.call("POST", "/jobs/j-none/resume"))
        assert e.status == 404 and "no recovery-plan job" in e.message
        async with control.client() as anon:
            token = (await anon.call("POST", "/register", {"passphrase": control.passphrase, "kind": "agent",
                                                           "name": "web01"}))["token"]
            e = await failure(anon.call("POST", "/plans/p1/run", {"to": str(tmp_path)}, token=token))
            assert e.status == 403 and "needs operator credentials" in e.message
            e = await failure(anon.call("GET", "/plans"))
            assert e.status == 401
        assert (await op.call("DELETE", "/plans/p1"))["name"] == "p1"
        e = await failure(op.call("GET", "/plans/p1"))
        assert e.status == 404


async def test_plan_runs_groups_in_order_pauses_at_the_manual_step_and_resumes(control_repo, tmp_path):
    control = control_repo
    order = tmp_path / "order"
    now = time.time()
    sources = {}
    for i, m in enumerate(("web01", "web02", "web03")):
        await put_point(control.repo, m, "sda", bytes([i + 1]) * 16384, f"p-{m}-old", 1, now - 60)
        sources[m] = await put_point(control.repo, m, "sda", bytes([i + 7]) * 8192 + b"x" * 8192, f"p-{m}-new", 2, now)
    for m, byte in (("db01", 40), ("db02", 41)):
        sources[m] = await put_point(control.repo, m, "sda", bytes([byte]) * 12288, f"p-{m}-g1", 1, now, "app",
                                     group="shop", tag="g-1", members=("db01", "db02"))
    pre1, post1 = order_script(tmp_path / "pre1.sh", order), order_script(tmp_path / "post1.sh", order)
    pre2, post2 = order_script(tmp_path / "pre2.sh", order), order_script(tmp_path / "post2.sh", order)
    plan = {"groups": [{"machines": ["web01", "web02"], "pre_script": pre1, "post_script": post1,
                        "manual_after": "start the database cluster by hand"},
                       {"machines": ["web03", "db01", "db02"], "pre_script": pre2, "post_script": post2}]}
    target = tmp_path / "drill"
    async with control.operator() as op:
        await protect(op, "web01", "web02", "web03")
        await protect(op, "db01", "db02", group="shop")
        await op.call("PUT", "/plans/shop", plan)
        job = await op.call("POST", "/plans/shop/run", {"test": True, "point": "latest-processed", "to": str(target)})
        assert job["kind"] == "test-plan"
        doc = load()
        assert check(doc, response_schema(doc, "/api/v1/plans/{plan}/run", "post", 202), job) == []
        e = await failure(op.call("POST", "/plans/shop/run", {"test": True, "to": str(target)}))
        assert e.status == 409 and job["id"] in e.message

        waiting = await wait_state(op, job["id"], ("waiting", "failed", "succeeded"))
        assert waiting["state"] == "waiting", waiting["error"]
        assert order.read_text().split("\n")[:-1] == ["pre 1", "post 1"]   # nothing of group 2 yet
        images = image_files(target)
        assert len(images) == 2 and all(f.startswith(("web01.", "web02.")) for f in images)
        for m in ("web01", "web02"):
            assert sha256_file(str(target / f"{m}.sda.test-failover-{job['id']}.img")) == sources[m]
        logged = await op.call("GET", f"/jobs/{job['id']}/log")
        assert logged["state"] == "waiting" and logged["waiting_for"] == "start the database cluster by hand"
        assert check(doc, response_schema(doc, "/api/v1/jobs/{job_id}/log", "get", 200), logged) == []
        assert "waiting for manual action" in logged["lines"][-1]["line"]
        assert logged["lines"][0]["time"].endswith("Z")

        resumed = await op.call("POST", f"/jobs/{job['id']}/resume")
        assert resumed["state"] in ("running", "succeeded")
        e = await failure(op.call("POST", f"/jobs/{job['id']}/cancel"))
        assert e.status == 409
        done = await wait_state(op, job["id"], ("succeeded", "failed", "waiting"))
        assert done["state"] == "succeeded", done["error"]
        assert order.read_text().split("\n")[:-1] == ["pre 1", "post 1", "pre 2", "post 2"]
        for m in sources:
            assert sha256_file(str(target / f"{m}.sda.test-failover-{job['id']}.img")) == sources[m], m
        points = {f["machine"]: f["point_id"] for f in done["result"]["failovers"]}
        assert points == {"web01": "p-web01-new", "web02": "p-web02-new", "web03": "p-web03-new",
                          "db01": "p-db01-g1", "db02": "p-db02-g1"}

        lines = await log_lines(op, job["id"])

        def at(text: str) -> int:
            return next(i for i, line in enumerate(lines) if text in line)

        assert (at("group 1 pre script") < at("group 1 started") < at("machine web01 failed over")
                < at("group 1 done") < at("group 1 post script") < at("waiting for manual action")
                < at("resumed by operator:admin") < at("group 2 pre script") < at("group 2 started")
                < at("consistency group shop: one group point g-1") < at("machine db02 failed over")
                < at("group 2 done") < at("group 2 post script") < at("plan shop finished"))
        assert "group 1 pre script: hello from pre 1" in lines
        # A test run's targets are removed by the control plane's cleanup.
        cleaned = await op.call("POST", "/machines/web01/failover/cleanup", {})
        await wait_state(op, cleaned["id"], ("succeeded", "failed"))
        assert not (target / f"web01.sda.test-failover-{job['id']}.img").exists()


async def test_failing_script_fails_the_plan_naming_the_script(control_repo, tmp_path):
    control = control_repo
    await put_point(control.repo, "web01", "sda", b"a" * 8192, "p-1", 1, time.time())
    bad = order_script(tmp_path / "bad.sh", tmp_path / "order", "echo 'database not reachable' >&2\nexit 3")
    async with control.operator() as op:
        await protect(op, "web01")
        await op.call("PUT", "/plans/p", {"groups": [{"machines": ["web01"], "pre_script": bad}]})
        job = await op.call("POST", "/plans/p/run", {"test": True, "point": "latest", "to": str(tmp_path / "t")})
        failed = await wait_state(op, job["id"], ("failed", "succeeded"))
        assert failed["state"] == "failed"
        assert f"script {bad} exited with status 3" in failed["error"] and "group 1 pre script" in failed["error"]
        assert "group 1 pre script: database not reachable" in await log_lines(op, job["id"])
        assert image_files(tmp_path / "t") == []   # the group's failover never started
        e = await failure(op.call("POST", "/plans/p/run", {"point": "latest-app", "to": str(tmp_path / "t")}))
        assert e.status == 409 and "no app-consistent point" in e.message


async def test_waiting_plan_survives_a_restart_then_is_cancelled(control_repo, tmp_path):
    control = control_repo
    src = await put_point(control.repo, "web01", "sda", b"b" * 8192, "p-1", 1, time.time())
    async with control.operator() as op:
        await protect(op, "web01")
        await op.call("PUT", "/plans/p", {"groups": [{"machines": ["web01"], "manual_before": "stop the app",
                                                      "manual_after": "check it"}]})
        job = await op.call("POST", "/plans/p/run", {"test": True, "point": "latest", "to": str(tmp_path / "t")})
        assert (await wait_state(op, job["id"], ("waiting", "failed")))["state"] == "waiting"
    server = control.role.server
    await control.stop()
    await control.start(server=server)
    async with control.operator() as op:
        job2 = await op.call("GET", f"/jobs/{job['id']}")
        assert job2["state"] == "waiting" and image_files(tmp_path / "t") == []
        await op.call("POST", f"/jobs/{job['id']}/resume")
        second = await wait_state(op, job["id"], ("waiting", "failed", "succeeded"))
        assert second["state"] == "waiting", second["error"]
        assert sha256_file(str(tmp_path / "t" / f"web01.sda.test-failover-{job['id']}.img")) == src
        await op.call("POST", f"/jobs/{job['id']}/resume")      # past the last step: the job ends
        done = await wait_state(op, job["id"], ("waiting", "failed", "succeeded"))
        assert done["state"] == "succeeded", done["error"]
        assert [f["machine"] for f in done["result"]["failovers"]] == ["web01"]

        # Another run, cancelled at its first manual step: nothing failed over.
        job = await op.call("POST", "/plans/p/run", {"test": True, "point": "latest", "to": str(tmp_path / "u")})
        assert (await wait_state(op, job["id"], ("waiting", "failed")))["state"] == "waiting"
        cancelled = await op.call("POST", f"/jobs/{job['id']}/cancel")
        assert cancelled["state"] == "cancelled" and "cancelled by operator:admin" in cancelled["error"]
        e = await failure(op.call("POST", f"/jobs/{job['id']}/resume"))
        assert e.status == 409 and "cancelled, not waiting" in e.message
        e = await failure(op.call("POST", f"/jobs/{job['id']}/cancel"))
        assert e.status == 409 and "it has ended" in e.message
        assert (await log_lines(op, job["id"]))[-1] == "cancelled by operator:admin"
        assert image_files(tmp_path / "u") == []


async def test_real_run_fails_over_and_commits_when_the_plan_says_so(control_repo, tmp_path):
    control = control_repo
    now = time.time()
    await put_point(control.repo, "web01", "sda", b"d" * 8192, "p-1", 1, now - 30)
    src = await put_point(control.repo, "web01", "sda", b"e" * 8192, "p-2", 2, now)
    async with control.operator() as op:
        await protect(op, "web01")
        await op.call("PUT", "/plans/p", {"groups": [{"machines": ["web01"]}], "commit": True})
        job = await op.call("POST", "/plans/p/run", {"point": "latest-processed", "to": str(tmp_path / "r")})
        assert job["kind"] == "plan"
        done = await wait_state(op, job["id"], ("failed", "succeeded"))
        assert sha256_file(str(tmp_path / "r" / "web01.sda.img")) == src
        assert (await op.call("GET", "/machines/web01"))["state"] == "failed-over"
        assert done["state"] == "succeeded", done
        assert done["result"]["committed"][0]["kept_points"] == ["p-2"]
        assert [p.point_id for p in await control.repo.list_points()] == ["p-2"]
        # The images exist now: a second real run refuses to overwrite them, naming the file.
        again = await op.call("POST", "/plans/p/run", {"point": "latest-processed", "to": str(tmp_path / "r")})
        failed = await wait_state(op, again["id"], ("failed", "succeeded"))
        assert failed["state"] == "failed" and "web01.sda.img exists" in failed["error"]
        assert "--overwrite" in failed["error"]


async def test_a_step_running_at_a_restart_is_failed_with_the_reason(control_repo, tmp_path):
    control = control_repo
    await put_point(control.repo, "web01", "sda", b"c" * 8192, "p-1", 1, time.time())
    started = tmp_path / "started"
    slow = order_script(tmp_path / "slow.sh", started, "exec sleep 600")
    async with control.operator() as op:
        await protect(op, "web01")
        await op.call("PUT", "/plans/p", {"groups": [{"machines": ["web01"], "pre_script": slow}]})
        job = await op.call("POST", "/plans/p/run", {"test": True, "point": "latest", "to": str(tmp_path / "t")})
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while not started.exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(POLL_SECONDS)
    server = control.role.server
    await control.stop()                          # a clean stop cancels the step
    db = sqlite3.connect(tmp_path / "control" / "control.sqlite3")
    error = db.execute("SELECT error FROM jobs WHERE id = ?", (job["id"],)).fetchone()[0]
    assert error.startswith("process server restarted while step group 1 pre script"), error
    # A crash leaves the step marked running: the next start fails it with the same reason.
    with db:
        db.execute("UPDATE jobs SET state = 'running', error = NULL, finished = NULL WHERE id = ?", (job["id"],))
        db.execute("UPDATE plan_runs SET step_running = 1 WHERE job_id = ?", (job["id"],))
    db.close()
    await control.start(server=server)
    async with control.operator() as op:
        job2 = await op.call("GET", f"/jobs/{job['id']}")
        assert job2["state"] == "failed" and job2["error"].startswith("process server restarted while step group 1")
        assert image_files(tmp_path / "t") == []
        lines = await log_lines(op, job["id"])
        assert lines[-1].startswith("step group 1 pre script") and "process server restarted" in lines[-1]


async def test_migration_0050_keeps_jobs_and_failovers(tmp_path):
    old = Store(str(tmp_path), [m for m in bundled_migrations() if m.version < 50])
    await old.open()

    def seed(conn):
        conn.execute("INSERT INTO jobs (id, kind, machine, state, principal, params, created) VALUES "
                     "('j-1', 'failover', 'web01', 'succeeded', 'operator:admin', '{}', 1.0)")
        conn.execute("INSERT INTO failovers VALUES ('web01', 'j-1', 1, 'p-1', '{}', 'active', 1.0)")

    await old.call(seed)
    await old.close()
    new = Store(str(tmp_path))
    await new.open()
    rows = await new.call(lambda c: [tuple(r) for r in c.execute(
        "SELECT j.id, j.state, f.point_id FROM jobs j JOIN failovers f ON f.job_id = j.id")])
    assert rows == [("j-1", "succeeded", "p-1")]
    await new.call(lambda c: c.execute("UPDATE jobs SET state = 'waiting' WHERE id = 'j-1'"))
    assert await new.call(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) == []
    await new.close()


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie waits for its reaper: it is dead
    except FileNotFoundError:
        return True


async def test_script_output_is_capped_and_a_slow_script_is_killed_with_its_children(control_repo, tmp_path):
    control = control_repo
    await put_point(control.repo, "web01", "sda", b"f" * 8192, "p-1", 1, time.time())
    chatty = order_script(tmp_path / "chatty.sh", tmp_path / "order", "head -c 100000 /dev/zero | tr '\\0' 'y'")
    pidfile = tmp_path / "child.pid"
    slow = order_script(tmp_path / "slow.sh", tmp_path / "order", f"sleep 600 &\necho $! > {pidfile}\nwait")
    async with control.operator() as op:
        await protect(op, "web01")
        await op.call("PUT", "/plans/chatty", {"groups": [{"machines": ["web01"], "pre_script": chatty}]})
        job = await op.call("POST", "/plans/chatty/run", {"test": True, "point": "latest", "to": str(tmp_path / "t")})
        assert (await wait_state(op, job["id"], ("failed", "succeeded")))["state"] == "succeeded"
        lines = await log_lines(op, job["id"])
        out = [line[len("group 1 pre script: "):] for line in lines if line.startswith("group 1 pre script: ")]
        assert out[0] == "hello from pre 1"
        assert out[-1] == f"[{100000 + len('hello from pre 1') + 1 - 65536} more bytes of output not logged]"
        # The kept 64 KiB hold one long line: the log keeps its first 2000 characters (prefix included).
        assert out[1:-1] == ["y" * (2000 - len("group 1 pre script: ")) + " [cut]"]

        # The timeout only has to outlast the script's start (it writes its child's pid first).
        await op.call("PUT", "/plans/slow", {"groups": [{"machines": ["web01"], "pre_script": slow}],
                                             "script_timeout_seconds": 3})
        job = await op.call("POST", "/plans/slow/run", {"test": True, "point": "latest", "to": str(tmp_path / "u")})
        failed = await wait_state(op, job["id"], ("failed", "succeeded"))
        assert failed["state"] == "failed"
        assert f"script {slow} did not finish within 3 s and was killed" in failed["error"]
        assert gone(int(pidfile.read_text()))
        assert image_files(tmp_path / "u") == []
