"""`lifeboat machine add --ssh` against a real sshd on 127.0.0.1: install, register, configure, then replicate.

The "remote" host is this machine: the packages are installed into it and purged at the end, as
tests/unit/ops/test_ops_packages.py does, so this runs only where LIFEBOAT_PACKAGE_TESTS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from demo.lab import bin_path, free_port, sha256_file
from disk_images import make_image
from needs_root import require_root

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lifeboat", "lifeboat-mobility")
SSHD = "/usr/sbin/sshd"
EXIT_NOT_STARTED = 3   # cli/push_install.py: installed and registered, systemd is not PID 1 here

pytestmark = pytest.mark.skipif(os.environ.get("LIFEBOAT_PACKAGE_TESTS") != "1",
                                reason="installs packages on this machine: set LIFEBOAT_PACKAGE_TESTS=1 (CI does)")


def run(*cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def installed(name: str) -> bool:
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return status.stdout.strip() == "install ok installed"


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> Path:
    """The .deb packages, built once per session with packaging/build-debs."""
    if not shutil.which("dpkg-deb") or not shutil.which("python3.11"):
        pytest.fail("dpkg-deb and python3.11 are needed to build the packages (.ci/run installs them)")
    out = tmp_path_factory.mktemp("debs")
    run(str(REPO_ROOT / "packaging" / "build-debs"), str(out), timeout=900)
    return out


@pytest.fixture
def sshd(tmp_path: Path):
    """A real OpenSSH server on 127.0.0.1:<free port> for root, key-only; yields (port, key, known_hosts)."""
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} missing: apt-get install openssh-server (.ci/run does)")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"))
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    (d / "sshd_config").write_text(
        f"HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(port),
                             "-o", "ListenAddress=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={d}/known_hosts",
                              "-i", str(d / "client_key"), "-p", str(port), "root@127.0.0.1", "true"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None, f"sshd exited: {(d / 'sshd.log').read_text()}"
            assert time.monotonic() < deadline, f"sshd not answering: {(d / 'sshd.log').read_text()}"
            time.sleep(0.2)
        yield port, d / "client_key", d / "known_hosts"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def clean_host():
    """Refuse to replace an installed Lifeboat; afterwards purge what the push install put here."""
    require_root()   # dpkg -i, and sshd for root
    for name in PACKAGES:
        if installed(name):
            pytest.fail(f"{name} is already installed here; this test would replace it", pytrace=False)
    had_state = os.path.exists("/var/lib/lifeboat")
    try:
        yield
    finally:
        for p in ("/etc/lifeboat/agent.token", "/etc/lifeboat/tls/ca.pem"):
            Path(p).unlink(missing_ok=True)
        if os.path.isdir("/etc/lifeboat/tls"):
            os.rmdir("/etc/lifeboat/tls")
        run("dpkg", "--purge", *reversed(PACKAGES))
        if not had_state:
            shutil.rmtree("/var/lib/lifeboat", ignore_errors=True)
        assert not Path("/opt/lifeboat").exists() and not Path("/etc/lifeboat").exists(), "purge left files behind"


class ArgvWatcher(threading.Thread):
    """Samples every process's command line while the push install runs (secrets must never be there)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        self.seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                            errors="replace"))
                    except OSError:
                        pass
            time.sleep(0.01)


