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


@pytest.fixture
async def control_repo(tmp_path):
    """A running role whose process server has a (real, local) repository open: status and failover work."""
    rc = RunningControl(tmp_path)
    server = await rc.with_repository()
    await rc.start(server=server)
    yield rc
    await rc.stop()
    await rc.repo.backend.close()
