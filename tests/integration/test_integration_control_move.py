"""Scale-out: a machine on a second process server moves to the primary without a resync; revocation reaches the scale-out."""

from __future__ import annotations

import json
import signal
import time

from disk_images import make_image, scribble
from lab import free_port, sha256_file
from test_integration_control_cli import ok, register_agent
from test_integration_ingest import Client, batch

POLL_TIMEOUT_SECONDS = 60.0


def wait_for(what: str, probe, timeout: float = POLL_TIMEOUT_SECONDS):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout} s")
        time.sleep(0.3)


def scale_out(lab, tmp_path, name: str = "ps2") -> int:
    port = free_port()
    cred = tmp_path / f"{name}.credential"
    ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--process-server", name,
                   "--url", f"https://127.0.0.1:{port}", "--out", str(cred)))
    lab.start_scale_out(name, str(cred), port)
    return port


def test_move_between_process_servers_continues_the_log(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps()
    ps2_port = scale_out(lab, tmp_path)
    cred = register_agent(lab, "web01", tmp_path)
    ok(lab.api_cli("policy", "set", "fast", "--crash-interval-seconds", "0.3"))
    ok(lab.api_cli("protect", "web01", "--disk", "sda", "--policy", "fast", "--process-server", "ps2"))
    disk = make_image(tmp_path / "sda.img", 8)
    agent = lab.start_agent("web01", {"sda": str(disk)}, extra=lab.agent_control(cred, ps2_port))
    wait_for("two points through ps2", lambda: len(lab.points()) >= 2)

    moved = json.loads(ok(lab.api_cli("move", "web01", "--to", "primary")))
    assert moved["move_to"] == "primary" and moved["process_server"] == "ps2"

    def status():
        return json.loads(ok(lab.api_cli("status", "web01", "--json")))[0]

    wait_for("the move", lambda: status()["process_server"] == "primary" and status()["move_to"] is None)
    before = len(lab.points())
    wait_for("points through the primary", lambda: lab.ps_metrics().get(
        'lifeboat_ps_batches_total{result="stored"}', 0) >= 1 and len(lab.points()) > before + 1)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(60) == 0

    # A new agent process (its config still names ps2) asks the control plane and goes to the primary.
    scribble(disk, 30, seed=9)
    count = len(lab.points())
    assert lab.run_agent("web01", {"sda": str(disk)}, cycles=1, extra=lab.agent_control(cred, ps2_port)) == 0
    want = sha256_file(disk)
    last = lab.wait_points(count + 1)[-1]
    out = tmp_path / "out.img"
    res = lab.failover(last["point_id"], out, "--machine", "web01")
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == want

    log = lab.log_path.read_text()
    assert "machine moved" in log and "moved to another process server" in log
    assert "policy: crash-consistent interval" in log              # the agent took the policy's interval
    assert "disk adopted from the repository log" in log          # the primary continued the log
    assert "full resync" not in log and "digest resync" not in log  # no resync at any point
    assert status()["last_resync"] is None


def test_scale_out_refuses_a_revoked_agent_after_its_cache_expires(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps()
    ps2_port = scale_out(lab, tmp_path)
    cred = register_agent(lab, "web01", tmp_path)
    with open(cred) as f:
        token = f.readline().strip()
    c = Client(lab)
    c.port = ps2_port
    payload = b"\x33" * 65536
    status, _, body = c.put(1, batch(1, payload, disk="web01.sda"), disk="web01.sda", token=token)
    assert (status, body["status"]) == (200, "stored")
    status, _, body = c.put(2, batch(2, payload, disk="web02.sda"), disk="web02.sda", token=token)
    assert status == 403 and body["error"] == "forbidden"
    listed = json.loads(ok(lab.api_cli("credentials", "list", "--json")))
    cred_id = next(x["id"] for x in listed if x["name"] == "web01")
    ok(lab.api_cli("credentials", "revoke", cred_id))
    # The scale-out reuses the primary's answer for auth_cache_seconds (1 s here), then asks again.
    refused = wait_for("refusal at ps2", lambda: c.put(2, batch(2, payload, disk="web01.sda"), disk="web01.sda",
                                                           token=token)[0] == 401)
    assert refused
    status, _, body = c.put(2, batch(2, payload, disk="web01.sda"), disk="web01.sda", token=token)
    assert status == 401 and "was revoked" in body["message"]
