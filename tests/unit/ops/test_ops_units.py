"""The systemd units: systemd-analyze verify, notify/watchdog settings, and stop budgets vs the code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lifeboat.master_target import main as mt_main
from lifeboat.mobility import main as mobility_main
from lifeboat.process_server import server as ps_server
from ops_helpers import DAEMON_UNITS, UNIT_DIR, parse_unit, require_tool, timespan_seconds

INSTALLED_BIN = "/opt/lifeboat/bin/"
# systemd sends SIGKILL at TimeoutStopSec=; leave room for interpreter exit and scheduling noise.
STOP_MARGIN_SECONDS = 10
BUDGETS = {
    "lifeboat-mobility.service": mobility_main.SHUTDOWN_BUDGET_SECONDS,
    "lifeboat-process-server.service": ps_server.SHUTDOWN_BUDGET_SECONDS,
    "lifeboat-master-target.service": mt_main.SHUTDOWN_BUDGET_SECONDS,
}


def test_unit_set_is_complete():
    assert sorted(p.name for p in UNIT_DIR.iterdir()) == sorted([*DAEMON_UNITS, "lifeboat.target"])


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_stop_budget_fits_timeout_stop_sec(unit):
    service = parse_unit(UNIT_DIR / unit)["Service"]
    timeout = timespan_seconds(service["TimeoutStopSec"][-1])
    assert BUDGETS[unit] + STOP_MARGIN_SECONDS < timeout, (
        f"{unit}: shutdown stages sum to {BUDGETS[unit]} s, + {STOP_MARGIN_SECONDS} s margin must stay "
        f"below TimeoutStopSec={timeout:g} s")


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_notify_watchdog_and_hardening(unit):
    doc = parse_unit(UNIT_DIR / unit)
    service = doc["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert timespan_seconds(service["WatchdogSec"][-1]) >= 30  # pings every WatchdogSec/2
    assert service["Restart"] == ["on-failure"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert service["StateDirectory"], "state goes under /var/lib through StateDirectory="
    assert service["ExecStart"][-1].startswith(INSTALLED_BIN + unit.removesuffix(".service") + " ")
    assert doc["Unit"]["PartOf"] == ["lifeboat.target"] and doc["Install"]["WantedBy"] == ["lifeboat.target"]
    assert "EnvironmentFile" not in service, "secrets come through LoadCredential=, never the environment"


def test_only_the_network_daemon_runs_as_a_dynamic_user():
    assert parse_unit(UNIT_DIR / "lifeboat-process-server.service")["Service"]["DynamicUser"] == ["yes"]
    for unit in ("lifeboat-mobility.service", "lifeboat-master-target.service"):
        text = (UNIT_DIR / unit).read_text()
        assert "DynamicUser" not in parse_unit(UNIT_DIR / unit)["Service"]
        assert "# Exception:" in text, f"{unit} must say why it needs more than the sandbox"


def test_systemd_analyze_verify(tmp_path: Path):
    """Every unit verifies with no output at all: verify exits 0 on unknown keys and bad values."""
    tool = require_tool("systemd-analyze")
    # verify needs ExecStart's binary to exist: point the units at stand-ins in a temporary bin/.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for unit in DAEMON_UNITS:
        stub = bindir / unit.removesuffix(".service")
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    copies = []
    for src in sorted(UNIT_DIR.iterdir()):
        dst = tmp_path / src.name
        dst.write_text(src.read_text().replace(INSTALLED_BIN, f"{bindir}/"))
        copies.append(str(dst))
    proc = subprocess.run([tool, "verify", *copies], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_systemd_analyze_security(unit, tmp_path: Path):
    """The offline exposure score stays where the hardening put it (5 would be "MEDIUM")."""
    tool = require_tool("systemd-analyze")
    proc = subprocess.run([tool, "security", "--offline=true", "--threshold=50", str(UNIT_DIR / unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
