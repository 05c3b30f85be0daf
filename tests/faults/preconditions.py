"""What the fault scenarios need (root, libfaketime, Azurite), and the results the CI summary line counts."""

from __future__ import annotations

import os

import pytest

from azurite_proc import find_azurite
from scenarios import AZURE_FAULTS, LIBFAKETIME, Result

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
