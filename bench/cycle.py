"""Benchmark: continuous replication of a busy filesystem — freeze window, cycle time and RPO.

Builds ext4 on a loop device whose backing image lives on a loop-mounted reflink XFS (the same
set-up as the tracking integration tests), starts a process server on a local-directory
repository and a writer doing random 64 KiB writes at --rate into a file on the ext4, then runs
the agent (tracepoint tracker, reflink snapshots, filesystem freeze) for --seconds at each
--interval. Measures:
  freeze window   first FIFREEZE to last FITHAW of each cycle (agent log, freeze_ms)
  cycle time      freeze to the last batch acknowledged (agent log, seconds)
  RPO             now - capture time of the newest point the process server has made durable
                  (lifeboat_ps_last_point_timestamp_seconds), sampled every 0.25 s
Then test-fails-over the newest point of each run and compares it with its reflink clone.
Prints figures; asserts nothing about speed. Needs root. Exit status non-zero only on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from blockdev import sha256, start_writer, stop, tracked_ext4  # noqa: E402
from lab import Lab, sha256_file  # noqa: E402

WRITE_BYTES = 64 * 1024


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_interval(work: Path, interval: float, seconds: float, rate: float, disk_mib: int) -> dict:
    work.mkdir(parents=True)
    with tracked_ext4(work, disk_mib, xfs_mib=disk_mib * 3) as disk:
        lab = Lab(work / "lab")
        try:
            lab.start_ps()
            data_bytes = disk_mib * 3 // 4 << 20
            writer = start_writer(disk.mountpoint / "data.bin", data_bytes, rate, seed=1, write_bytes=WRITE_BYTES)
            time.sleep(1.0)  # the writer has allocated its file
            extra = {"replication": {"interval_seconds": interval},
                     "tracking": {"tracker": "tracepoint"},
                     "snapshot": {"providers": ["reflink"], "dir": str(disk.snapshot_dir), "keep": 2}}
            agent = lab.start_agent("bench", {"sda": disk.device}, extra=extra)
            rpo: list[float] = []
            t_end = time.monotonic() + seconds
            try:
                while time.monotonic() < t_end:
                    if agent.poll() is not None:
                        raise RuntimeError(f"agent exited with {agent.returncode}; see {lab.log_path}")
                    newest = lab.ps_metrics().get('lifeboat_ps_last_point_timestamp_seconds{disk="bench.sda"}')
                    if newest:
                        rpo.append(time.time() - newest)
                    time.sleep(0.25)
            finally:
                stop(writer)
                agent.terminate()
                agent.wait(60)
            lines = [ln for ln in lab.log_path.read_text().splitlines() if "cycle complete" in ln]

            def values(name: str) -> list[float]:
                return [float(m.group(1)) for ln in lines if (m := re.search(rf"\b{name}=([0-9.]+)", ln))]

            freeze_ms, cycle_s, read = values("freeze_ms"), values("seconds"), values("read_bytes")
            phases: dict[str, list[float]] = {}
            for ln in lines[1:]:
                if m := re.search(r"capture_ms='([^']*)'", ln):
                    for part in m.group(1).split():
                        name, _, ms = part.partition(":")
                        phases.setdefault(name, []).append(float(ms))
            # The newest point must equal its clone (the agent keeps the last two).
            newest = lab.wait_points(len(lines))[-1]
            out = work / "recovered.img"
            res = lab.failover(newest["point_id"], out)
            ok = res.returncode == 0 and sha256_file(out) == sha256(disk.snapshot_dir / f"bench.sda.{newest['point_id']}.snap")
            out.unlink(missing_ok=True)
            return {"interval": interval, "cycles": len(lines), "freeze_ms": freeze_ms[1:], "cycle_s": cycle_s[1:],
                    "read_mb": [r / 1e6 for r in read[1:]], "rpo": rpo, "verified": ok, "phases": phases}
        finally:
            lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=20e6, help="writer bytes per second (default 20 MB/s)")
    ap.add_argument("--intervals", default="5,30", help="cycle intervals in seconds, comma-separated")
    ap.add_argument("--seconds", type=float, default=0, help="measured time per interval (default 4 × interval, "
                    "at least 60 s)")
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="interval 5 s only, 30 s, 512 MiB disk")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cycle.py needs root (loop devices, mount, tracefs)", file=sys.stderr)
        return 2
    intervals = [5.0] if args.quick else [float(x) for x in args.intervals.split(",")]
    disk_mib = 512 if args.quick else args.disk_mib
    results = []
    with tempfile.TemporaryDirectory(prefix="lifeboat-bench-cycle-") as tmp:
        for i, interval in enumerate(intervals):
            seconds = args.seconds or (30 if args.quick else max(60, 4 * interval))
            print(f"== interval {interval:g} s: {seconds:g} s of {args.rate / 1e6:g} MB/s random "
                  f"{WRITE_BYTES // 1024} KiB writes on a {disk_mib} MiB ext4", flush=True)
            results.append(run_interval(Path(tmp) / f"run{i}", interval, seconds, args.rate, disk_mib))
    print()
    print(f"{'interval':>8} {'cycles':>6} {'freeze p50':>10} {'freeze p99':>10} {'cycle p50':>9} {'cycle p99':>9} "
          f"{'read/cycle':>10} {'RPO p50':>8} {'RPO p99':>8} {'goal RPO p99':>12} {'verified':>8}")
    failed = 0
    for r in results:
        goal = 2 * r["interval"] + 5
        print(f"{r['interval']:>7g}s {r['cycles']:>6} {percentile(r['freeze_ms'], 50):>8.1f}ms "
              f"{percentile(r['freeze_ms'], 99):>8.1f}ms {percentile(r['cycle_s'], 50):>8.2f}s "
              f"{percentile(r['cycle_s'], 99):>8.2f}s {statistics.fmean(r['read_mb'] or [0]):>8.1f}MB "
              f"{percentile(r['rpo'], 50):>7.1f}s {percentile(r['rpo'], 99):>7.1f}s {goal:>11g}s "
              f"{'OK' if r['verified'] else 'FAIL':>8}")
        failed += not r["verified"]
    for r in results:
        print(f"capture steps at {r['interval']:g} s, median ms: " +
              ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in r["phases"].items()))
    print("\nfreeze goal: p99 <= 100 ms with reflink; RPO goal: p99 <= 2 x interval + 5 s "
          "(first, full cycle excluded from freeze/cycle/read figures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
