"""Must-show 2: a recovery plan with two groups and a manual step, through the `lifeboat` CLI only.

Agents replicate three machines through a running process server (configuration-server role on);
the plan's pre/post scripts append to one file, so the order is observed. The test run stops at the
manual step (state waiting, nothing of group 2 done), still waits after a process-server restart,
`lifeboat plan resume` finishes it, and every failed-over image's SHA-256 equals its source disk.
A real run is then cancelled at the manual step.
"""

from __future__ import annotations

import json
import os

from disk_images import make_image
from lab import sha256_file


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def script(path, order_file) -> str:
    path.write_text(f'#!/bin/sh\necho "$LIFEBOAT_STAGE $LIFEBOAT_PLAN_GROUP" >> {order_file}\n'
                    'echo "checked $LIFEBOAT_MACHINES"\n')
    path.chmod(0o755)
    return str(path)


def order_of(order_file) -> list[str]:
    return order_file.read_text().splitlines() if order_file.exists() else []


def test_plan_with_two_groups_and_a_manual_step(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps()
    sources = {}
    for i, machine in enumerate(("web01", "web02", "app01")):
        cred = tmp_path / f"{machine}.credential"
        ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", machine,
                       "--out", str(cred)))
        ok(lab.api_cli("protect", machine, "--disk", "sda"))
        disk = make_image(tmp_path / f"{machine}-sda.img", 4, seed=10 + i)
        assert lab.run_agent(machine, {"sda": str(disk)}, cycles=1, extra=lab.agent_control(str(cred))) == 0
        sources[machine] = sha256_file(disk)
    lab.wait_points(3)

    order = tmp_path / "order"
    plan = {"groups": [{"machines": ["web01", "web02"], "pre_script": script(tmp_path / "pre1.sh", order),
                        "post_script": script(tmp_path / "post1.sh", order),
                        "manual_after": "switch the load balancer to the recovered web tier"},
                       {"machines": ["app01"], "pre_script": script(tmp_path / "pre2.sh", order),
                        "post_script": script(tmp_path / "post2.sh", order)}]}
    plan_file = tmp_path / "shop.json"
    plan_file.write_text(json.dumps(plan))

    # --- bad input: a clear message and a non-zero exit --------------------------------------
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"groups": [{"machines": ["web01"]}, {"machines": ["db09", "web01"]}]}))
    bad = lab.api_cli("plan", "create", "bad", "--file", str(bad_file))
    assert bad.returncode != 0 and "machine web01 is already in group 1" in bad.stderr, bad.stderr
    unknown = lab.api_cli("plan", "run", "nope", "--test", "--to", str(tmp_path / "x"))
    assert unknown.returncode != 0 and "no recovery plan 'nope'" in unknown.stderr
    ok(lab.api_cli("plan", "create", "shop", "--file", str(plan_file)))
    assert "shop: [web01, web02] -> [app01]" in ok(lab.api_cli("plan", "list"))

    # --- test run: group 1, then it waits at the manual step ---------------------------------
    drill = tmp_path / "drill"
    run = json.loads(ok(lab.api_cli("plan", "run", "shop", "--test", "--point", "latest", "--to", str(drill))))
    job = run["job"]
    assert run["state"] == "waiting" and run["next"] == f"lifeboat plan resume {job}"
    assert order_of(order) == ["pre 1", "post 1"]
    images = sorted(os.listdir(drill))
    assert images == [f"web01.sda.test-failover-{job}.img", f"web02.sda.test-failover-{job}.img"]  # no app01
    for machine in ("web01", "web02"):
        assert sha256_file(drill / f"{machine}.sda.test-failover-{job}.img") == sources[machine]
    log = ok(lab.api_cli("plan", "log", job))
    assert log.splitlines()[0] == (f"job {job} (plan shop): waiting, waiting for: switch the load balancer to the "
                                   f"recovered web tier ('lifeboat plan resume {job}')")
    assert "group 1 pre script: checked web01 web02" in log and "machine web02 failed over to point" in log

    # --- the process server restarts: the plan still waits -----------------------------------
    assert lab.stop_ps() == 0
    lab.start_ps()
    assert ok(lab.api_cli("plan", "log", job)).splitlines()[0].startswith(f"job {job} (plan shop): waiting")
    assert order_of(order) == ["pre 1", "post 1"]

    # --- resume: group 2 runs, the job succeeds ----------------------------------------------
    done = json.loads(ok(lab.api_cli("plan", "resume", job)))
    assert done["state"] == "succeeded"
    assert order_of(order) == ["pre 1", "post 1", "pre 2", "post 2"]
    assert {f["machine"] for f in done["failovers"]} == {"web01", "web02", "app01"}
    for machine, digest in sources.items():
        assert sha256_file(drill / f"{machine}.sda.test-failover-{job}.img") == digest, machine
    lines = ok(lab.api_cli("plan", "log", job)).splitlines()

    def at(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert (at("group 1 started") < at("machine web01 failed over") < at("group 1 done")
            < at("waiting for manual action") < at("resumed by operator:admin") < at("group 2 started")
            < at("machine app01 failed over") < at("plan shop finished"))
    again = lab.api_cli("plan", "resume", job)
    assert again.returncode != 0 and "succeeded, not waiting" in again.stderr
    # The drill's images go with the control plane's cleanup.
    for machine in sources:
        ok(lab.api_cli("failover", "cleanup", machine))
    assert os.listdir(drill) == []

    # --- a real run, cancelled at the manual step --------------------------------------------
    order.unlink()
    real = tmp_path / "recovered"
    run = json.loads(ok(lab.api_cli("plan", "run", "shop", "--point", "latest-processed", "--to", str(real))))
    assert run["state"] == "waiting" and run["test"] is False
    assert sorted(os.listdir(real)) == ["web01.sda.img", "web02.sda.img"]
    assert sha256_file(real / "web01.sda.img") == sources["web01"]
    cancelled = json.loads(ok(lab.api_cli("plan", "cancel", run["job"])))
    assert cancelled["state"] == "cancelled" and "cancelled by operator:admin" in cancelled["error"]
    assert order_of(order) == ["pre 1", "post 1"]
    status = {r["machine"]: r["protection"] for r in json.loads(ok(lab.api_cli("status", "--json")))}
    assert status == {"web01": "failed-over", "web02": "failed-over", "app01": "protected"}