@pytest.mark.usefixtures("clean_host")
def test_machine_add_over_ssh_installs_registers_and_replicates(control_lab, sshd, debs, tmp_path):
    lab = control_lab
    port, key, known_hosts = sshd
    lab.start_ps()
    disk = make_image(tmp_path / "sda.img", 8)
    passphrase = Path(lab.init["registration_passphrase"]).read_text().strip()

    discovered = lab.api_cli("machine", "discover", "--ssh", "root@127.0.0.1", "--port", str(port),
                             "--identity", str(key), "--known-hosts", str(known_hosts), "--json", check=True)
    assert any(d["type"] in ("disk", "loop") for d in json.loads(discovered.stdout))

    watcher = ArgvWatcher()
    watcher.start()
    try:
        added = lab.api_cli("machine", "add", "web01", "--ssh", "root@127.0.0.1", "--port", str(port),
                            "--identity", str(key), "--known-hosts", str(known_hosts), "--disk", f"sda={disk}",
                            "--package", str(debs), "--metrics-port", "0")
    finally:
        watcher.stop.set()
        watcher.join()
    out = added.stdout + added.stderr
    assert added.returncode == EXIT_NOT_STARTED, out   # no systemd as PID 1 here: said, not hidden
    for name in ("connect", "protect", "register", "process server", "copy", "install", "credential", "config"):
        assert f"[{name}]" in out, out
    assert "[start] NOT STARTED: systemd is not PID 1" in out, out

    # Installed, registered (a live agent credential), configured with the process server's address.
    assert all(installed(name) for name in PACKAGES)
    creds = json.loads(lab.api_cli("credentials", "list", "--json", check=True).stdout)
    assert [bool(c["revoked"]) for c in creds if c["kind"] == "agent" and c["name"] == "web01"] == [False]
    conf_path, token_path = Path("/etc/lifeboat/mobility.toml"), Path("/etc/lifeboat/agent.token")
    assert stat.S_IMODE(conf_path.stat().st_mode) in (0o600, 0o640)
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    conf = tomllib.loads(conf_path.read_text())
    assert conf["process_server"]["url"] == f"https://127.0.0.1:{lab.ps_port}"
    assert conf["control"]["api_url"] == lab.api_url and conf["disks"] == [{"id": "sda", "path": str(disk)}]

    # No secret on a command line, in the command's output or in the daemons' log.
    token = token_path.read_text().strip()
    assert len(token) >= 20 and len(passphrase) >= 20
    assert watcher.seen and any("ssh" in argv for argv in watcher.seen)   # the sampler did see the ssh run
    for secret in (passphrase, token):
        assert not [a for a in watcher.seen if secret in a]
        assert secret not in out and secret not in Path("/etc/lifeboat/mobility.toml").read_text()
        assert secret not in lab.log_path.read_text()

    # Running it again (an upgrade, a lost credential) replaces the credential: one live per machine.
    again = lab.api_cli("machine", "add", "web01", "--ssh", "root@127.0.0.1", "--port", str(port),
                        "--identity", str(key), "--known-hosts", str(known_hosts), "--disk", f"sda={disk}",
                        "--package", str(debs), "--metrics-port", "0")
    assert again.returncode == EXIT_NOT_STARTED, again.stdout + again.stderr
    assert "is already protected" in again.stdout and "revoked (replaced)" in again.stdout
    creds = json.loads(lab.api_cli("credentials", "list", "--json", check=True).stdout)
    assert sorted(bool(c["revoked"]) for c in creds if c["kind"] == "agent" and c["name"] == "web01") == [False, True]
    assert token_path.read_text().strip() != token
    wrong = lab.api_cli("machine", "add", "web01", "--ssh", "root@127.0.0.1", "--port", str(port),
                        "--identity", str(key), "--known-hosts", str(known_hosts), "--disk", f"sdb={disk}",
                        "--package", str(debs))
    assert wrong.returncode == 5 and "step 'protect' failed" in wrong.stderr and "sda" in wrong.stderr

    # The installed agent, started by hand as its unit would (credentials directory), replicates.
    started = time.time()
    agent = subprocess.run(["/opt/lifeboat/bin/lifeboat-mobility", "-c", str(conf_path), "--cycles", "1"],
                           env={**os.environ, "CREDENTIALS_DIRECTORY": "/etc/lifeboat"}, stderr=lab.log,
                           timeout=120)
    assert agent.returncode == 0, lab.log_path.read_text()[-3000:]
    want = sha256_file(disk)
    point = lab.wait_points(1)[-1]
    target = tmp_path / "failover.img"
    res = lab.failover(point["point_id"], target, "--machine", "web01")
    assert res.returncode == 0, res.stderr
    assert sha256_file(target) == want

    # Its heartbeat reached the control plane, which exports it (the LifeboatAgentNoHeartbeat alert's
    # metric), keeps it across a restart of the primary, and drops it when the machine is unprotected.
    beat = 'lifeboat_control_machine_last_heartbeat_timestamp_seconds{machine="web01"}'
    seen = lab.ps_metrics()[beat]
    assert seen >= started
    assert lab.stop_ps() == 0
    lab.start_ps()
    assert lab.ps_metrics()[beat] == seen
    lab.api_cli("unprotect", "web01", check=True)
    assert beat not in lab.ps_metrics()


@pytest.mark.usefixtures("clean_host")
def test_machine_add_refuses_an_unknown_host_key(control_lab, sshd, debs, tmp_path):
    """A host key not in --known-hosts (and no --accept-new-host-key) stops at the connect step."""
    lab = control_lab
    port, key, _ = sshd
    lab.start_ps()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    added = lab.api_cli("machine", "add", "web02", "--ssh", "root@127.0.0.1", "--port", str(port),
                        "--identity", str(key), "--known-hosts", str(empty), "--disk", "sda=/dev/null",
                        "--package", str(debs))
    assert added.returncode == 5, added.stderr
    assert "step 'connect' failed" in added.stderr and "--accept-new-host-key" in added.stderr
    assert not installed("lifeboat-mobility")
    machines = json.loads(lab.api_cli("status", "--json", check=True).stdout)
    assert machines == []   # nothing was protected before the host was reached
