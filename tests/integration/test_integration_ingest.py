"""Bad input against a real process server: clear 4xx/503 with a reason, counted, server up, acked data intact."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time

import pytest

from disk_images import make_image
from lab import sha256_file
from lifeboat.core.wire import BatchBuilder

DISK = "web01.sda"
DISK_SIZE = 1 << 20
MAX_BATCH = 256 * 1024


class Client:
    """A deliberately low-level HTTPS client, so tests can send what a real agent never would."""

    def __init__(self, lab) -> None:
        self.ctx = ssl.create_default_context(cafile=lab.init["ca_cert"])
        self.port = lab.ps_port
        with open(lab.init["agent_token"]) as f:
            self.token = f.read().strip()

    def request(self, method: str, path: str, body: bytes = b"", token: str | None = "default",
                content_length: int | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.putrequest(method, path)
            if token == "default":
                token = self.token
            if token is not None:
                conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Content-Length", str(len(body) if content_length is None else content_length))
            conn.putheader("Content-Type", "application/vnd.lifeboat.batch.v1")
            conn.endheaders()
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (413) and closed
            resp = conn.getresponse()
            return resp.status, dict(resp.headers), json.loads(resp.read(65536) or b"{}")
        finally:
            conn.close()

    def put(self, seq: int, body: bytes, disk: str = DISK, **kw):
        return self.request("PUT", f"/api/v1/disks/{disk}/batches/{seq}", body, **kw)


def batch(seq: int, payload: bytes, point_id: str | None = None, disk: str = DISK) -> bytes:
    b = BatchBuilder(disk, seq, DISK_SIZE)
    b.write(0, payload)
    if point_id:
        b.bookmark({"point_id": point_id, "machine": "web01", "created": time.time(), "consistency": "none",
                    "cycle": seq, "block_size": 65536, "image_digest": ""})
    return b.to_bytes()


def rejections(lab) -> dict[str, float]:
    m = lab.ps_metrics()
    prefix = 'lifeboat_ps_rejections_total{reason="'
    return {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix)}


def test_bad_batches_are_rejected_counted_and_harmless(lab, tmp_path):
    lab.start_ps({"ingest": {"max_batch_bytes": MAX_BATCH}})
    c = Client(lab)
    payload = os.urandom(64 * 1024)
    good1 = batch(1, payload)

    # Acknowledge batch 1 first: everything that follows must leave it intact.
    status, _, body = c.put(1, good1)
    assert (status, body["status"]) == (200, "stored")

    cases = []
    cases.append(("no token", c.put(2, batch(2, payload), token=None), 401, "unauthenticated"))
    cases.append(("wrong token", c.put(2, batch(2, payload), token="x" * 43), 401, "unauthenticated"))
    cases.append(("oversized", c.put(2, os.urandom(MAX_BATCH + 1)), 413, "too_large"))
    cases.append(("garbage", c.put(2, os.urandom(4096)), 400, "malformed"))
    flipped = bytearray(batch(2, payload))
    flipped[len(flipped) // 2] ^= 0x40
    cases.append(("frame checksum", c.put(2, bytes(flipped)), 400, "malformed"))
    whole = batch(2, payload)
    cases.append(("cut short", c.put(2, whole[: len(whole) // 2]), 400, "truncated"))
    cases.append(("other disk in body", c.put(2, batch(2, payload, disk="web01.sdb")), 400, "malformed"))
    cases.append(("wrong seq in body", c.put(2, batch(3, payload)), 400, "malformed"))
    cases.append(("gap", c.put(5, batch(5, payload)), 409, "out_of_order"))
    cases.append(("bad disk id", c.put(2, batch(2, payload), disk="Web01..SDA"), 400, "bad_request"))
    cases.append(("bad seq", c.request("PUT", f"/api/v1/disks/{DISK}/batches/0x2", batch(2, payload)), 400, "bad_request"))
    for what, (status, _, body), want_status, want_reason in cases:
        assert (status, body.get("error")) == (want_status, want_reason), what
        assert body.get("message"), f"{what}: a rejection must say what was wrong"

    counts = rejections(lab)
    for reason in ("unauthenticated", "too_large", "malformed", "truncated", "out_of_order", "bad_request"):
        want = sum(1 for _, _, _, r in cases if r == reason)
        assert counts[reason] == want, (reason, counts)

    # A body that stops before its Content-Length, then the client vanishes: nothing is stored.
    conn = http.client.HTTPSConnection("127.0.0.1", lab.ps_port, context=c.ctx, timeout=10)
    conn.putrequest("PUT", f"/api/v1/disks/{DISK}/batches/2")
    conn.putheader("Authorization", f"Bearer {c.token}")
    conn.putheader("Content-Length", str(len(whole)))
    conn.endheaders()
    conn.send(whole[:1000])
    conn.close()

    # Still up, still at seq 1; a resend of 1 is a duplicate; the real batch 2 is accepted.
    assert lab.ps_proc.poll() is None
    status, _, body = c.request("GET", f"/api/v1/disks/{DISK}")
    assert status == 200 and body["acked_seq"] == 1, body
    assert c.put(1, good1)[2]["status"] == "duplicate"
    point_payload = os.urandom(32 * 1024)
    b2 = BatchBuilder(DISK, 2, DISK_SIZE)
    b2.write(128 * 1024, point_payload)
    b2.bookmark({"point_id": "web01-20261128T000000Z-000001", "machine": "web01", "created": time.time(),
                 "consistency": "none", "cycle": 1, "block_size": 65536, "image_digest": ""})
    assert c.put(2, b2.to_bytes())[0] == 200

    # Bytes compare: the recovered disk is exactly batch 1 then batch 2 applied to zeros.
    expected = bytearray(DISK_SIZE)
    expected[: len(payload)] = payload
    expected[128 * 1024: 128 * 1024 + len(point_payload)] = point_payload
    (tmp_path / "expected.img").write_bytes(expected)
    [point] = lab.wait_points(1)
    res = lab.failover(point["point_id"], tmp_path / "out.img")
    assert res.returncode == 0, res.stderr
    assert sha256_file(tmp_path / "out.img") == sha256_file(tmp_path / "expected.img")


def test_invalid_config_is_refused_with_the_key_path(lab):
    with pytest.raises(RuntimeError, match="exited"):
        lab.start_ps({"cache": {"max_bytes": 1 << 20}})
    assert "cache.max_bytes" in lab.log_path.read_text()


def test_full_cache_throttles_with_503_and_recovers_without_loss(lab, tmp_path):
    """Uploads fail (repository path broken), the cache fills, senders get 503 + Retry-After; once
    the repository is back, the backlog drains and the replica is byte-identical."""
    disk = make_image(tmp_path / "sda.img", 24, seed=21)
    source = sha256_file(disk)
    lab.start_ps({"cache": {"max_bytes": 8 << 20, "high_water_ratio": 0.5, "retry_after_seconds": 1},
                  "ingest": {"max_batch_bytes": 2 << 20}, "upload": {"retry_max_seconds": 0.5}})
    agent = lab.start_agent("web01", {"sda": disk}, cycles=1, extra={"replication": {"batch_bytes": 1 << 20}})
    # Wait for the first segment upload (it creates the log folder), then break the repository
    # under the running server: its log folder becomes a plain file.
    blocker = os.path.join(lab.init["repository"].removeprefix("local:"), "disks")
    deadline = time.monotonic() + 60
    while not os.path.isdir(blocker):
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.005)
    os.rename(blocker, blocker + ".away")
    with open(blocker, "w") as f:
        f.write("not a directory: segment uploads fail until this file is removed\n")
    deadline = time.monotonic() + 60
    while rejections(lab)["cache_full"] < 2:
        assert time.monotonic() < deadline, "the cache never reached its high-water mark"
        assert agent.poll() is None
        time.sleep(0.1)
    m = lab.ps_metrics()
    assert m["lifeboat_ps_cache_used_bytes"] <= 4 << 20
    assert sum(v for k, v in m.items() if k.startswith("lifeboat_ps_upload_errors_total")) > 0
    # A disk new to this server cannot be continued while the repository is unreadable: 503, with a reason.
    status, headers, body = Client(lab).put(1, batch(1, os.urandom(64 * 1024), disk="web01.sdz"), disk="web01.sdz")
    assert status == 503 and body.get("error") == "repository_unavailable", (status, body)
    assert headers["Retry-After"] == "1"
    assert "web01.sdz" in body["message"]
    os.unlink(blocker)
    os.rename(blocker + ".away", blocker)
    assert agent.wait(120) == 0
    [point] = lab.wait_points(1)
    out = tmp_path / "out.img"
    assert lab.failover(point["point_id"], out).returncode == 0
    assert sha256_file(out) == source
    assert "process server throttling" in lab.log_path.read_text()


def test_a_stalled_tls_handshake_is_closed_by_the_server(lab):
    """A peer that sends the start of a TLS record and then waits holds no socket for long: the ingest
    bounds the handshake (core/runtime.TLS_HANDSHAKE_TIMEOUT_SECONDS, 10 s; asyncio's default is 60 s)."""
    import socket

    lab.start_ps()
    with socket.create_connection(("127.0.0.1", lab.ps_port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01")   # a handshake record header announcing 512 bytes, then 1 byte
        s.settimeout(45)
        t0 = time.monotonic()
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - t0
    assert data == b"" or data[:1] == b"\x15", data[:16]   # closed (or a TLS alert), never held open
    assert waited < 40, f"the server held a stalled handshake for {waited:.0f} s"
    # The ingest still serves a real client afterwards.
    ctx = ssl.create_default_context(cafile=lab.init["ca_cert"])
    conn = http.client.HTTPSConnection("127.0.0.1", lab.ps_port, context=ctx, timeout=30)
    conn.request("GET", "/api/v1/health")
    assert conn.getresponse().status in (200, 401, 404)
    conn.close()
