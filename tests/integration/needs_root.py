"""Skip a test that needs root (loop devices, mount, tracefs), or fail it where it must run (CI)."""

from __future__ import annotations

import os

import pytest


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":
        pytest.fail("these tests need root (loop devices, mount, tracefs)", pytrace=False)
    pytest.skip("needs root: loop devices, mount, tracefs")
