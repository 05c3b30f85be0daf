"""Fixtures of the control-plane unit tests: a running configuration-server role."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from control_helpers import RunningControl  # noqa: E402


@pytest.fixture
async def control(tmp_path):
    rc = RunningControl(tmp_path)
    await rc.start()
    yield rc
    await rc.stop()
