"""CI smoke run of the benchmark suite (`python -m bench --quick --smoke`): it must keep running and print
its table with a row per figure. No assertion on speed: the figures are not checked, only that they exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FIGURES = [
    "initial replication",
    "agent start-up",
    "failover --test materialisation",
    "RTO to a local image",
    "vs restic backup",
    "process server peak RSS",
    "agent peak RSS",
    "delta: 1% 64 KiB churn",
    "Azurite vs plain blob upload",
    "RPO under churn",
    "PS peak RSS, 8 agents",
    "scaling 1/4/16 disks",
    "failover time as the log grows",
]


def test_bench_quick_smoke_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--smoke", "--work", str(tmp_path / "bench")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["figure", "Lifeboat", "reference", "ratio", "goal", "pass/fail"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == 6 for r in rows)
    names = [r[0] for r in rows]
    for figure in FIGURES:
        assert sum(name.startswith(figure) for name in names) == 1, (figure, names)
    assert len(rows) == len(FIGURES)
    # Every row either has a result (pass/FAIL) or says why there is none.
    for r in rows:
        assert r[5] in ("pass", "FAIL") or r[5].startswith(("not measured", "n/a", "—")), r
