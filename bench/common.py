"""Shared pieces of the `python -m bench` suite: the Lab harness, medians, the result row."""

from __future__ import annotations

import datetime
import os
import re
import statistics
import sys
from dataclasses import dataclass

from .initial_replication import MB, MiB, read_through  # noqa: F401  (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "demo"))
from lab import Lab  # noqa: E402,F401  (demo/lab.py: lifeboat init, process server, agents on 127.0.0.1)

# The agent's defaults (agents/lifeboat/core/config.py): 1 MiB write frames, 16 MiB batches.
# One batch becomes one segment, one file fsynced in the local repository.
CHUNK_BYTES = 1 * MiB
BATCH_BYTES = 16 * MiB
AGENT_POOL_BYTES = 64 * MiB  # tracking.memory_pool_bytes: the agent's configured data pool


__all__ = ["MB", "MiB", "read_through", "Lab", "CHUNK_BYTES", "BATCH_BYTES", "AGENT_POOL_BYTES", "median", "Row",
           "HEADER", "format_table", "not_measured", "agents_ready_wall"]

_READY_RE = re.compile(r"timestamp='([^']+)' level='info' event='agent ready' MACHINE='([^']+)'")


def agents_ready_wall(lab: Lab, machines: set[str], after_wall: float) -> dict[str, float]:
    """Wall-clock time each machine's agent logged 'agent ready' (READY=1: imports done, disks reconciled
    with the process server) after `after_wall`, from the lab's daemon log.

    Throughput figures are timed from here, not from the process start: a resident agent pays its
    Python start-up once per boot, and the same-run ceilings run in the already started bench process.
    The start-up is reported as its own figure."""
    out: dict[str, float] = {}
    with open(lab.log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _READY_RE.search(line)
            if m and m.group(2) in machines:
                ts = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                if ts >= after_wall:
                    out.setdefault(m.group(2), ts)
    missing = machines - out.keys()
    if missing:
        raise RuntimeError(f"no 'agent ready' line for {sorted(missing)} in {lab.log_path}")
    return out


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class Row:
    """One line of the table. `higher_is_better` decides how ratio is compared with the goal."""
    figure: str
    lifeboat: str
    reference: str
    ratio: float | None
    goal: str
    ok: bool | None  # None: not measured / not applicable
    note: str = ""

    def cells(self) -> list[str]:
        status = {True: "pass", False: "FAIL", None: "—"}[self.ok]
        if self.note and self.ok is None:
            status = self.note
        return [self.figure, self.lifeboat, self.reference,
                "—" if self.ratio is None else f"{self.ratio:.2f}", self.goal, status]


HEADER = ["figure", "Lifeboat", "reference", "ratio", "goal", "pass/fail"]


def format_table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]

    def line(c: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"

    out = [line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r.cells()) for r in rows]
    return "\n".join(out)


def not_measured(figure: str, goal: str, reason: str) -> Row:
    return Row(figure, "not measured", "—", None, goal, None, f"not measured: {reason}")
