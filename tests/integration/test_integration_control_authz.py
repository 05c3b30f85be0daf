"""Authorisation at the ingest and the management API: per-machine agent credentials, refusals logged and counted."""

from __future__ import annotations

import json

from disk_images import make_image
from lab import sha256_file
from test_integration_ingest import Client, batch, rejections


def register(lab, machine: str, tmp_path) -> tuple[str, str]:
    out = tmp_path / f"{machine}.credential"
    reply = json.loads(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"],
                                   "--machine", machine, "--out", str(out), check=True).stdout)
    return str(out), reply["credential_id"]


def token(path: str) -> str:
    with open(path) as f:
        return f.readline().strip()


def test_ingest_takes_only_the_machines_own_credential(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps({"ingest": {"accept_shared_token": False}})
    web01, web01_id = register(lab, "web01", tmp_path)
    web02, _ = register(lab, "web02", tmp_path)
    c = Client(lab)
    payload = b"\x5a" * 65536

    # The machine's own credential: stored.
    status, _, body = c.put(1, batch(1, payload, disk="web01.sda"), disk="web01.sda", token=token(web01))
    assert (status, body["status"]) == (200, "stored")

    # No credential, the (disabled) shared token, a foreign token: 401, nothing stored.
    for presented in (None, c.token, "lbt_" + "A" * 43):
        status, headers, body = c.put(2, batch(2, payload, disk="web01.sda"), disk="web01.sda", token=presented)
        assert status == 401 and body["error"] == "unauthenticated" and headers.get("WWW-Authenticate") == "Bearer"

    # Agent web02 acting on machine web01's disk: 403, naming both machines; same for a query.
    status, _, body = c.put(2, batch(2, payload, disk="web01.sda"), disk="web01.sda", token=token(web02))
    assert status == 403 and body["error"] == "forbidden"
    assert "agent web02 may not" in body["message"] and "machine web01" in body["message"]
    status, _, body = c.request("GET", "/api/v1/disks/web01.sda", token=token(web02))
    assert status == 403 and body["error"] == "forbidden"

    # Revoked: refused from the next call on (the primary checks its own store, no cache).
    lab.api_cli("credentials", "revoke", web01_id, "--reason", "stolen laptop", check=True)
    status, _, body = c.put(2, batch(2, payload, disk="web01.sda"), disk="web01.sda", token=token(web01))
    assert status == 401 and "was revoked" in body["message"]

    # The rebuilt machine registers again; acknowledged data is untouched: web01.sda is still at sequence 1.
    (tmp_path / "web01.credential").unlink()
    web01_again, _ = register(lab, "web01", tmp_path)
    status, _, body = c.request("GET", "/api/v1/disks/web01.sda", token=token(web01_again))
    assert (status, body["acked_seq"]) == (200, 1)
    counted = rejections(lab)
    assert counted["unauthenticated"] >= 4 and counted["forbidden"] >= 2
    m = lab.ps_metrics()
    assert m['lifeboat_control_refusals_total{reason="revoked"}'] >= 1
    assert m['lifeboat_control_refusals_total{reason="unknown_credential"}'] >= 1
    log = lab.log_path.read_text()
    assert "reason='forbidden'" in log and "credential revoked" in log and "stolen laptop" in log
    assert token(web01) not in log and token(web02) not in log   # never a secret in the log
    assert "ingest credential refused" in log and "reason='revoked'" in log


def test_management_api_refuses_agent_a_acting_on_machine_b(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps()
    web01, _ = register(lab, "web01", tmp_path)
    # An agent credential may not list credentials, nor revoke them (operator calls).
    denied = lab.api_cli("credentials", "list", credential=web01)
    assert denied.returncode == 4 and "agent:web01 may not GET /api/v1/credentials" in denied.stderr
    none = lab.api_cli("credentials", "list", credential=str(tmp_path / "missing.credential"))
    assert none.returncode != 0 and "cannot read the credential file" in none.stderr
    assert "'forbidden'" in lab.log_path.read_text()


def test_real_agent_replicates_with_its_own_credential(control_lab, tmp_path):
    lab = control_lab
    lab.start_ps({"ingest": {"accept_shared_token": False}})
    cred, _ = register(lab, "web01", tmp_path)
    disk = make_image(tmp_path / "web01-sda.img", 8)
    source_sha = sha256_file(disk)
    rc = lab.run_agent("web01", {"sda": str(disk)}, cycles=1, extra={"process_server": {
        "url": f"https://127.0.0.1:{lab.ps_port}", "ca_cert": lab.init["ca_cert"], "token_file": cred,
        "retry_max_seconds": 1.0}}, timeout=120)
    assert rc == 0
    lab.wait_points(1)
    out = tmp_path / "recovered.img"
    res = lab.failover("latest", out, "--machine", "web01")
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == source_sha
