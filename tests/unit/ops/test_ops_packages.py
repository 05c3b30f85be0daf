"""The .deb packages: build once, inspect, install with dpkg -i, run from the installed paths, purge.

Installing touches the machine (/opt/lifeboat, /etc/lifeboat, a `lifeboat` system user), so this
runs only where LIFEBOAT_PACKAGE_TESTS=1 says that is wanted (.ci/run sets it).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from lifeboat import __version__
from ops_helpers import DAEMON_UNITS, REPO_ROOT, parse_unit, require_tool

DAEMONS = tuple(u.removesuffix(".service").removeprefix("lifeboat-") for u in DAEMON_UNITS)
PACKAGES = ("lifeboat", *(f"lifeboat-{d}" for d in DAEMONS))
BUILD_TIMEOUT_SECONDS = 900
CREDENTIAL_RE = re.compile(r'^\w+ = "%d/([^"/]+)"', re.MULTILINE)  # set keys only, not comments

pytestmark = pytest.mark.skipif(os.environ.get("LIFEBOAT_PACKAGE_TESTS") != "1",
                                reason="installs packages on this machine: set LIFEBOAT_PACKAGE_TESTS=1 (CI does)")


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four packages, built once for this test session."""
    require_tool("dpkg-deb")
    require_tool("python3.11")
    out = tmp_path_factory.mktemp("debs")
    run(str(REPO_ROOT / "packaging" / "build-debs"), str(out), timeout=BUILD_TIMEOUT_SECONDS)
    found = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    assert sorted(found) == sorted(PACKAGES)
    return found


@pytest.fixture(scope="module")
def installed(debs: dict[str, Path]):
    """The packages installed with dpkg -i; purged afterwards (and the purge is checked)."""
    if os.geteuid() != 0:
        pytest.skip("dpkg -i needs root")
    for name in PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "installed" in status.stdout and "not-installed" not in status.stdout:
            pytest.fail(f"{name} is already installed here; this test would replace it", pytrace=False)
    run("dpkg", "-i", *map(str, debs.values()))
    try:
        yield
    finally:
        run("dpkg", "--purge", *PACKAGES)
    assert not Path("/opt/lifeboat").exists(), "purge left /opt/lifeboat behind"
    assert not Path("/etc/lifeboat").exists(), "purge left /etc/lifeboat behind"


