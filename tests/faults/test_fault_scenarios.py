"""Seeded fault scenarios in CI: every fault type, 22 scenarios; every point recovered bit-exact."""

from __future__ import annotations

import re

import pytest

from preconditions import RESULTS, require_for
from scenarios import AZURE_FAULTS, FAULTS, make_scenario, run_scenario

# Two seeds per fault type; one for the storage faults (each costs an Azure failover per point,
# ~2x a local one), except cache_full, whose seed parity picks ENOSPC (odd) or cache.max_bytes (even).
# 22 scenarios: about 6 minutes on a busy 2-core machine. bench/soak.py runs many more.
CI_SCENARIOS = [(fault, seed) for fault in FAULTS
                for seed in ((1,) if fault in AZURE_FAULTS and fault != "cache_full" else (1, 2))]


@pytest.mark.parametrize(("fault", "seed"), CI_SCENARIOS)
def test_fault_scenario(fault, seed, tmp_path, request):
    require_for(fault)
    port = 0
    if fault in AZURE_FAULTS and fault != "azurite_restart":  # the session's Azurite saves a start
        port = int(re.search(r"127\.0\.0\.1:(\d+)", request.getfixturevalue("azurite")).group(1))
    result = run_scenario(make_scenario(seed, fault, quick=True), tmp_path / "scenario", keep=True,
                          shared_azurite_port=port)
    RESULTS.append(result)
    assert result.faults_applied >= 1, f"the fault never landed: {result.line()}"
    assert result.ok, result.line() + f"\n(see {tmp_path / 'scenario' / 'lab' / 'daemons.log'})"
    assert result.verified >= len(result.acknowledged) >= 1, result.line()
