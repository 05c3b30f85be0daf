"""Fault-scenario fixtures: preconditions (root, libfaketime, Azurite) and the CI summary line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from azurite_proc import find_azurite  # noqa: E402
from scenarios import AZURE_FAULTS, LIBFAKETIME, Result  # noqa: E402

RESULTS: list[Result] = []


def _skip_or_fail(what: str, reason: str) -> None:
    """Skip, unless CI set LIFEBOAT_REQUIRE_<what>=1 to forbid the skip."""
    if os.environ.get(f"LIFEBOAT_REQUIRE_{what}") == "1":
        pytest.fail(f"{reason} (LIFEBOAT_REQUIRE_{what}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def require_for(fault: str) -> None:
    if fault in AZURE_FAULTS and find_azurite() is None:
        _skip_or_fail("AZURITE", "Azurite not found: run ./scripts/setup, or set LIFEBOAT_AZURITE")
    if fault == "cache_full" and os.geteuid() != 0:
        _skip_or_fail("ROOT_TESTS", "the full-cache scenario loop-mounts a small filesystem: needs root")
    if fault == "clock_jump" and not os.path.exists(LIBFAKETIME):
        _skip_or_fail("TOOLS", f"{LIBFAKETIME} missing: apt-get install faketime")


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
