"""Benchmark: a recovery plan's group fails its machines over in parallel; how much that saves.

An in-process configuration-server role (real TLS, SQLite) over a local repository holding one
full-disk point per machine. The same N machines run as one plan group (in parallel) and as N
one-machine groups (in order); the figure is each job's created → finished time (from the jobs
table) and their ratio. Every image's SHA-256 is checked against its source. Asserts nothing about
speed. `python -m bench.plan_parallel [--machines 4] [--mib 64] [--reps 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "unit" / "control"))
from control_helpers import RunningControl  # noqa: E402  (the control plane's own test harness)
from plan_helpers import put_point  # noqa: E402


async def run_plan(op, name: str, groups: list[list[str]], to: str) -> float:
    await op.call("PUT", f"/plans/{name}", {"groups": [{"machines": g} for g in groups]})
    job = await op.call("POST", f"/plans/{name}/run", {"test": True, "point": "latest-processed", "to": to})
    while job["state"] == "running":
        await asyncio.sleep(0.02)
        job = await op.call("GET", f"/jobs/{job['id']}")
    if job["state"] != "succeeded":
        raise RuntimeError(f"plan {name}: {job['error']}")
    return job["finished"] - job["created"]


async def main_async(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="lifeboat-bench-plan-"))
    try:
        control = RunningControl(work)
        server = await control.with_repository()
        await control.start(server=server)
        machines = [f"m{i:02d}" for i in range(args.machines)]
        sources = {}
        for i, m in enumerate(machines):
            data = os.urandom(args.mib * 1024 * 1024 // 2) + bytes(args.mib * 1024 * 1024 // 2)
            sources[m] = await put_point(control.repo, m, "sda", data, f"p-{m}", 1, time.time())
        parallel, serial = [], []
        async with control.operator() as op:
            for m in machines:
                await op.call("PUT", f"/machines/{m}", {"disks": ["sda"]})
            for rep in range(args.reps):
                for kind, groups, out in (("parallel", [machines], parallel),
                                          ("serial", [[m] for m in machines], serial)):
                    to = work / f"{kind}-{rep}"
                    out.append(await run_plan(op, kind, groups, str(to)))
                    for m in machines:
                        [img] = [p for p in to.iterdir() if p.name.startswith(m + ".")]
                        if hashlib.sha256(img.read_bytes()).hexdigest() != sources[m]:
                            raise RuntimeError(f"{img} differs from the source of {m}")
                    shutil.rmtree(to)
        await control.stop()
        await control.repo.backend.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p, s = statistics.median(parallel), statistics.median(serial)
    print(f"{args.machines} machines x {args.mib} MiB, {args.reps} repetitions (median job seconds):")
    print(f"  one group of {args.machines} (parallel): {p:.2f} s")
    print(f"  {args.machines} groups of one (in order): {s:.2f} s")
    print(f"  serial / parallel: {s / p:.2f}x  (every image's SHA-256 = its source)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=4)
    ap.add_argument("--mib", type=int, default=64, help="disk size per machine")
    ap.add_argument("--reps", type=int, default=3)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
