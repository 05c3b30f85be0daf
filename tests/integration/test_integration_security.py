"""Security properties against real daemons: no plaintext in the repository, TLS refuses a wrong CA and plain
HTTP, credentials and points stay with their deployment and machine, replays are no-ops, key rotation re-wraps
without touching data, and /metrics holds no secret. THREAT_MODEL.md points at each test."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import time
from pathlib import Path

import pytest

from disk_images import make_image
from lab import Lab, bin_path, free_port, sha256_file
from lifeboat.core import tls
from lifeboat.core.wire import BatchBuilder
from markers import objects_with_markers, plant_markers
from test_integration_ingest import DISK, DISK_SIZE, Client

BLOCK = 65536


def repo_dir(lab: Lab) -> Path:
    return Path(lab.init["repository"].removeprefix("local:"))


def stored_objects(lab: Lab) -> dict[str, bytes]:
    root = repo_dir(lab)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def object_stats(lab: Lab, skip_keys: bool = False) -> dict[str, tuple[str, int, int]]:
    """{object: (sha256, size, mtime_ns)} of every stored object (key objects left out if asked)."""
    root = repo_dir(lab)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not (skip_keys and rel.startswith("keys/")):
            st = p.stat()
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def point_batch(seq: int, offset: int, payload: bytes, point_id: str, machine: str = "web01") -> bytes:
    b = BatchBuilder(DISK, seq, DISK_SIZE)
    b.write(offset, payload)
    b.bookmark({"point_id": point_id, "machine": machine, "created": time.time(), "consistency": "none",
                "cycle": seq, "block_size": BLOCK, "image_digest": ""})
    return b.to_bytes()


# --- confidentiality of the repository ---------------------------------------------------------------------

def test_local_repository_holds_no_plaintext_of_what_was_written(lab, tmp_path):
    """Every stored object (segments, catalog, config, keys) is searched for unique markers the disk holds; the
    Azure variant is test_integration_azure.py::test_replication_to_azure_recovers_each_point_and_verifies."""
    disk = make_image(tmp_path / "sda.img", 8, seed=41)
    markers = plant_markers(disk)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    [point] = lab.wait_points(1)
    out = tmp_path / "out.img"
    res = lab.failover(point["point_id"], out)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == sha256_file(disk)
    # The markers went through the repository (the recovered image holds every one) ...
    assert len(objects_with_markers({"recovered": out.read_bytes()}, markers)) == len(markers)
    objects = stored_objects(lab)
    assert any(n.startswith("disks/web01.sda/log/") for n in objects) and "config" in objects, sorted(objects)
    # ... and no stored object holds one, nor the key file's key.
    assert objects_with_markers(objects, markers) == []
    kek = base64.b64decode(Path(lab.init["key_file"]).read_text().split()[2])
    assert not [n for n, data in objects.items() if kek in data or base64.b64encode(kek) in data]


# --- transport ---------------------------------------------------------------------------------------------

def test_a_client_trusting_another_ca_and_plain_http_are_refused(lab, tmp_path):
    lab.start_ps()
    other_ca, _ = tls.create_ca(str(tmp_path / "other-ca"), "Someone else's CA")
    for what, ctx in (("another deployment's CA", ssl.create_default_context(cafile=other_ca)),
                      ("the system trust store", ssl.create_default_context())):
        conn = http.client.HTTPSConnection("127.0.0.1", lab.ps_port, context=ctx, timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", f"/api/v1/disks/{DISK}")
        conn.close()
    # Plain HTTP to the TLS port: the handshake fails and the connection is closed, no HTTP answer.
    token = Path(lab.init["agent_token"]).read_text().strip()
    plain = http.client.HTTPConnection("127.0.0.1", lab.ps_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", f"/api/v1/disks/{DISK}", headers={"Authorization": f"Bearer {token}"})
        plain.getresponse()
    plain.close()
    # The daemon is unharmed and serves a client with the right CA.
    assert lab.ps_proc.poll() is None
    status, _, body = Client(lab).request("GET", f"/api/v1/disks/{DISK}")
    assert status == 200 and body["acked_seq"] == 0


# --- credentials and machine boundaries ---------------------------------------------------------------------

def test_another_deployments_token_and_a_point_for_another_machine_are_refused(lab, tmp_path):
    other = Lab(tmp_path / "other")  # a second deployment: its own CA, token and repository
    try:
        lab.start_ps()
        c = Client(lab)
        foreign = Path(other.init["agent_token"]).read_text().strip()
        status, _, body = c.put(1, point_batch(1, 0, os.urandom(4096), "web01-1"), token=foreign)
        assert (status, body["error"]) == (401, "unauthenticated")
        # The shared agent token is valid, but a bookmark in web01.sda's stream naming machine db01 would put
        # web01's disk into db01's failover: refused before anything is stored.
        status, _, body = c.put(1, point_batch(1, 0, os.urandom(4096), "db01-1", machine="db01"))
        assert (status, body["error"]) == (400, "malformed") and "belongs to machine 'web01'" in body["message"]
        # Disk ids of the wrong shape never reach the cache or the repository.
        for bad in ("WEB01.sda", "web01..sda%2f..", "-web01.sda", "a" * 65):
            assert c.put(1, point_batch(1, 0, os.urandom(4096), "web01-1"), disk=bad)[0] in (400, 404), bad
        assert c.request("GET", f"/api/v1/disks/{DISK}")[2]["acked_seq"] == 0
        assert lab.points() == [] and not [n for n in stored_objects(lab) if n.startswith(("disks/", "points/"))]
    finally:
        other.close()


# One machine's credential against another machine's disk, points and API calls: per-machine credentials
# of the configuration server, tested in test_integration_control_authz.py (ingest 403, API 403, logged).


# --- replay -------------------------------------------------------------------------------------------------

def test_a_replayed_batch_is_a_no_op_and_a_changed_replay_is_refused(lab, tmp_path):
    lab.start_ps()
    c = Client(lab)
    p1, p2, p3 = (os.urandom(32 * 1024) for _ in range(3))
    b1, b2 = point_batch(1, 0, p1, "web01-p1"), point_batch(2, 64 * 1024, p2, "web01-p2")
    assert c.put(1, b1)[2]["status"] == "stored" and c.put(2, b2)[2]["status"] == "stored"
    lab.wait_points(2)
    before, points_before = object_stats(lab), lab.points()

    for seq, body in ((2, b2), (1, b1)):  # the exact bytes again: acknowledged, not applied again
        status, _, reply = c.put(seq, body)
        assert (status, reply["status"], reply["acked_seq"]) == (200, "duplicate", 2)
    for seq, body in ((1, point_batch(1, 0, p3, "web01-p1")), (2, point_batch(2, 0, p3, "web01-evil"))):
        status, _, reply = c.put(seq, body)  # an old seq with other content: refused
        assert (status, reply["error"]) == (409, "replay_mismatch"), reply

    # Barrier: uploads run in order per disk, so once batch 3's point is listed, anything a replay had
    # queued would be in the repository too.
    assert c.put(3, point_batch(3, 128 * 1024, p3, "web01-p3"))[2]["status"] == "stored"
    points = lab.wait_points(3)
    after = object_stats(lab)
    assert {k: v for k, v in after.items() if k in before} == before, "a replay changed stored objects"
    assert sorted(set(after) - set(before)) == ["disks/web01.sda/log/00000000000000000003",
                                                "points/web01.sda/web01-p3"]
    assert points[:2] == points_before and [p["point_id"] for p in points] == ["web01-p1", "web01-p2", "web01-p3"]

    expected = bytearray(DISK_SIZE)
    for offset, data in ((0, p1), (64 * 1024, p2), (128 * 1024, p3)):
        expected[offset: offset + len(data)] = data
    (tmp_path / "expected.img").write_bytes(expected)
    res = lab.failover("web01-p3", tmp_path / "out.img")
    assert res.returncode == 0, res.stderr
    assert sha256_file(tmp_path / "out.img") == sha256_file(tmp_path / "expected.img")
    counts = lab.ps_metrics()
    assert counts['lifeboat_ps_rejections_total{reason="replay_mismatch"}'] == 2


# --- secrets in metrics -------------------------------------------------------------------------------------

def test_metrics_and_health_pages_hold_no_secret(lab, tmp_path):
    """Logs are searched by test_integration_log_secrets.py; this searches every daemon's /metrics and /healthz."""
    disk = make_image(tmp_path / "sda.img", 4, seed=43)
    lab.start_ps()
    agent_port = free_port()
    agent = lab.start_agent("web01", {"sda": disk}, extra={"metrics": {"host": "127.0.0.1", "port": agent_port}})
    try:
        lab.wait_points(1)
        pages = {}
        for name, port in (("process server", lab.ps_metrics_port), ("agent", agent_port)):
            for page in ("metrics", "healthz"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", f"/{page}")
                pages[f"{name} /{page}"] = conn.getresponse().read().decode()
                conn.close()
    finally:
        agent.terminate()
        agent.wait(60)
    assert "lifeboat_ps_batches_total" in pages["process server /metrics"]
    token = Path(lab.init["agent_token"]).read_text().strip()
    b64 = Path(lab.init["key_file"]).read_text().split()[2]
    secrets = {"agent token": token, "key file key": b64, "key file key (hex)": base64.b64decode(b64).hex()}
    leaks = [f"{what} in {page}" for page, text in pages.items() for what, value in secrets.items() if value in text]
    assert not leaks, leaks


# --- key rotation -------------------------------------------------------------------------------------------

def lifeboat(*args: str) -> "subprocess.CompletedProcess":
    import subprocess
    return subprocess.run([bin_path("lifeboat"), *args], capture_output=True, text=True, timeout=300)


def test_key_rotate_rewraps_the_master_key_without_touching_data(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 8, seed=47)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    [point] = lab.wait_points(1)
    lab.stop_ps()  # nothing else writes to the repository from here on
    repo = ["--repo", lab.init["repository"]]
    old_key, new_key = lab.init["key_file"], str(tmp_path / "new.key")
    data_before, keys_before = object_stats(lab, skip_keys=True), sorted(
        k for k in object_stats(lab) if k.startswith("keys/"))
    assert len(keys_before) == 1

    res = lifeboat("key", "rotate", *repo, "--key-file", old_key, "--new-key-file", new_key)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["removed"] == keys_before and result["added"] not in keys_before
    assert os.stat(new_key).st_mode & 0o777 == 0o600
    # Only the key objects changed: every data object has its old bytes and modification time.
    assert object_stats(lab, skip_keys=True) == data_before
    assert sorted(k for k in object_stats(lab) if k.startswith("keys/")) == [result["added"]]

    # The old key file opens nothing any more; the new one lists the key and fails over bit-exact.
    res = lifeboat("points", *repo, "--key-file", old_key)
    assert res.returncode == 77 and "none of the 1 key objects" in res.stderr, res.stderr
    listing = json.loads(lifeboat("key", "list", *repo, "--key-file", new_key, "--json").stdout)
    assert listing == [{"id": result["added"].removeprefix("keys/"), "kdf": "keyfile", "current": True}]
    out = tmp_path / "out.img"
    res = lifeboat("failover", "--test", "--point", point["point_id"], "--to", str(out), "-q", *repo,
                   "--key-file", new_key)
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == sha256_file(disk)

    # Rotate again, from the key file to a passphrase, removing every other key object.
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a long enough passphrase\n")
    res = lifeboat("key", "rotate", *repo, "--key-file", new_key, "--new-passphrase-file", str(passphrase),
                   "--remove-all-others")
    assert res.returncode == 0, res.stderr
    assert object_stats(lab, skip_keys=True) == data_before
    assert lifeboat("verify", *repo, "--key-file", new_key).returncode == 77
    res = lifeboat("verify", *repo, "--passphrase-file", str(passphrase))
    assert res.returncode == 0, res.stdout + res.stderr
    # A process server with the new passphrase continues the same repository.
    lab.init["key_file"] = ""
    lab.start_ps({"repository": {"url": lab.init["repository"], "key_file": "",
                                 "passphrase_file": str(passphrase)}})
    assert Client(lab).request("GET", "/api/v1/disks/web01.sda")[2]["uploaded_seq"] >= 1


def test_key_rotate_refuses_an_existing_new_key_file_and_keeps_the_old_key(lab, tmp_path):
    existing = tmp_path / "existing.key"
    existing.write_text("something else\n")
    res = lifeboat("key", "rotate", "--repo", lab.init["repository"], "--key-file", lab.init["key_file"],
                   "--new-key-file", str(existing))
    assert res.returncode == 78 and "exists" in res.stderr, res.stderr
    assert existing.read_text() == "something else\n"
    assert lifeboat("points", "--repo", lab.init["repository"], "--key-file", lab.init["key_file"]).returncode == 0
