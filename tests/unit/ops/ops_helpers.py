"""Helpers for the operations tests: unit files, and Debian tools that CI must have."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
UNIT_DIR = REPO_ROOT / "systemd"
DAEMON_UNITS = ("lifeboat-mobility.service", "lifeboat-process-server.service", "lifeboat-master-target.service")
_SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?")
_SPAN_UNITS = {"ms": 0.001, None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def require_tool(name: str) -> str:
    """Path of a Debian tool; skip without it, unless LIFEBOAT_REQUIRE_TOOLS=1 (CI) forbids the skip."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} not found (install the Debian package .ci/run lists for it)"
    if os.environ.get("LIFEBOAT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}; LIFEBOAT_REQUIRE_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {line!r} before any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan_seconds(text: str) -> float:
    """systemd.time(7) spans as used in our units: '60s', '10min', '1min 30s'."""
    total, pos = 0.0, 0
    for m in _SPAN_RE.finditer(text):
        assert text[pos:m.start()].strip() == "", f"cannot parse time span {text!r}"
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2)]
        pos = m.end()
    assert text[pos:].strip() == "" and pos, f"cannot parse time span {text!r}"
    return total
