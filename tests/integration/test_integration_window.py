"""Several batches of one disk in flight against a real process server: received side by side,
acknowledged only in seq order, a failed predecessor takes its successors down with it, and the
recovered image is byte-identical to what was acknowledged."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time

from test_integration_ingest import DISK, DISK_SIZE, Client, rejections
from lifeboat.core.wire import BatchBuilder

EXTENT = 64 * 1024


def numbered_batch(seq: int, payload: bytes, point_id: str | None = None) -> bytes:
    """Batch `seq` writes `payload` at extent seq (so every batch leaves its own mark on the image)."""
    b = BatchBuilder(DISK, seq, DISK_SIZE, compress=seq % 2 == 0)  # versions 1 and 2 in one log
    b.write(seq * EXTENT, payload)
    b.compress_frames()
    if point_id:
        b.bookmark({"point_id": point_id, "machine": "web01", "created": time.time(), "consistency": "none",
                    "cycle": 1, "block_size": 65536, "image_digest": ""})
    return b.to_bytes()


def put_in_thread(client: Client, seq: int, body: bytes, results: dict) -> threading.Thread:
    def run() -> None:
        results[seq] = client.put(seq, body)

    t = threading.Thread(target=run)
    t.start()
    return t


def acked(client: Client) -> int:
    status, _, body = client.request("GET", f"/api/v1/disks/{DISK}")
    assert status == 200, body
    return body["acked_seq"]


def test_window_acknowledges_in_order_and_a_failed_predecessor_fails_its_successors(lab, tmp_path):
    lab.start_ps()
    c = Client(lab)
    payloads = {seq: (os.urandom(EXTENT // 2) + bytes([seq]) * (EXTENT // 2)) for seq in range(1, 6)}
    bodies = {seq: numbered_batch(seq, payloads[seq], "web01-20261201T000000Z-000005" if seq == 5 else None)
              for seq in payloads}

    # 1-3 arrive out of order on three connections: 3 and 2 wait for their predecessors, all are stored.
    results: dict = {}
    threads = [put_in_thread(c, 3, bodies[3], results)]
    time.sleep(0.3)
    threads.append(put_in_thread(c, 2, bodies[2], results))
    time.sleep(0.3)
    threads.append(put_in_thread(c, 1, bodies[1], results))
    for t in threads:
        t.join(30)
    assert {seq: r[0] for seq, r in results.items()} == {1: 200, 2: 200, 3: 200}, results
    assert all(r[2]["status"] == "stored" for r in results.values())
    assert acked(c) == 3

    # 4's body stops half way and its connection stays open; 5 arrives whole and must wait for 4.
    conn = http.client.HTTPSConnection("127.0.0.1", lab.ps_port, context=c.ctx, timeout=30)
    conn.putrequest("PUT", f"/api/v1/disks/{DISK}/batches/4")
    conn.putheader("Authorization", f"Bearer {c.token}")
    conn.putheader("Content-Length", str(len(bodies[4])))
    conn.endheaders()
    conn.send(bodies[4][:1000])
    results = {}
    t5 = put_in_thread(c, 5, bodies[5], results)
    time.sleep(1.0)
    assert 5 not in results, "batch 5 was answered while batch 4 was still being received"
    assert acked(c) == 3
    conn.close()  # 4 fails: 5, received in full, is refused, not acknowledged
    t5.join(30)
    status, _, body = results[5]
    assert status == 409 and body["error"] == "out_of_order" and body["expected_seq"] == 4, results
    assert acked(c) == 3
    cached = sorted(f for f in os.listdir(lab.work / "cache" / DISK) if f.endswith((".batch", ".partial")))
    assert all(int(f.split(".")[0]) <= 3 for f in cached), cached  # neither 4 nor 5 left behind
    assert rejections(lab)["out_of_order"] >= 1

    # Beyond the window: refused at once, not waited for.
    status, _, body = c.put(4 + 8, numbered_batch(12, payloads[1]))
    assert status == 409 and body["error"] == "out_of_order" and body["expected_seq"] == 4

    # The sender resends from the first unacknowledged batch; the point holds every batch's bytes.
    assert c.put(4, bodies[4])[0] == 200
    assert c.put(5, bodies[5])[0] == 200
    expected = bytearray(DISK_SIZE)
    for seq, payload in payloads.items():
        expected[seq * EXTENT: seq * EXTENT + len(payload)] = payload
    [point] = lab.wait_points(1)
    out = tmp_path / "out.img"
    res = lab.failover(point["point_id"], out)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_window_keeps_the_replay_check_and_the_body_deadline(lab, tmp_path):
    """Merged behaviour: within the window a stalled body still gets 408 (and takes its waiting successor
    down), and an acknowledged seq resent with other bytes is 409 replay_mismatch, with the same bytes 200."""
    lab.start_ps({"ingest": {"body_idle_timeout_seconds": 1.0}})
    c = Client(lab)
    payloads = {seq: os.urandom(EXTENT // 2) + bytes([seq]) * (EXTENT // 2) for seq in range(1, 5)}
    bodies = {seq: numbered_batch(seq, payloads[seq], "web01-20261201T000000Z-000004" if seq == 4 else None)
              for seq in payloads}
    results: dict = {}
    threads = [put_in_thread(c, 2, bodies[2], results), put_in_thread(c, 1, bodies[1], results)]
    for t in threads:
        t.join(30)
    assert {seq: r[0] for seq, r in results.items()} == {1: 200, 2: 200}, results

    # 3's body stalls: the idle limit answers 408 instead of holding the disk's window open.
    conn = http.client.HTTPSConnection("127.0.0.1", lab.ps_port, context=c.ctx, timeout=30)
    conn.putrequest("PUT", f"/api/v1/disks/{DISK}/batches/3")
    conn.putheader("Authorization", f"Bearer {c.token}")
    conn.putheader("Content-Length", str(len(bodies[3])))
    conn.endheaders()
    conn.send(bodies[3][:1000])
    results = {}
    t4 = put_in_thread(c, 4, bodies[4], results)  # whole, but it must wait for 3
    resp = conn.getresponse()
    assert resp.status == 408 and b"timeout" in resp.read(4096)
    conn.close()
    t4.join(30)
    status, _, body = results[4]
    assert status == 409 and body["error"] == "out_of_order" and body["expected_seq"] == 3, results
    assert acked(c) == 2 and rejections(lab)["timeout"] >= 1

    # Replays of acknowledged batches, while 2 is the newest: other bytes refused, the same bytes a duplicate.
    forged = numbered_batch(2, os.urandom(EXTENT))
    status, _, body = c.put(2, forged)
    assert status == 409 and body["error"] == "replay_mismatch" and body["expected_seq"] == 3, body
    status, _, body = c.put(1, bodies[1])
    assert status == 200 and body["status"] == "duplicate", body
    assert c.put(3, bodies[3])[0] == 200
    assert c.put(4, bodies[4])[0] == 200

    expected = bytearray(DISK_SIZE)
    for seq, payload in payloads.items():
        expected[seq * EXTENT: seq * EXTENT + len(payload)] = payload
    [point] = lab.wait_points(1)
    out = tmp_path / "out.img"
    res = lab.failover(point["point_id"], out)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()
