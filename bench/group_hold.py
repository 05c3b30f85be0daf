"""Benchmark: the hold window of a three-member consistency group on one host.

Three agents (tracepoint tracker, reflink snapshots, ext4 on loop devices with a writer each) in
one group on loopback; the coordinator runs a round every --interval seconds for --rounds rounds.
The hold window of a round is the first member's freeze to the last member's thaw, as the
coordinator measures it (lifeboat_group_hold_seconds; the per-round values come from its log).
Prints p50/p99/max and the histogram's count and sum; asserts nothing about speed. Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from grouplab import MEMBERS, three_member_group  # noqa: E402
from lab import Lab  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--interval", type=float, default=1.5)
    ap.add_argument("--rate", type=float, default=4e6, help="each writer's bytes per second")
    ap.add_argument("--disk-mib", type=int, default=96)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/group_hold.py needs root (loop devices, mount, tracefs)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lifeboat-bench-group-") as tmp:
        lab = Lab(Path(tmp) / "lab")
        try:
            with three_member_group(lab, Path(tmp), args.disk_mib, args.rate) as group:
                agents = [group.start(m, interval_seconds=args.interval) for m in MEMBERS]
                try:
                    group.wait_group_points(args.rounds, timeout=args.rounds * (args.interval + 10) + 60)
                    metrics = group.metrics("app01")
                finally:
                    for a in agents:
                        a.terminate()
                    for a in agents:
                        a.wait(60)
                log = lab.log_path.read_text()
        finally:
            lab.close()
    holds = [float(x) for x in re.findall(r"event='group round marked'.*?hold_ms=([0-9.]+)", log)]
    aborted = log.count("group round aborted: every member thaws")
    count = re.search(r"^lifeboat_group_hold_seconds_count (\S+)$", metrics, re.M).group(1)
    total = re.search(r"^lifeboat_group_hold_seconds_sum (\S+)$", metrics, re.M).group(1)
    print(f"three members, {args.rate / 1e6:g} MB/s random writes each, {args.disk_mib} MiB ext4 disks, "
          f"round every {args.interval:g} s")
    print(f"rounds marked {len(holds)}, aborted {aborted}")
    print(f"hold window ms: p50 {percentile(holds, 50):.1f}  p99 {percentile(holds, 99):.1f}  max {max(holds):.1f}")
    print(f"exported lifeboat_group_hold_seconds: count {count}, sum {float(total):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
