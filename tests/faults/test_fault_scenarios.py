"""Seeded fault scenarios in CI: every fault type under two seeds; every point recovered bit-exact."""

from __future__ import annotations

import pytest

from conftest import RESULTS, require_for
from scenarios import FAULTS, make_scenario, run_scenario

CI_SEEDS = (1, 2)


@pytest.mark.parametrize("seed", CI_SEEDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_scenario(fault, seed, tmp_path):
    require_for(fault)
    result = run_scenario(make_scenario(seed, fault), tmp_path / "scenario", keep=True)
    RESULTS.append(result)
    assert result.faults_applied >= 1, f"the fault never landed: {result.line()}"
    assert result.ok, result.line() + f"\n(see {tmp_path / 'scenario' / 'lab' / 'daemons.log'})"
    assert result.verified >= len(result.acknowledged) >= 1, result.line()