def test_package_metadata_and_contents(debs: dict[str, Path]):
    for name, deb in debs.items():
        fields = run("dpkg-deb", "-f", str(deb), "Version", "Depends").stdout
        assert f"Version: {__version__}" in fields
        listing = run("dpkg-deb", "-c", str(deb)).stdout
        assert "__pycache__" not in listing and "/tmp/" not in listing
        assert all(line.split()[1] == "root/root" for line in listing.splitlines())
        if name != "lifeboat":
            assert f"Depends: lifeboat (= {__version__})" in fields
            assert f"./lib/systemd/system/{name}.service" in listing
            conffiles = run("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
            assert conffiles == [f"/etc/lifeboat/{name.removeprefix('lifeboat-')}.toml"]
    assert "./lib/systemd/system/lifeboat.target" in run("dpkg-deb", "-c", str(debs["lifeboat"])).stdout


@pytest.mark.usefixtures("installed")
def test_installed_cli_and_daemons_run():
    assert run("/usr/bin/lifeboat", "--version").stdout.strip() == f"lifeboat {__version__}"
    assert run("/opt/lifeboat/bin/lifeboat", "--version").stdout.strip() == f"lifeboat {__version__}"
    for d in DAEMONS:
        exe = f"/opt/lifeboat/bin/lifeboat-{d}"
        assert run(exe, "--version").stdout.strip() == f"lifeboat-{d} {__version__}"
        assert run(exe, "--check-config", "-c", f"/etc/lifeboat/{d}.toml").stdout.strip().endswith(": OK")
    assert run("getent", "passwd", "lifeboat").stdout.startswith("lifeboat:")


@pytest.mark.usefixtures("installed")
def test_installed_configs_name_only_loaded_credentials():
    """Every "%d/<id>" in a shipped config is a LoadCredential= id of its unit, and vice versa."""
    for d in DAEMONS:
        used = set(CREDENTIAL_RE.findall(Path(f"/etc/lifeboat/{d}.toml").read_text()))
        unit = parse_unit(Path(f"/lib/systemd/system/lifeboat-{d}.service"))["Service"]
        loaded = {v.split(":", 1)[0] for v in unit.get("LoadCredential", [])}
        assert used == loaded, f"lifeboat-{d}: config uses {sorted(used)}, unit loads {sorted(loaded)}"


@pytest.mark.usefixtures("installed")
def test_installed_units_verify():
    """With the real ExecStart binaries in place, systemd-analyze verify has nothing to say."""
    tool = require_tool("systemd-analyze")
    units = [f"/lib/systemd/system/lifeboat-{d}.service" for d in DAEMONS] + ["/lib/systemd/system/lifeboat.target"]
    proc = subprocess.run([tool, "verify", *units], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout


class Container:
    """A real systemd booted by systemd-nspawn on this machine's /usr (ARCHITECTURE.md), driven with nsenter."""

    BOOT_TIMEOUT_SECONDS = 60
    # First boot with an empty /etc applies presets, which enable every unit: keep out those that
    # would only fail here (no network to wait for, no config) and lifeboat.target, which would
    # start the process server before its repository exists.
    MASKED = ("systemd-firstboot.service", "systemd-networkd-wait-online.service", "prometheus.service",
              "lifeboat-mobility.service", "lifeboat-master-target.service", "lifeboat.target")

    def __init__(self, log: Path) -> None:
        self.log = open(log, "wb")
        cmd = [require_tool("systemd-nspawn"), "-D", "/", "--volatile=yes", "-b", "--register=no", "--keep-unit",
               "--console=pipe", "--private-network", "--bind-ro=/opt/lifeboat",
               *(f"systemd.mask={u}" for u in self.MASKED)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.leader = self._wait_booted()

    def _wait_booted(self) -> int:
        deadline = time.monotonic() + self.BOOT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited with {self.proc.returncode}"
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for pid in children:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    state = self.run("systemctl", "is-system-running", check=False, leader=int(pid)).stdout.strip()
                    if state in ("running", "degraded"):
                        return int(pid)
            time.sleep(0.5)
        raise AssertionError(f"the container did not boot within {self.BOOT_TIMEOUT_SECONDS} s")

    def run(self, *cmd: str, check: bool = True, stdin: str | None = None, leader: int | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        full = ["nsenter", "-t", str(leader or self.leader), "-a", *cmd]
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        return proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()   # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


@pytest.mark.usefixtures("installed")
def test_process_server_runs_under_the_hardened_unit_in_a_real_systemd(tmp_path: Path):
    """Boot systemd in a container, set the process server up as an operator would (lifeboat
    init, the packaged config), `systemctl start` it under the packaged unit: active, sandboxed,
    its log lines in the journal, and a clean stop."""
    container = Container(tmp_path / "nspawn.log")
    unit = "lifeboat-process-server.service"
    try:
        c = container.run
        c("/opt/lifeboat/bin/lifeboat", "init", "--dir", "/etc/lifeboat",
          "--repo", "local:/var/lib/lifeboat/repository")
        c("sh", "-c", "cat > /etc/lifeboat/process-server.toml",
          stdin=Path("/etc/lifeboat/process-server.toml").read_text())
        c("systemctl", "start", unit)   # Type=notify: returns once READY=1 arrived
        assert c("systemctl", "is-active", unit).stdout.strip() == "active"
        pid = c("systemctl", "show", "-P", "MainPID", unit).stdout.strip()
        status = c("cat", f"/proc/{pid}/status").stdout
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))
        assert uid != 0, "the process server must run as its dynamic user"
        assert re.search(r"^NoNewPrivs:\s+1", status, re.MULTILINE)
        assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE)
        journal = c("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
        assert "process server ready" in journal, journal
        c("systemctl", "stop", unit)
        assert c("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
        journal = c("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
        assert "event='stopped'" in journal, journal   # the graceful path ran to its end
    finally:
        container.close()
