"""Management API figures: heartbeats/s (each one an fsynced SQLite write behind TLS), status latency
for many machines, and the ingest's per-batch credential check. Prints figures, asserts nothing.

    .venv/bin/python -m bench.control_api [--machines 200] [--heartbeats 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from lifeboat.control.auth import new_passphrase, new_token
from lifeboat.control.client import ApiClient
from lifeboat.control.role import ControlRole
from lifeboat.core import config as cfgmod
from lifeboat.core import keys, tls
from lifeboat.core import logging as lblog
from lifeboat.repository.open import backend_from_url
from lifeboat.repository.repo import Repository


class _Server:
    def __init__(self, repo) -> None:
        self.repo, self.cache = repo, None


async def run(work: Path, machines: int, heartbeats: int) -> None:
    ca, ca_key = tls.create_ca(str(work / "tls"))
    cert, key = tls.issue_server_cert(ca, ca_key, str(work / "tls"), "server", ["127.0.0.1"])
    passphrase, operator = new_passphrase(), new_token()
    (work / "pass").write_text(passphrase + "\n")
    (work / "op").write_text(operator + "\n")
    repo = await Repository.init(backend_from_url(f"local:{work / 'repo'}"), keys.write_key_file(str(work / "k")))
    cfg = cfgmod.build(cfgmod.ProcessServerConfig, {
        "ingest": {"host": "127.0.0.1", "tls_cert": cert, "tls_key": key, "agent_token_file": str(work / "op")},
        "cache": {"dir": str(work / "cache")}, "repository": {"url": f"local:{work / 'repo'}", "key_file": "x"},
        "control": {"enabled": True, "host": "127.0.0.1", "port": 0, "state_dir": str(work / "control"),
                    "registration_passphrase_file": str(work / "pass"), "operator_credential_file": str(work / "op"),
                    "retention_interval_seconds": 0}})
    role = ControlRole(cfg, CollectorRegistry(), server=_Server(repo))
    await role.start(9443)
    url = f"https://127.0.0.1:{role.port}"
    try:
        async with ApiClient(url, ca, operator) as op, ApiClient(url, ca) as anon:
            t0 = time.perf_counter()
            tokens = []
            for i in range(machines):
                await op.call("PUT", f"/machines/m{i:04d}", {"disks": ["sda", "sdb"]})
                tokens.append((await anon.call("POST", "/register", {"passphrase": passphrase, "kind": "agent",
                                                                     "name": f"m{i:04d}"}))["token"])
            setup = time.perf_counter() - t0
            print(f"protect + register: {machines} machines in {setup:.2f} s ({2 * machines / setup:.0f} calls/s)")

            report = {"state": "replicating", "disks": {f"m0000.{d}": {"tier": "data", "tracker": "digest",
                                                                       "backlog_bytes": 0, "acked_seq": 1,
                                                                       "churn_bytes_per_second": 10.0}
                                                        for d in ("sda", "sdb")}}
            async with ApiClient(url, ca, tokens[0]) as agent:
                lat = []
                for _ in range(heartbeats):
                    t = time.perf_counter()
                    await agent.call("POST", "/machines/m0000/heartbeat", report)
                    lat.append(time.perf_counter() - t)
            print(f"heartbeat, one agent, sequential: {len(lat) / sum(lat):.0f}/s, median "
                  f"{statistics.median(lat) * 1000:.2f} ms, p95 {sorted(lat)[int(len(lat) * 0.95)] * 1000:.2f} ms")

            async def beats(i: int, n: int) -> None:
                r = {"state": "replicating", "disks": {f"m{i:04d}.sda": {"tier": "data", "acked_seq": 1}}}
                async with ApiClient(url, ca, tokens[i]) as c:
                    for _ in range(n):
                        await c.call("POST", f"/machines/m{i:04d}/heartbeat", r)

            agents = min(16, machines)
            t = time.perf_counter()
            await asyncio.gather(*(beats(i, heartbeats // agents) for i in range(agents)))
            el = time.perf_counter() - t
            print(f"heartbeat, {agents} agents concurrently: {agents * (heartbeats // agents) / el:.0f}/s")

            lat = []
            for _ in range(10):
                t = time.perf_counter()
                rows = (await op.call("GET", "/status"))["machines"]
                lat.append(time.perf_counter() - t)
            print(f"status of {len(rows)} machines: median {statistics.median(lat) * 1000:.1f} ms")

        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            await role.machine_of(tokens[1])
        el = time.perf_counter() - t
        print(f"ingest credential check (primary, per batch): {el / n * 1e6:.0f} µs each")
    finally:
        await role.stop()
        await repo.backend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.control_api", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", type=int, default=200)
    ap.add_argument("--heartbeats", type=int, default=500)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    lblog.configure(level="warning", fmt="kv")
    work = Path(tempfile.mkdtemp(prefix="lifeboat-bench-control-"))
    try:
        asyncio.run(run(work, args.machines, args.heartbeats))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
