"""Logs never contain a secret: a full run (init, replication, test failover, verify, doctor) at debug level,
then every log the daemons wrote and everything the CLI printed is searched for the agent token, the key
file's key, the passphrase and the Azure connection string's AccountKey."""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import uuid
from pathlib import Path

import pytest
from disk_images import make_image, scribble
from lab import Lab, bin_path, free_port, merge, sha256_file

DEBUG_LOGS = {"log": {"level": "debug", "format": "kv"}}


class RecordingLab(Lab):
    """A Lab that keeps every CLI command's output and can wrap the repository key with a passphrase."""

    def __init__(self, work: Path, passphrase_file: Path | None = None, **kw) -> None:
        self.passphrase_file = passphrase_file
        self.cli_output: list[str] = []
        super().__init__(work, **kw)

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.passphrase_file and cmd[1:2] == ["init"]:
            cmd = [*cmd, "--passphrase-file", str(self.passphrase_file)]
        proc = super()._run(cmd, check)
        self.cli_output.append(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def ps_config(self, extra: dict | None = None) -> Path:
        unlock = {"repository": {"key_file": "", "passphrase_file": str(self.passphrase_file)}} \
            if self.passphrase_file else {}
        return super().ps_config(merge(merge(DEBUG_LOGS, unlock), extra))

    def repo_args(self) -> list[str]:
        if not self.passphrase_file:
            return super().repo_args()
        args = ["--repo", self.init["repository"], "--passphrase-file", str(self.passphrase_file)]
        if self.conn_file:
            args += ["--azure-connection-string-file", str(self.conn_file)]
        return args


def secrets_of(lab: RecordingLab, passphrase: str | None, connection_string: str | None) -> dict[str, str]:
    found = {"agent token": Path(lab.init["agent_token"]).read_text().strip()}
    if lab.init.get("key_file"):
        b64 = Path(lab.init["key_file"]).read_text().split()[2]
        raw = base64.b64decode(b64)
        found.update({"key file key (base64)": b64, "key file key (hex)": raw.hex(),
                      "key file key (urlsafe base64)": base64.urlsafe_b64encode(raw).decode().rstrip("=")})
    if passphrase:
        found["passphrase"] = passphrase
    if connection_string:
        [account_key] = re.findall(r"AccountKey=([^;]+)", connection_string)
        found["Azure AccountKey"] = account_key
        found["Azure connection string"] = connection_string
    return found


def full_run(lab: RecordingLab, tmp_path: Path) -> None:
    disk = make_image(tmp_path / "sda.img", 6)
    lab.start_ps()
    agent_extra = merge(DEBUG_LOGS, {"metrics": {"host": "127.0.0.1", "port": free_port()}})
    assert lab.run_agent("web01", {"sda": disk}, cycles=1, extra=agent_extra) == 0
    scribble(disk, 20, seed=5)
    assert lab.run_agent("web01", {"sda": disk}, cycles=1, extra=agent_extra) == 0
    points = lab.wait_points(2)
    res = lab.failover(points[-1]["point_id"], tmp_path / "out.img")
    assert res.returncode == 0, res.stderr
    assert sha256_file(tmp_path / "out.img") == sha256_file(disk)
    assert lab.cli("verify").returncode == 0
    assert lab.cli("points").returncode == 0
    # A failing command too: errors are where secrets tend to slip into messages.
    lab.cli("failover", "--test", "--point", "no-such-point", "--to", str(tmp_path / "x.img"))
    lab._run([bin_path("lifeboat"), "doctor", "-c", str(lab.work / "process-server.toml"),
              "-c", str(lab.work / "mobility-web01.toml")], check=False)
    lab.stop_ps()


def assert_no_secret(lab: RecordingLab, found: dict[str, str]) -> None:
    logs = {str(lab.log_path): lab.log_path.read_text(errors="replace"),
            "CLI output": "\n".join(lab.cli_output)}
    daemons = logs[str(lab.log_path)]
    assert "agent ready" in daemons and "lifeboat-process-server" in daemons, "the daemons logged nothing to check"
    leaks = [f"{what} in {where}" for where, text in logs.items() for what, value in found.items() if value in text]
    assert not leaks, f"secrets leaked into logs: {leaks}"


@pytest.mark.parametrize("unlock", ["passphrase", "key-file"])
def test_local_run_logs_no_secret(tmp_path, unlock):
    passphrase = None
    pf = None
    if unlock == "passphrase":
        passphrase = "lb-" + secrets.token_urlsafe(24)
        pf = tmp_path / "passphrase"
        pf.write_text(passphrase + "\n")
        pf.chmod(0o600)
    lab = RecordingLab(tmp_path / "lab", passphrase_file=pf)
    try:
        full_run(lab, tmp_path)
    finally:
        lab.close()
    assert_no_secret(lab, secrets_of(lab, passphrase, None))


def test_azure_run_logs_no_secret(tmp_path, azurite):
    passphrase = "lb-" + secrets.token_urlsafe(24)
    pf = tmp_path / "passphrase"
    pf.write_text(passphrase + "\n")
    lab = RecordingLab(tmp_path / "lab", passphrase_file=pf, repo_url=f"azure://secrets-{uuid.uuid4().hex[:12]}",
                       azure_connection_string=azurite)
    try:
        full_run(lab, tmp_path)
    finally:
        lab.close()
    assert_no_secret(lab, secrets_of(lab, passphrase, azurite))
