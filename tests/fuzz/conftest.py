"""Fuzz suite settings: a fixed, derandomized budget so CI runs the same examples every time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
# "ci": what .ci/run and ./scripts/test run (derandomized: a failure reproduces on every machine).
settings.register_profile("ci", max_examples=150, derandomize=True, print_blob=True, **_COMMON)
# "deep": for a long local run, LIFEBOAT_FUZZ_PROFILE=deep ./scripts/test tests/fuzz
settings.register_profile("deep", max_examples=5000, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("LIFEBOAT_FUZZ_PROFILE", "ci"))
