"""Must-show 1: the whole control plane through the `lifeboat` CLI against running daemons.

init → register two agents and a second process server → protect → replicate (the agents heartbeat,
web02 through the scale-out) → status → test failover + cleanup → failover to latest-app → commit.
Every recovered image is compared (SHA-256) with the source disk as it was at that point.
"""

from __future__ import annotations

import json
import os
import stat

from disk_images import make_image, scribble
from lab import free_port, sha256_file


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def register_agent(lab, machine: str, tmp_path) -> str:
    out = tmp_path / f"{machine}.credential"
    ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", machine,
                   "--out", str(out)))
    return str(out)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_everything_through_the_cli(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps({"ingest": {"accept_shared_token": False}})

    # --- registration: two agents and a scale-out process server ---------------------------------
    web01, web02 = register_agent(lab, "web01", tmp_path), register_agent(lab, "web02", tmp_path)
    ps2_port = free_port()
    ps2_cred = tmp_path / "ps2.credential"
    reg = json.loads(ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"],
                                    "--process-server", "ps2", "--url", f"https://127.0.0.1:{ps2_port}",
                                    "--out", str(ps2_cred))))
    assert reg["principal"] == "process-server:ps2" and stat.S_IMODE(os.stat(ps2_cred).st_mode) == 0o600
    lab.start_scale_out("ps2", str(ps2_cred), ps2_port)
    servers = {s["name"]: s for s in json.loads(ok(lab.api_cli("process-servers")))}
    assert servers["ps2"]["url"] == f"https://127.0.0.1:{ps2_port}" and servers["primary"]["primary"]

    # --- policy and protection ----------------------------------------------------------------------
    ok(lab.api_cli("policy", "set", "fast", "--crash-interval-seconds", "0.5", "--app-interval-seconds", "0",
                   "--retention-days", "15", "--rpo-threshold-seconds", "3600"))
    ok(lab.api_cli("protect", "web01", "--disk", "sda", "--policy", "fast"))
    ok(lab.api_cli("protect", "web02", "--disk", "sda", "--policy", "fast", "--process-server", "ps2"))
    bad = lab.api_cli("protect", "web03", "--disk", "sda", "--policy", "nope")
    assert bad.returncode != 0 and "no replication policy 'nope'" in bad.stderr

    # --- replication: web01 app point (state A), then a crash point (state B); web02 via ps2 ------
    disk1 = make_image(tmp_path / "web01-sda.img", 8, seed=1)
    disk2 = make_image(tmp_path / "web02-sda.img", 8, seed=2)
    script = tmp_path / "flush.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    app = {"consistency": {"pre_script": str(script), "post_script": str(script)}}
    assert lab.run_agent("web01", {"sda": str(disk1)}, cycles=1, extra={**lab.agent_control(web01), **app}) == 0
    state_a = sha256_file(disk1)
    scribble(disk1, 20, seed=5)
    assert lab.run_agent("web01", {"sda": str(disk1)}, cycles=1, extra=lab.agent_control(web01)) == 0
    state_b = sha256_file(disk1)
    assert lab.run_agent("web02", {"sda": str(disk2)}, cycles=1, extra=lab.agent_control(web02, ps2_port)) == 0
    # web02 loses its agent state: the next run resyncs by digest, and status says why.
    (lab.work / "agent-web02" / "web02.sda.digests").unlink()
    assert lab.run_agent("web02", {"sda": str(disk2)}, cycles=1, extra=lab.agent_control(web02, ps2_port)) == 0
    web02_state = sha256_file(disk2)
    lab.wait_points(4)

    # --- status ----------------------------------------------------------------------------------
    rows = {r["machine"]: r for r in json.loads(ok(lab.api_cli("status", "--json")))}
    w1, w2 = rows["web01"], rows["web02"]
    assert w1["last_app_point"] is not None and w1["latest_point"] != w1["last_app_point"]["point_id"]
    assert w1["health"] == "healthy", w1["health_reasons"]
    assert w1["tracking_tier"] == "data" and w1["process_server"] == "primary" and w1["rpo_seconds"] >= 0
    assert w1["last_resync"] is None            # initial copy, then deltas: no resync
    assert w2["process_server"] == "ps2" and w2["latest_point"] and w2["health"] == "healthy"
    assert w2["last_resync"]["reason"] == "no_local_state" and w2["last_resync"]["disk"] == "web02.sda"
    table = ok(lab.api_cli("status"))
    assert "web01" in table and "web02" in table and "HEALTH" in table

    # --- test failover of web01 at the latest point, then cleanup --------------------------------
    drill = tmp_path / "drill"
    lines = json_lines(ok(lab.api_cli("failover", "--test", "web01", "--point", "latest", "--to", str(drill))))
    [disk] = lines
    assert disk["test"] is True and disk["point_id"] == w1["latest_point"] and ".test-failover-" in disk["path"]
    assert sha256_file(disk["path"]) == state_b
    member = lab.api_cli("failover", "--test", "web02", "--point", "no-such-point", "--to", str(drill))
    assert member.returncode != 0 and "no complete point 'no-such-point'" in member.stderr
    cleaned = json.loads(ok(lab.api_cli("failover", "cleanup", "web01")))
    assert cleaned["removed"] == [disk["path"]] and not os.path.exists(disk["path"])
    again = lab.api_cli("failover", "cleanup", "web01")
    assert again.returncode != 0 and "no test failover" in again.stderr

    # web02 (replicated through ps2) recovers too.
    [w2disk] = json_lines(ok(lab.api_cli("failover", "--test", "web02", "--point", "latest-processed",
                                         "--to", str(drill))))
    assert sha256_file(w2disk["path"]) == web02_state
    ok(lab.api_cli("failover", "cleanup", "web02"))

    # --- failover to latest-app, then commit -----------------------------------------------------
    target = tmp_path / "recovered"
    [real] = json_lines(ok(lab.api_cli("failover", "web01", "--point", "latest-app", "--to", str(target))))
    assert real["test"] is False and real["point_id"] == w1["last_app_point"]["point_id"]
    assert sha256_file(real["path"]) == state_a
    clash = lab.api_cli("failover", "web01", "--point", "latest-app", "--to", str(target))
    assert clash.returncode != 0 and "exists" in clash.stderr and "--overwrite" in clash.stderr
    commit = lab.api_cli("failover", "commit", "web01")
    assert commit.returncode == 0, commit.stderr
    result = json.loads(commit.stdout)
    assert result["point_id"] == real["point_id"]
    remaining = [p["point_id"] for p in lab.points() if p["machine"] == "web01"]
    assert remaining == [real["point_id"]]
    assert json.loads(ok(lab.api_cli("status", "web01", "--json")))[0]["protection"] == "failed-over"
    again = lab.api_cli("failover", "web01", "--point", "latest-app", "--to", str(target), "--overwrite")
    assert again.returncode == 0, again.stderr   # --overwrite replaces the images
    jobs = json.loads(ok(lab.api_cli("jobs", "web01", "--json")))
    kinds = [(j["kind"], j["state"]) for j in reversed(jobs)]
    assert kinds[:3] == [("test-failover", "succeeded"), ("cleanup", "succeeded"), ("failover", "succeeded")]
    assert kinds[3][0] == "commit" and kinds[-1] == ("failover", "succeeded")
    assert "web01" in ok(lab.api_cli("jobs"))
