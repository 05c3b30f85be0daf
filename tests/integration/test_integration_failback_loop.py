"""Failback as one scripted loop of `lifeboat` commands through the control plane; the forwarder after a cancel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

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
    via = ("--via", f"https://127.0.0.1:{lab.ps_port}", "--via-token-file", lab.init["agent_token"], "--machine", "web01")
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
