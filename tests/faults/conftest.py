"""Fault-scenario fixtures: the CI summary line (fault scenarios: N run, D divergent images, L lost points)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preconditions import RESULTS  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS:
        return
    divergent = sum(len(r.divergent) for r in RESULTS)
    lost = sum(len(r.lost) for r in RESULTS)
    points = sum(r.verified for r in RESULTS)
    by_fault = sorted({r.scenario.fault for r in RESULTS})
    terminalreporter.section("fault scenarios")
    for r in RESULTS:
        terminalreporter.write_line(r.line())
    terminalreporter.write_line(
        f"fault scenarios: {len(RESULTS)} run, {divergent} divergent images, {lost} lost acknowledged points "
        f"({points} points recovered bit-exact; {len(by_fault)} fault types; "
        f"{sum(not r.ok for r in RESULTS)} scenarios failed)")
