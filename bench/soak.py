"""Seeded soak: run random fault scenarios (tests/faults) until time is up; print each result and the totals.

    python bench/soak.py --minutes 30 --seed 7 [--work DIR] [--faults tcp_cut,kill_agent]

Each scenario's fault and seed come from Random(--seed), so a run can be repeated; a failed
scenario's work directory (daemon logs, images) is kept under --work for inspection.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
from scenarios import FAULTS, make_scenario, run_scenario  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True, help="start no new scenario after this long")
    ap.add_argument("--seed", type=int, default=1, help="seed of the scenario sequence")
    ap.add_argument("--work", default="", help="where scenarios run (default: a new temp dir)")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault types to draw from")
    args = ap.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        ap.error(f"unknown fault types {unknown}: choose from {', '.join(FAULTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="lifeboat-soak-"))
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    totals = {"run": 0, "failed": 0, "divergent": 0, "lost": 0, "points": 0, "acknowledged": 0}
    per_fault: dict[str, int] = {}
    print(f"soak: seed {args.seed}, {args.minutes} min, faults {', '.join(faults)}, work {work}", flush=True)
    stop = []  # SIGINT/SIGTERM: finish the running scenario (its cleanup included), then the totals
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    while time.monotonic() < deadline and not stop:
        n = totals["run"] + 1
        scenario = make_scenario(rng.randrange(1, 1 << 31), rng.choice(faults))
        result = run_scenario(scenario, work / f"{n:04d}-{scenario.name}")
        totals["run"] = n
        totals["failed"] += not result.ok
        totals["divergent"] += len(result.divergent)
        totals["lost"] += len(result.lost)
        totals["points"] += result.verified
        totals["acknowledged"] += len(result.acknowledged)
        per_fault[scenario.fault] = per_fault.get(scenario.fault, 0) + 1
        print(f"[{n:4d} {time.monotonic() - t0:7.1f}s] {result.line()}", flush=True)
    print("soak: per fault type: " + ", ".join(f"{f}={c}" for f, c in sorted(per_fault.items())))
    print(f"soak totals: {totals['run']} scenarios run in {(time.monotonic() - t0) / 60:.1f} min, "
          f"{totals['failed']} failed, {totals['divergent']} divergent images, {totals['lost']} lost acknowledged "
          f"points, {totals['points']} points recovered bit-exact of {totals['acknowledged']} acknowledged")
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
