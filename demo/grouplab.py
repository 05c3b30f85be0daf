"""Three agents in one consistency group on one host (ext4 loop devices, writers, port 20004 on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from blockdev import start_writer, stop, tracked_ext4
from lab import Lab, free_port

from lifeboat.core import tls

MEMBERS = ("app01", "db01", "web01")  # app01 coordinates (first in sorted order)


@contextlib.contextmanager
def three_member_group(lab: Lab, tmp: Path, disk_mib: int = 48, write_rate: float = 2e6):
    """Disks, member certificates, ports and running writers; the process server started."""
    for m in MEMBERS:
        (tmp / m).mkdir()
    with contextlib.ExitStack() as stack:
        disks = {m: stack.enter_context(tracked_ext4(tmp / m, disk_mib, xfs_mib=max(768, disk_mib * 4)))
                 for m in MEMBERS}
        tls_dir = os.path.dirname(lab.init["ca_cert"])
        ca_key = os.path.join(tls_dir, "ca.key")
        certs = {m: tls.issue_member_cert(lab.init["ca_cert"], ca_key, tls_dir, m, ["127.0.0.1"]) for m in MEMBERS}
        ports = {m: free_port() for m in MEMBERS}
        writers = [start_writer(disks[m].mountpoint / "data.bin", (disk_mib // 3) << 20, write_rate, seed=i)
                   for i, m in enumerate(MEMBERS)]
        stack.callback(lambda: [stop(w) for w in writers])
        lab.start_ps()
        yield Group(lab, disks, certs, ports)


class Group:
    def __init__(self, lab, disks, certs, ports) -> None:
        self.lab, self.disks, self.certs, self.ports = lab, disks, certs, ports

    def extra(self, machine: str, **group) -> dict:
        cert, key = self.certs[machine]
        return {"replication": {"batch_bytes": 4 << 20},
                "tracking": {"tracker": "tracepoint"},
                "snapshot": {"providers": ["reflink"], "dir": str(self.disks[machine].snapshot_dir), "keep": 100},
                "consistency": {"freeze_timeout_seconds": 20.0},
                "group": {"name": "shop", "listen_host": "127.0.0.1", "port": self.ports[machine], "cert": cert,
                          "key": key, "ca_cert": self.lab.init["ca_cert"], "interval_seconds": 1.5,
                          "hold_deadline_seconds": 5.0, **group,
                          "members": [{"machine": m, "address": f"127.0.0.1:{self.ports[m]}"} for m in MEMBERS]}}

    def start(self, machine: str, **group):
        return self.lab.start_agent(machine, {"sda": self.disks[machine].device}, extra=self.extra(machine, **group))

    def group_points(self) -> list[dict]:
        res = self.lab.cli("points", "--group", "shop", "--json")
        if res.returncode != 0:
            raise RuntimeError(f"lifeboat points --group failed: {res.stderr}")
        return json.loads(res.stdout)

    def wait_group_points(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while self.lab.log_path.read_text().count("group round marked") < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} rounds marked; see {self.lab.log_path}")
            time.sleep(0.2)
        while len(pts := self.group_points()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pts)} of {count} group points; see {self.lab.log_path}")
            time.sleep(0.5)
        return pts

    def metrics(self, machine: str) -> str:
        """A running member's /metrics text (its port is in the agent's 'agent ready' log line)."""
        import re
        import urllib.request
        m = re.search(rf"event='agent ready' MACHINE='{machine}'.*?metrics_port=(\d+)", self.lab.log_path.read_text())
        if not m:
            raise RuntimeError(f"{machine} has not logged 'agent ready'")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=5) as resp:
            return resp.read().decode()
