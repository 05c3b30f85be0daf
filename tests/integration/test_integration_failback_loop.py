"""Failback as one scripted loop of `lifeboat` commands through the control plane; the forwarder after a cancel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from disk_images import make_image
from lab import bin_path, sha256_file
from master_target_lab import CountingProxy, MasterTargetProc, reprotect_cli
from test_integration_failback import BLOCK, change_blocks

DISK = "web01.sda"


@pytest.fixture
def mt(lab):
    proc = MasterTargetProc(lab)
    yield proc
    proc.close()


@pytest.fixture
def control_mt(control_lab):
    proc = MasterTargetProc(control_lab)
    yield proc
    proc.close()


def _wait(what: str, probe, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"{what} not reached after {timeout} s"
        time.sleep(0.1)
    return value


def test_forwarder_drops_batches_the_master_target_went_back_past(lab, mt, tmp_path):
    """After a cancel at the master target the process server's later batches can never apply: they are
    dropped (counted, logged), the sequence realigns, and the next reprotect through it ends bit-exact."""
    onprem = make_image(tmp_path / "onprem.img", 8, seed=61)
    failed_over = tmp_path / "failed-over.img"
    shutil.copyfile(onprem, failed_over)
    change_blocks(failed_over, 12, seed=62)
    mt.add_disk(DISK, onprem)
    mt.start()
    lab.start_ps({"forward": {"master_target_url": mt.url, "ca_cert": mt.ca_cert, "token_file": str(mt.token_file),
                              "retry_max_seconds": 1.0}})
    via = ("--via", f"https://127.0.0.1:{lab.ps_port}", "--via-token-file", lab.init["agent_token"])
    args = (mt.url, mt.ca_cert, mt.token_file)
    try:
        before = sha256_file(onprem)
        prep = reprotect_cli(failed_over, DISK, *args, "--stage", "prepare", *via, command="failback")
        cancelled = reprotect_cli(None, DISK, *args, "--stage", "cancel", command="failback")
        assert cancelled["dropped"] == list(range(prep["first_seq"], prep["last_seq"] + 1))
        assert sha256_file(onprem) == before
        # The process server still acknowledges up to prep's last batch; the next pass continues after it,
        # which the master target (back at first_seq - 1) can never take in order.
        stale = reprotect_cli(failed_over, DISK, *args, "--no-wait", *via)
        assert stale["first_seq"] == prep["last_seq"] + 1
        ps = _wait("the forwarder's drop", lambda: (m := lab.ps_metrics())["lifeboat_ps_forward_dropped_batches_total"]
                   >= 1 and m)
        assert ps["lifeboat_ps_forward_dropped_batches_total"] == stale["last_seq"] - stale["first_seq"] + 1
        assert ps[f'lifeboat_ps_uploaded_seq{{disk="{DISK}"}}'] == prep["first_seq"] - 1
        assert sha256_file(onprem) == before   # nothing dropped was applied
        # The loop goes on: a reprotect through the same process server continues where the master target is.
        again = reprotect_cli(failed_over, DISK, *args, *via)
        assert again["applied"] and again["first_seq"] == prep["first_seq"]
        assert sha256_file(onprem) == sha256_file(failed_over)
        assert mt.health()["ok"]
        assert "cached batches dropped" in lab.log_path.read_text()
    finally:
        lab.stop_ps()


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.args, proc.stderr)
    return proc.stdout


def status_of(lab, machine: str) -> dict:
    [row] = json.loads(ok(lab.api_cli("status", machine, "--json")))
    return row


def test_failback_loop_is_one_scripted_sequence_of_commands(control_lab, control_mt, tmp_path):
    """protect → write → failover → commit → write on the copy → reprotect → failback prepare/switch → reenable →
    a final point and failover: every command's exit code checked, every stage bit-exact, only changes on the wire."""
    lab, mt = control_lab, control_mt
    size = 32 << 20
    lab.start_ps({"ingest": {"accept_shared_token": False}})
    cred = tmp_path / "web01.credential"
    ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", "web01",
                   "--out", str(cred)))
    agent = lab.agent_control(str(cred))
    ok(lab.api_cli("policy", "set", "fast", "--crash-interval-seconds", "0.5", "--app-interval-seconds", "0",
                   "--retention-days", "15", "--rpo-threshold-seconds", "3600"))
    ok(lab.api_cli("protect", "web01", "--disk", "sda", "--policy", "fast"))
    onprem = make_image(tmp_path / "onprem.img", 32, seed=71)

    # 1. Protect and write: two forward points.
    assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent) == 0
    change_blocks(onprem, 8, seed=72)
    assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent) == 0
    lab.wait_points(2)
    protected = sha256_file(onprem)
    assert status_of(lab, "web01")["protection"] == "protected"

    # 2. A real failover to the latest point, as a job of the primary.
    site = tmp_path / "azure-side"
    [line] = ok(lab.api_cli("failover", "web01", "--point", "latest", "--to", str(site), "-q")).splitlines()
    failed_over = site / "web01.sda.img"
    assert json.loads(line)["path"] == str(failed_over) and sha256_file(failed_over) == protected
    assert status_of(lab, "web01")["state"] == "failed-over"
    mt.add_disk(DISK, onprem)
    mt.start()
    proxy = CountingProxy(mt.port)
    mt_args = ["--disk", DISK, "--master-target", f"https://127.0.0.1:{proxy.port}", "--ca-cert", mt.ca_cert,
               "--token-file", str(mt.token_file), "--json"]
    try:
        # Reprotect before the commit is refused, with the way out, and sends nothing.
        early = lab.api_cli("reprotect", "web01", "--source-image", str(failed_over), *mt_args)
        assert early.returncode != 0 and "lifeboat failover commit web01" in early.stderr
        assert proxy.up_bytes == 0 and sha256_file(onprem) == protected
        ok(lab.api_cli("failover", "commit", "web01", "-q"))

        # 3. The failed-over machine writes; 4. reprotect (original location) sends only what differs.
        changed = change_blocks(failed_over, 20, seed=73)
        rep = json.loads(ok(lab.api_cli("reprotect", "web01", "--source-image", str(failed_over), *mt_args)))
        assert rep["applied"] and rep["changed_bytes"] == changed
        assert sha256_file(onprem) == sha256_file(failed_over)
        assert proxy.up_bytes <= changed * 1.05, (proxy.up_bytes, changed)
        reprotect_wire = proxy.up_bytes
        row = status_of(lab, "web01")
        assert (row["state"], row["powered_off"]) == ("reprotecting", True)
        assert "powered off (reprotecting)" in ok(lab.api_cli("status"))
        # The on-prem machine is off: its agent, started by mistake, is refused and changes nothing.
        assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent, timeout=120) != 0
        assert "machine web01 is reprotecting" in lab.log_path.read_text()   # the agent's error says why
        assert sha256_file(onprem) == sha256_file(failed_over)

        # 5. Planned failover back: more writes, prepare (final sync held), switch.
        changed2 = change_blocks(failed_over, 6, seed=74)
        up_before = proxy.up_bytes
        prep = json.loads(ok(lab.api_cli("failback", "web01", "--source-image", str(failed_over), "--stage",
                                         "prepare", "--point-id", "failback-final", *mt_args)))
        assert prep["changed_bytes"] == changed2 and prep["first_seq"] == rep["last_seq"] + 1
        assert status_of(lab, "web01")["state"] == "failing-back"
        early = lab.api_cli("reenable", "web01")
        assert early.returncode != 0 and "--stage switch" in early.stderr
        done = json.loads(ok(lab.api_cli("failback", "web01", "--stage", "switch", *mt_args)))
        assert done["applied"] and done["point_id"] == "failback-final"
        failback_wire = proxy.up_bytes - up_before
        assert failback_wire <= changed2 * 1.05 + 32 * 1024  # two TLS handshakes + headers
    finally:
        proxy.close()
    failed_back = sha256_file(onprem)
    assert failed_back == sha256_file(failed_over)
    mt.stop()

    # 6. Re-enable: protected again, the agent restarts on the on-prem disk and resyncs by digest.
    before = lab.ps_metrics()["lifeboat_ps_received_bytes_total"]
    points_before = len(lab.points())
    out = json.loads(ok(lab.api_cli("reenable", "web01", "--json")))
    # The refused early reprotect and reenable left no step behind: only what happened is recorded.
    assert [s["step"] for s in out["steps"]] == ["reprotect", "prepare", "switch", "reenable"]
    assert [s["to_state"] for s in out["steps"]] == ["reprotecting", "failing-back", "failing-back", "protected"]
    assert out["state"] == "protected"
    assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent) == 0
    points = lab.wait_points(points_before + 1)
    resync = lab.ps_metrics()["lifeboat_ps_received_bytes_total"] - before
    assert resync < (changed + changed2) * 1.05 + 64 * 1024 and resync < size / 8, resync
    print(f"FIGURES reprotect changed={changed} wire={reprotect_wire} failback changed={changed2} "
          f"wire={failback_wire} reenable resync={resync} of {size}")
    row = status_of(lab, "web01")
    assert (row["protection"], row["powered_off"], row["latest_point"]) == ("protected", False, points[-1]["point_id"])

    # 7. A final point and failover (a drill, so web01 stays protected): bit-exact with the failed-back disk.
    [line] = ok(lab.api_cli("failover", "--test", "web01", "--point", "latest", "--to", str(tmp_path / "drill"),
                            "-q")).splitlines()
    assert sha256_file(json.loads(line)["path"]) == failed_back


