"""Fixtures for integration tests: a Lab (real daemons on loopback) and deterministic disk images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "demo"))
from lab import Lab  # noqa: E402


@pytest.fixture
def lab(tmp_path: Path):
    """A fresh deployment on a local-directory repository (the process server is not started)."""
    deployment = Lab(tmp_path / "lab")
    yield deployment
    deployment.close()


@pytest.fixture
def control_lab(tmp_path: Path):
    """A deployment whose process server runs the configuration-server role (not started yet)."""
    deployment = Lab(tmp_path / "lab", control=True)
    yield deployment
    deployment.close()
