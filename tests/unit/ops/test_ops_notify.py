"""sd_notify and the watchdog, against a datagram socket the test owns, as systemd's would be."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifeboat.core import sd_notify
from lifeboat.core.watchdog import StallDetector, ping_while_progressing
from ops_helpers import REPO_ROOT, UNIT_DIR, parse_unit, timespan_seconds

sys.path.insert(0, str(REPO_ROOT / "demo"))
from lab import Lab, bin_path  # noqa: E402

WATCHDOG_USEC = 400_000  # pings every 0.2 s: quick to observe


class NotifySocket:
    """An AF_UNIX datagram socket like systemd's $NOTIFY_SOCKET, recording (time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[tuple[float, str]] = []

    def wait_for(self, message: str, timeout: float) -> float:
        """Receive until `message` arrives; returns when it did (monotonic)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            now = time.monotonic()
            for line in data.splitlines():
                self.seen.append((now, line))
            if message in data.splitlines():
                return now
        raise AssertionError(f"no {message!r} within {timeout} s; got {[m for _, m in self.seen]}")

    def drain(self) -> None:
        """Forget what has queued up, so that the next wait_for sees only new messages."""
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(4096):
                self.seen.append((time.monotonic(), data.decode()))
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False


def test_watchdog_seconds_follows_sd_watchdog_enabled(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sd_notify.watchdog_seconds() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_seconds() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sd_notify.watchdog_seconds() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sd_notify.watchdog_seconds() is None


def test_stall_detector_idle_is_never_stalled():
    now = [0.0]
    d = StallDetector(10, clock=lambda: now[0])
    assert d.check(False, None) is None
    now[0] = 100
    assert d.check(False, None) is None           # nothing to do for a long time: fine
    assert d.check(True, (1, 0)) is None          # work appears
    now[0] = 105
    assert d.check(True, (1, 0)) is None          # not yet past the limit
    now[0] = 111
    assert d.check(True, (1, 0)) == pytest.approx(11)
    assert d.check(True, (2, 0)) is None          # it moved
    now[0] = 200
    assert d.check(True, (2, 0)) == pytest.approx(89)


async def test_pings_stop_while_stalled_and_resume(monkeypatch, notify_socket: NotifySocket):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    state = {"ok": True}
    task = asyncio.create_task(ping_while_progressing(lambda: (state["ok"], "test says stalled")))
    notify_socket.sock.setblocking(False)

    def drain() -> int:
        n = 0
        while True:
            try:
                n += notify_socket.sock.recv(64) == b"WATCHDOG=1"
            except BlockingIOError:
                return n
    try:
        await asyncio.sleep(0.3)
        assert drain() >= 3
        state["ok"] = False
        await asyncio.sleep(0.06)  # a ping already under way may still land
        drain()
        await asyncio.sleep(0.3)
        assert drain() == 0
        state["ok"] = True
        await asyncio.sleep(0.3)
        assert drain() >= 3
    finally:
        task.cancel()


def test_process_server_ready_watchdog_stopping(tmp_path: Path, notify_socket: NotifySocket):
    """The real daemon: READY=1 once its cache is recovered and listeners are bound, WATCHDOG=1
    while it runs, STOPPING=1 on SIGTERM, and exit well within the unit's TimeoutStopSec=."""
    timeout_stop = timespan_seconds(
        parse_unit(UNIT_DIR / "lifeboat-process-server.service")["Service"]["TimeoutStopSec"][-1])
    lab = Lab(tmp_path / "lab")
    try:
        env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        conf = lab.ps_config()
        proc = subprocess.Popen([bin_path("lifeboat-process-server"), "-c", str(conf)], stderr=lab.log,
                                env={**os.environ, **env})
        try:
            notify_socket.wait_for("READY=1", 30)
            # READY=1 promises bound sockets: the data port accepts at once.
            with socket.create_connection(("127.0.0.1", lab.ps_port), timeout=1):
                pass
            notify_socket.wait_for("WATCHDOG=1", 5)
            notify_socket.wait_for("WATCHDOG=1", 5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            notify_socket.wait_for("STOPPING=1", 5)
            assert proc.wait(timeout_stop) == 0
            took = time.monotonic() - t0
            assert took < timeout_stop, f"stopped after {took:.1f} s, TimeoutStopSec={timeout_stop:g}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        messages = [m for _, m in notify_socket.seen]
        assert messages.index("READY=1") < messages.index("WATCHDOG=1") < messages.index("STOPPING=1")
    finally:
        lab.close()


def test_agent_ready_after_reconcile_watchdog_stopping(tmp_path: Path, notify_socket: NotifySocket):
    """The agent: READY=1 after it reconciled its disk with the process server, WATCHDOG=1 while
    cycles run, STOPPING=1 on SIGTERM and exit within the unit's TimeoutStopSec=."""
    timeout_stop = timespan_seconds(
        parse_unit(UNIT_DIR / "lifeboat-mobility.service")["Service"]["TimeoutStopSec"][-1])
    lab = Lab(tmp_path / "lab")
    ps_socket = NotifySocket(tmp_path / "ps-notify.sock")
    try:
        # The process server runs with its watchdog too: its probe sees real uploads.
        lab.ps_proc = subprocess.Popen(
            [bin_path("lifeboat-process-server"), "-c", str(lab.ps_config())], stderr=lab.log,
            env={**os.environ, "NOTIFY_SOCKET": ps_socket.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        ps_socket.wait_for("READY=1", 30)
        disk = tmp_path / "disk0.img"
        disk.write_bytes(os.urandom(1 << 20))
        proc = lab.start_agent("notify", {"disk0": str(disk)},
                               env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        try:
            notify_socket.wait_for("READY=1", 60)
            notify_socket.wait_for("WATCHDOG=1", 10)
            lab.wait_points(1, timeout=60)   # cycles complete while it pings
            notify_socket.wait_for("WATCHDOG=1", 10)
            ps_socket.drain()
            ps_socket.wait_for("WATCHDOG=1", 10)   # still pinging once segments were uploaded
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            notify_socket.wait_for("STOPPING=1", 5)
            assert proc.wait(timeout_stop) == 0
            assert time.monotonic() - t0 < timeout_stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        lab.close()
        ps_socket.close()
    assert "watchdog probe failed" not in lab.log_path.read_text()
    assert "withholding watchdog pings" not in lab.log_path.read_text()


def test_process_server_reloads_on_sighup(tmp_path: Path, notify_socket: NotifySocket):
    """SIGHUP: RELOADING=1, the log level applied live, other changes reported as needing a
    restart, READY=1; a broken file is refused and the daemon runs on with its configuration."""
    lab = Lab(tmp_path / "lab")
    try:
        conf = lab.ps_config()
        proc = subprocess.Popen([bin_path("lifeboat-process-server"), "-c", str(conf)], stderr=lab.log,
                                env={**os.environ, "NOTIFY_SOCKET": notify_socket.path})
        try:
            notify_socket.wait_for("READY=1", 30)
            lab.ps_config({"log": {"level": "debug"}, "cache": {"max_bytes": 1 << 29}})
            notify_socket.drain()
            proc.send_signal(signal.SIGHUP)
            notify_socket.wait_for("RELOADING=1", 10)
            notify_socket.wait_for("READY=1", 10)
            conf.write_text("[ingest\n")   # not TOML
            proc.send_signal(signal.SIGHUP)
            notify_socket.wait_for("RELOADING=1", 10)
            notify_socket.wait_for("READY=1", 10)
            assert proc.poll() is None
            with socket.create_connection(("127.0.0.1", lab.ps_port), timeout=1):
                pass
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        messages = [m for _, m in notify_socket.seen]
        assert any(m.startswith("MONOTONIC_USEC=") for m in messages)
        log = lab.log_path.read_text()
        assert "event='configuration reloaded'" in log and "log_level='debug'" in log and "needs_restart='cache'" in log
        assert "event='configuration reload refused: the running configuration is kept'" in log
    finally:
        lab.close()