def test_the_operator_script_runs_the_same_loop(control_lab, control_mt, tmp_path):
    """scripts/failback-loop.sh, stage by stage with writes on the failed-over copy between: bit-exact at each."""
    lab, mt = control_lab, control_mt
    lab.start_ps({"ingest": {"accept_shared_token": False}})
    cred = tmp_path / "web01.credential"
    ok(lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", "web01",
                   "--out", str(cred)))
    agent = lab.agent_control(str(cred))
    ok(lab.api_cli("policy", "set", "fast", "--crash-interval-seconds", "0.5", "--app-interval-seconds", "0"))
    ok(lab.api_cli("protect", "web01", "--disk", "sda", "--policy", "fast"))
    onprem = make_image(tmp_path / "onprem.img", 8, seed=81)
    assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent) == 0
    lab.wait_points(1)
    mt.add_disk(DISK, onprem)
    mt.start()
    site = tmp_path / "azure-side"
    script = Path(__file__).resolve().parents[2] / "scripts" / "failback-loop.sh"
    env = {**os.environ, **lab.api_env(), "PATH": f"{Path(bin_path('lifeboat')).parent}:{os.environ['PATH']}",
           "MACHINE": "web01", "DISK": "sda", "FAILOVER_DIR": str(site), "MT_URL": mt.url, "MT_CA": mt.ca_cert,
           "MT_TOKEN": str(mt.token_file)}

    def run(stage: str) -> str:
        proc = subprocess.run([str(script)], env={**env, "STEP": stage}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (stage, proc.stderr)
        return proc.stdout

    source = sha256_file(onprem)
    run("failover")
    image = site / "web01.sda.img"
    assert sha256_file(image) == source and status_of(lab, "web01")["state"] == "failed-over"
    change_blocks(image, 10, seed=82)
    run("reprotect")
    assert sha256_file(onprem) == sha256_file(image) and status_of(lab, "web01")["state"] == "reprotecting"
    change_blocks(image, 3, seed=83)
    run("failback")
    assert sha256_file(onprem) == sha256_file(image) and status_of(lab, "web01")["state"] == "failing-back"
    mt.stop()
    assert "web01" in run("reenable") and status_of(lab, "web01")["protection"] == "protected"
    assert lab.run_agent("web01", {"sda": str(onprem)}, cycles=1, extra=agent) == 0
    lab.wait_points(2)
    [line] = ok(lab.api_cli("failover", "--test", "web01", "--point", "latest", "--to", str(tmp_path / "drill"),
                            "-q")).splitlines()
    assert sha256_file(json.loads(line)["path"]) == sha256_file(onprem)
