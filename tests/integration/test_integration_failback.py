"""Failback against a real lifeboat-master-target (TLS, journal, image files): reprotect, forward mode, crash, bad input."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest

from disk_images import make_image
from lab import sha256_file
from lifeboat.core.wire import BatchBuilder
from lifeboat.master_target.journal import APPLY_DELAY_ENV
from master_target_lab import CountingProxy, MasterTargetProc, reprotect_cli

DISK = "web01.sda"
BLOCK = 64 * 1024


@pytest.fixture
def mt(lab):
    proc = MasterTargetProc(lab)
    yield proc
    proc.close()


def change_blocks(path: Path, count: int, seed: int) -> int:
    """Overwrite `count` distinct 64 KiB blocks with random bytes; returns the bytes changed."""
    rng = random.Random(seed)
    blocks = path.stat().st_size // BLOCK
    with open(path, "r+b") as f:
        for b in rng.sample(range(blocks), count):
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))
    return count * BLOCK


def test_original_location_reprotect_sends_only_changed_blocks(lab, mt, tmp_path):
    """The on-prem image ends bit-exact with the failed-over one; the wire carries ≤ changed blocks + 5%."""
    onprem = make_image(tmp_path / "onprem.img", 32, seed=3)
    failed_over = tmp_path / "failed-over.img"
    shutil.copyfile(onprem, failed_over)
    changed = change_blocks(failed_over, 24, seed=5)          # 1.5 MiB of a 32 MiB disk
    mt.add_disk(DISK, onprem)
    mt.start()
    proxy = CountingProxy(mt.port)
    try:
        res = reprotect_cli(failed_over, DISK, f"https://127.0.0.1:{proxy.port}", mt.ca_cert, mt.token_file)
    finally:
        proxy.close()
    assert res["applied"] and res["mode"] == "original"
    assert res["changed_bytes"] == changed
    assert sha256_file(onprem) == sha256_file(failed_over)
    # Bytes on the wire, TLS records and HTTP headers included, towards the master target.
    assert proxy.up_bytes <= changed * 1.05, (proxy.up_bytes, changed)
    # The digests are all that comes back: 16 bytes per block.
    assert res["digest_bytes"] == (32 << 20) // BLOCK * 16
    m = mt.metrics()
    assert m["lifeboat_mt_received_bytes_total"] == res["sent_body_bytes"]
    assert m["lifeboat_mt_points_total"] == 1
    assert mt.health()["disks"][DISK]["applied_seq"] == res["last_seq"]


def test_alternate_location_reprotect_is_a_full_bit_exact_copy(lab, mt, tmp_path):
    source = make_image(tmp_path / "failed-over.img", 16, seed=11)
    mt.start()
    res = mt.reprotect(source, "unused", "--alternate", "--new-disk", "web01.sdb")
    created = mt.state_dir / "alternate" / "web01.sdb.img"
    assert res["applied"] and res["mode"] == "alternate" and res["digest_bytes"] == 0
    assert sha256_file(created) == sha256_file(source)
    # Everything was sent: every block that is not zero (the new image is zero-filled already).
    data = source.read_bytes()
    nonzero = sum(BLOCK for i in range(0, len(data), BLOCK) if data[i: i + BLOCK] != bytes(BLOCK))
    assert res["changed_bytes"] == nonzero and res["zero_bytes"] == 0 and nonzero > (8 << 20)
    assert mt.metrics()["lifeboat_mt_applied_bytes_total"] == nonzero
    # A second alternate reprotect to the same new disk id is refused, the copy stays as it is.
    before = sha256_file(created)
    proc = mt.reprotect(source, "unused", "--alternate", "--new-disk", "web01.sdb", check=False)
    assert proc.returncode != 0 and "already registered" in proc.stderr
    assert sha256_file(created) == before


def test_sigkill_during_apply_then_restart_ends_bit_exact(lab, mt, tmp_path):
    """Kill -9 while an entry is half applied; the restarted master target re-applies it and ends exact."""
    onprem = tmp_path / "onprem.img"
    onprem.write_bytes(bytes(16 << 20))
    source = tmp_path / "failed-over.img"
    rng = random.Random(1)
    with open(source, "wb") as f:  # every other block random: 8 write frames per 1 MiB batch
        for b in range((16 << 20) // BLOCK):
            f.write(rng.randbytes(BLOCK) if b % 2 else bytes(BLOCK))
    mt.add_disk(DISK, onprem)
    mt.start(env={APPLY_DELAY_ENV: "0.05"})
    res = mt.reprotect(source, DISK, "--no-wait", "--batch-bytes", str(256 * 1024))
    assert res["last_seq"] >= 10
    deadline = time.monotonic() + 60
    while mt.metrics().get(f'lifeboat_mt_applied_seq{{disk="{DISK}"}}', 0) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    mt.stop(signal.SIGKILL)
    journal = mt.state_dir / "journal" / DISK
    applied_before = json.loads((journal / "state.json").read_text())["applied_seq"]
    assert applied_before < res["last_seq"], "the kill came after the last apply: nothing was interrupted"
    assert sha256_file(onprem) != sha256_file(source)
    mt.start()
    mt.wait_applied(DISK, res["last_seq"])
    assert sha256_file(onprem) == sha256_file(source)
    assert not list(journal.glob("*.lbj"))
    assert mt.health()["ok"]


def test_process_server_forwards_to_the_master_target(lab, mt, tmp_path):
    """A process server in forward mode delivers the reprotect stream; the on-prem image ends exact."""
    onprem = make_image(tmp_path / "onprem.img", 16, seed=21)
    failed_over = tmp_path / "failed-over.img"
    shutil.copyfile(onprem, failed_over)
    changed = change_blocks(failed_over, 16, seed=22)
    mt.add_disk(DISK, onprem)
    mt.start()
    proxy = CountingProxy(mt.port)   # counts what the process server forwards
    try:
        lab.start_ps({"forward": {"master_target_url": f"https://127.0.0.1:{proxy.port}", "ca_cert": mt.ca_cert,
                                  "token_file": str(mt.token_file), "retry_max_seconds": 1.0}})
        res = mt.reprotect(failed_over, DISK, "--via", f"https://127.0.0.1:{lab.ps_port}",
                           "--via-token-file", lab.init["agent_token"])
        assert res["applied"]
        assert sha256_file(onprem) == sha256_file(failed_over)
        assert res["changed_bytes"] == changed
        assert proxy.up_bytes <= changed * 1.05, (proxy.up_bytes, changed)
        deadline = time.monotonic() + 30  # the forwarder counts after the master target's answer: wait for it
        while (ps := lab.ps_metrics()).get(f'lifeboat_ps_uploaded_seq{{disk="{DISK}"}}', 0) < res["last_seq"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ps["lifeboat_ps_forwarded_bytes_total"] == res["sent_body_bytes"]
        assert ps[f'lifeboat_ps_uploaded_seq{{disk="{DISK}"}}'] == res["last_seq"]
        # A second pass (nothing changed) sends one bookmark-only batch, continuing the sequence.
        again = mt.reprotect(failed_over, DISK, "--via", f"https://127.0.0.1:{lab.ps_port}",
                             "--via-token-file", lab.init["agent_token"])
        assert again["changed_bytes"] == 0 and again["first_seq"] == res["last_seq"] + 1
        assert sha256_file(onprem) == sha256_file(failed_over)
    finally:
        lab.stop_ps()
        proxy.close()


class Client:
    def __init__(self, mt) -> None:
        self.ctx = ssl.create_default_context(cafile=mt.ca_cert)
        self.port = mt.port
        self.token = mt.token_file.read_text().strip()

    def put(self, disk: str, seq: int, body: bytes, token: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.request("PUT", f"/api/v1/disks/{disk}/batches/{seq}", body=body,
                         headers={"Authorization": f"Bearer {token or self.token}",
                                  "Content-Type": "application/vnd.lifeboat.batch.v1"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read(65536) or b"{}")
        finally:
            conn.close()


def test_bad_input_is_refused_clearly_and_changes_nothing(lab, mt, tmp_path):
    onprem = make_image(tmp_path / "onprem.img", 4, seed=31)
    mt.add_disk(DISK, onprem)
    mt.start()
    before = sha256_file(onprem)
    c = Client(mt)

    def batch(disk: str, size: int) -> bytes:
        b = BatchBuilder(disk, 1, size)
        b.write(0, os.urandom(BLOCK))
        return b.to_bytes()

    status, body = c.put("web01.sdz", 1, batch("web01.sdz", 4 << 20))
    assert (status, body["error"]) == (404, "unknown_disk") and "add-disk" in body["message"]
    status, body = c.put(DISK, 1, batch(DISK, 8 << 20))
    assert (status, body["error"]) == (409, "wrong_size")
    assert str(8 << 20) in body["message"] and str(4 << 20) in body["message"]
    status, body = c.put(DISK, 1, batch(DISK, 4 << 20), token="not-a-registered-sender-token")
    assert (status, body["error"]) == (401, "unauthenticated") and "add-sender" in body["message"]
    corrupt = bytearray(batch(DISK, 4 << 20))
    corrupt[-20] ^= 1
    status, body = c.put(DISK, 1, bytes(corrupt))
    assert (status, body["error"]) == (400, "malformed")
    # A reprotect from a source of another size names both sizes and sends nothing.
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(1 << 20))
    proc = mt.reprotect(small, DISK, check=False)
    assert proc.returncode != 0 and "--alternate" in proc.stderr and str(4 << 20) in proc.stderr
    # A bookmark naming another machine than the disk's owner would be refused by every reader: said up front.
    proc = mt.reprotect(onprem, DISK, "--machine", "db02", check=False)
    assert proc.returncode != 0 and "'db02' does not own disk web01.sda" in proc.stderr, proc.stderr

    m = mt.metrics()
    for reason in ("unknown_disk", "wrong_size", "unauthenticated", "malformed"):
        assert m[f'lifeboat_mt_rejections_total{{reason="{reason}"}}'] == 1, reason
    assert m.get("lifeboat_mt_received_bytes_total") == 0
    assert not list((mt.state_dir / "journal").rglob("*.lbj")) and not list((mt.state_dir / "journal").rglob("*.partial"))
    assert sha256_file(onprem) == before
    assert mt.health()["ok"] and mt.proc.poll() is None
    # The same batch, well formed and authorised, is then accepted and applied.
    good = batch(DISK, 4 << 20)
    status, body = c.put(DISK, 1, good)
    assert (status, body["status"]) == (200, "stored")
    mt.wait_applied(DISK, 1)
    assert sha256_file(onprem) != before


def test_a_stalled_body_gets_408_and_changes_nothing(lab, tmp_path):
    """As at the ingest: a body that stops sending is answered 408 after the idle limit (it cannot hold
    the disk's receive slot), nothing is journaled, and the next good batch is applied bit-exact."""
    mt = MasterTargetProc(lab, "mt-slow", ingest={"body_idle_timeout_seconds": 1.0})
    try:
        onprem = make_image(tmp_path / "onprem.img", 4, seed=41)
        mt.add_disk(DISK, onprem)
        mt.start()
        before = sha256_file(onprem)
        original = onprem.read_bytes()
        c = Client(mt)
        payload = os.urandom(BLOCK)
        b = BatchBuilder(DISK, 1, 4 << 20)
        b.write(0, payload)
        body = b.to_bytes()
        conn = http.client.HTTPSConnection("127.0.0.1", mt.port, context=c.ctx, timeout=30)
        conn.putrequest("PUT", f"/api/v1/disks/{DISK}/batches/1")
        conn.putheader("Authorization", f"Bearer {c.token}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:1000])
        t0 = time.monotonic()
        resp = conn.getresponse()
        answer = json.loads(resp.read(65536))
        conn.close()
        assert resp.status == 408 and answer["error"] == "timeout" and "idle limit 1 s" in answer["message"], answer
        assert time.monotonic() - t0 < 20
        assert mt.metrics()['lifeboat_mt_rejections_total{reason="timeout"}'] == 1
        assert not list((mt.state_dir / "journal").rglob("*.lbj")) and not list((mt.state_dir / "journal").rglob("*.partial"))
        assert sha256_file(onprem) == before
        # The sender retries the whole batch: accepted and applied.
        assert c.put(DISK, 1, body)[0] == 200
        mt.wait_applied(DISK, 1)
        expected = bytearray(original)
        expected[:BLOCK] = payload
        assert sha256_file(onprem) == hashlib.sha256(expected).hexdigest()
    finally:
        mt.close()


def test_failback_end_to_end_protect_failover_reprotect_failback_reenable(lab, mt, tmp_path):
    """Every stage on one host with image files, each ending bit-exact; reprotect and re-enable send only changes."""
    size = 32 << 20
    onprem = make_image(tmp_path / "onprem.img", 32, seed=41)
    # 1. Protect and write: two forward points in the repository.
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": onprem}, cycles=1) == 0
    change_blocks(onprem, 8, seed=42)
    assert lab.run_agent("web01", {"sda": onprem}, cycles=1) == 0
    lab.wait_points(2)
    protected = sha256_file(onprem)
    forward_bytes = lab.ps_metrics()["lifeboat_ps_received_bytes_total"]
    # 2. Failover to the latest point (the failed-over machine's disk; the on-prem machine is off).
    failed_over = tmp_path / "failed-over.img"
    res = lab.failover("latest", failed_over)
    assert res.returncode == 0, res.stderr
    assert sha256_file(failed_over) == protected
    # 3. The failed-over machine keeps writing.
    changed = change_blocks(failed_over, 20, seed=43)
    # 4. Reprotect, original location: only the differing blocks cross the wire.
    mt.add_disk("web01.sda", onprem)
    mt.start()
    proxy = CountingProxy(mt.port)
    try:
        url = f"https://127.0.0.1:{proxy.port}"
        rep = reprotect_cli(failed_over, "web01.sda", url, mt.ca_cert, mt.token_file)
        assert rep["applied"] and rep["changed_bytes"] == changed
        assert sha256_file(onprem) == sha256_file(failed_over)
        assert proxy.up_bytes <= changed * 1.05, (proxy.up_bytes, changed)
        # 5. Planned failover back: more writes, then the final sync with the source quiesced.
        changed2 = change_blocks(failed_over, 6, seed=44)
        up_before = proxy.up_bytes
        fb = reprotect_cli(failed_over, "web01.sda", url, mt.ca_cert, mt.token_file, "--point-id", "failback-final",
                           command="failback")
        assert fb["applied"] and fb["changed_bytes"] == changed2 and fb["first_seq"] == rep["last_seq"] + 1
        assert proxy.up_bytes - up_before <= changed2 * 1.05 + 16 * 1024  # one TLS handshake + headers
    finally:
        proxy.close()
    failed_back = sha256_file(onprem)
    assert failed_back == sha256_file(failed_over)
    [final] = [p for p in _points(mt, "web01.sda") if p["point_id"] == "failback-final"]
    assert final["consistency"] == "crash" and final["seq"] == fb["last_seq"]
    mt.stop()
    # 6. Re-enable: forward replication restarts from the on-prem disk; the agent's digest map
    #    (what the repository holds) makes it a digest resync, not a full copy.
    assert lab.run_agent("web01", {"sda": onprem}, cycles=1) == 0
    points = lab.wait_points(3)
    resync_bytes = lab.ps_metrics()["lifeboat_ps_received_bytes_total"] - forward_bytes
    assert resync_bytes < (changed + changed2) * 1.05 + 64 * 1024, resync_bytes
    assert resync_bytes < size / 8
    latest = tmp_path / "re-enabled.img"
    res = lab.failover(points[-1]["point_id"], latest)
    assert res.returncode == 0, res.stderr
    assert sha256_file(latest) == failed_back


def _points(mt, disk: str) -> list[dict]:
    state = mt.state_dir / "journal" / disk / "state.json"
    return json.loads(state.read_text())["points"]


def test_failover_back_is_cancellable_until_switch_and_the_hold_survives_a_restart(lab, mt, tmp_path):
    onprem = make_image(tmp_path / "onprem.img", 8, seed=51)
    failed_over = tmp_path / "failed-over.img"
    shutil.copyfile(onprem, failed_over)
    change_blocks(failed_over, 10, seed=52)
    mt.add_disk(DISK, onprem)
    mt.start()
    before = sha256_file(onprem)
    args = (mt.url, mt.ca_cert, mt.token_file)
    prep = reprotect_cli(failed_over, DISK, *args, "--stage", "prepare", command="failback")
    assert prep["changed_bytes"] == 10 * BLOCK and not prep.get("applied")
    assert sha256_file(onprem) == before                      # journaled, not applied
    mt.stop(signal.SIGKILL)                                   # the hold is durable: a restart applies nothing
    mt.start()
    time.sleep(0.5)  # give a (wrong) applier the chance to run; the assertion below does not depend on timing
    assert sha256_file(onprem) == before
    assert mt.health()["disks"][DISK]["acked_seq"] == prep["last_seq"]
    cancelled = reprotect_cli(None, DISK, *args, "--stage", "cancel", command="failback")
    assert cancelled["dropped"] == list(range(prep["first_seq"], prep["last_seq"] + 1))
    assert sha256_file(onprem) == before
    # A cancel after a switch is refused; the second attempt goes through to the end.
    prep2 = reprotect_cli(failed_over, DISK, *args, "--stage", "prepare", command="failback")
    assert prep2["first_seq"] == prep["first_seq"]            # the dropped sequence numbers are reused
    done = reprotect_cli(None, DISK, *args, "--stage", "switch", command="failback")
    assert done["applied"] and sha256_file(onprem) == sha256_file(failed_over)
    proc = reprotect_cli(None, DISK, *args, "--stage", "cancel", command="failback", check=False)
    assert proc.returncode != 0 and "cannot be undone" in proc.stderr
    assert sha256_file(onprem) == sha256_file(failed_over)


def test_switch_back_to_an_earlier_failback_point(lab, mt, tmp_path):
    """Undo records let the on-prem disk go back to an earlier retained point, bit-exact; reprotect then resumes."""
    onprem = make_image(tmp_path / "onprem.img", 8, seed=61)
    failed_over = tmp_path / "failed-over.img"
    shutil.copyfile(onprem, failed_over)
    mt.add_disk(DISK, onprem)
    mt.start()
    args = (mt.url, mt.ca_cert, mt.token_file)
    change_blocks(failed_over, 12, seed=62)
    reprotect_cli(failed_over, DISK, *args, "--point-id", "point-a")
    at_a = sha256_file(failed_over)
    assert sha256_file(onprem) == at_a
    change_blocks(failed_over, 12, seed=63)
    reprotect_cli(failed_over, DISK, *args, "--point-id", "point-b")
    assert sha256_file(onprem) == sha256_file(failed_over) != at_a
    out = reprotect_cli(None, DISK, *args, "--stage", "rollback", "--point", "point-a", command="failback")
    assert out["point_id"] == "point-a"
    assert sha256_file(onprem) == at_a
    proc = reprotect_cli(None, DISK, *args, "--stage", "rollback", "--point", "point-b", command="failback",
                         check=False)
    assert proc.returncode != 0 and "no retained failback point 'point-b'" in proc.stderr
    again = reprotect_cli(failed_over, DISK, *args)
    assert again["changed_bytes"] == 12 * BLOCK  # exactly what point-b had added
    assert sha256_file(onprem) == sha256_file(failed_over)


def test_master_target_tells_systemd_ready_watchdog_and_stopping(lab, mt, tmp_path):
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        mt.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""})
        seen: list[str] = []
        while "WATCHDOG=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert seen.index("READY=1") < seen.index("WATCHDOG=1")
        assert mt.health()["ok"]
        mt.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert mt.proc.wait(30) == 0
    finally:
        sock.close()


def test_compressed_batch_reaches_the_master_targets_disk_bit_exact(lab, mt, tmp_path):
    # What a current agent sends (batch version 2, zstd frames) after the forwarder or a reprotect.
    from lifeboat.core.wire import parse_batch
    onprem = make_image(tmp_path / "onprem.img", 4, seed=41)
    mt.add_disk(DISK, onprem)
    mt.start()
    expected = bytearray(onprem.read_bytes())
    b = BatchBuilder(DISK, 1, len(expected), compress=True)
    for offset, data in ((0, (b"failback text " * 4700)[:BLOCK]), (3 * BLOCK, bytes(BLOCK // 2) + b"\7" * (BLOCK // 2)),
                         (5 * BLOCK, os.urandom(BLOCK))):
        b.write(offset, data)
        expected[offset: offset + len(data)] = data
    b.compress_frames()
    body = b.to_bytes()
    assert [f.compressed for f in parse_batch(body)[1]] == [True, True, False]
    status, reply = Client(mt).put(DISK, 1, body)
    assert (status, reply["status"]) == (200, "stored")
    mt.wait_applied(DISK, 1)
    assert sha256_file(onprem) == hashlib.sha256(expected).hexdigest()
