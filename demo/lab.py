"""A throwaway Lifeboat deployment on loopback: init, configs, real daemons, CLI; used by the demo and tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DAEMON_START_TIMEOUT_SECONDS = 30.0
DAEMON_STOP_TIMEOUT_SECONDS = 40.0  # the process server drains uploads for up to 25 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def bin_path(name: str) -> str:
    """A console script installed next to this interpreter (the venv's bin/)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # JSON string escapes are valid TOML basic-string escapes


def to_toml(doc: dict, prefix: str = "") -> str:
    """Config dicts → TOML: scalars and arrays of scalars, [tables] and [[arrays of tables]], nested."""
    def is_tables(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict) and not is_tables(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.").rstrip("\n")]
        elif is_tables(v):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]", to_toml(item, f"{prefix}{k}.").rstrip("\n")]
    return "\n".join(lines) + "\n"


def merge(base: dict, extra: dict | None) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


class Lab:
    """One work directory holding a repository, a process server and agents, all on 127.0.0.1."""

    def __init__(self, work: str | os.PathLike, repo_url: str | None = None,
                 azure_connection_string: str | None = None, control: bool = False) -> None:
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "daemons.log"
        self.log = open(self.log_path, "ab")
        self.ps_proc: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []
        self.machines: set[str] = set()
        self.ps_port = free_port()
        self.ps_metrics_port = free_port()
        etc = self.work / "etc"
        cmd = [bin_path("lifeboat"), "init", "--dir", str(etc)]
        if repo_url:
            cmd += ["--repo", repo_url]
        self.conn_file = None
        if azure_connection_string:
            self.conn_file = etc.parent / "azure.conn"
            self.conn_file.write_text(azure_connection_string)
            self.conn_file.chmod(0o600)
            cmd += ["--azure-connection-string-file", str(self.conn_file)]
        self.init = json.loads(self._run(cmd).stdout)
        # Configuration-server role in the (primary) process server: its management API port.
        self.control = control
        self.api_port = free_port() if control else 0
        self.scale_outs: dict[str, tuple[subprocess.Popen, int]] = {}

    # --- process server ---------------------------------------------------------------------

    def ps_config(self, extra: dict | None = None) -> Path:
        i = self.init
        repo = {"url": i["repository"], "key_file": i["key_file"]}
        if self.conn_file:
            repo["azure_connection_string_file"] = str(self.conn_file)
        doc = merge({
            "ingest": {"host": "127.0.0.1", "port": self.ps_port, "tls_cert": i["server_cert"],
                       "tls_key": i["server_key"], "agent_token_file": i["agent_token"]},
            "cache": {"dir": str(self.work / "cache"), "max_bytes": 1 << 30},
            "repository": repo,
            "metrics": {"host": "127.0.0.1", "port": self.ps_metrics_port},
            "log": {"format": "kv"},
            **({"control": self.control_section()} if self.control else {}),
        }, extra)
        path = self.work / "process-server.toml"
        path.write_text(to_toml(doc))
        return path

    def control_section(self) -> dict:
        return {"enabled": True, "host": "127.0.0.1", "port": self.api_port, "state_dir": str(self.work / "control"),
                "registration_passphrase_file": self.init["registration_passphrase"],
                "operator_credential_file": self.init["operator_credential"], "name": "primary"}

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def api_env(self, credential: str | None = None) -> dict:
        """Environment for control-plane CLI commands (as the operator unless another credential file)."""
        return {"LIFEBOAT_API": self.api_url, "LIFEBOAT_CA": self.init["ca_cert"],
                "LIFEBOAT_CREDENTIAL": str(credential or self.init["operator_credential"])}

    def api_cli(self, *args: str, credential: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """`lifeboat <args>` against this lab's management API."""
        proc = subprocess.run([bin_path("lifeboat"), *args], capture_output=True, text=True,
                              env={**os.environ, **self.api_env(credential)})
        if check and proc.returncode != 0:
            raise RuntimeError(f"lifeboat {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
        return proc

    def wait_api(self, timeout: float = DAEMON_START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.api_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or (self.ps_proc and self.ps_proc.poll() is not None):
                    raise RuntimeError(f"management API not listening; see {self.log_path}") from None
                time.sleep(0.05)

    def start_scale_out(self, name: str, credential_file: str, ingest_port: int | None = None,
                        extra: dict | None = None) -> subprocess.Popen:
        """A second process server (same repository, own cache) that checks agents with the primary's API."""
        i = self.init
        port = ingest_port or free_port()
        repo = {"url": i["repository"], "key_file": i["key_file"]}
        if self.conn_file:
            repo["azure_connection_string_file"] = str(self.conn_file)
        doc = merge({
            "ingest": {"host": "127.0.0.1", "port": port, "tls_cert": i["server_cert"], "tls_key": i["server_key"],
                       "agent_token_file": i["agent_token"], "accept_shared_token": False},
            "cache": {"dir": str(self.work / f"cache-{name}"), "max_bytes": 1 << 30},
            "repository": repo,
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "log": {"format": "kv"},
            "control": {"primary_url": self.api_url, "ca_cert": i["ca_cert"], "credential_file": str(credential_file),
                        "name": name, "auth_cache_seconds": 1.0},
        }, extra)
        path = self.work / f"process-server-{name}.toml"
        path.write_text(to_toml(doc))
        proc = subprocess.Popen([bin_path("lifeboat-process-server"), "-c", str(path)], stderr=self.log)
        self.scale_outs[name] = (proc, port)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"process server {name} exited with {proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return proc
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"process server {name} not listening") from None
                time.sleep(0.05)

    def agent_control(self, machine_credential: str, ps_port: int | None = None) -> dict:
        """Agent config parts for a registered machine: its credential, the API, and a process server."""
        return {"process_server": {"url": f"https://127.0.0.1:{ps_port or self.ps_port}", "ca_cert": self.init["ca_cert"],
                                   "token_file": str(machine_credential), "retry_max_seconds": 1.0},
                "control": {"api_url": self.api_url, "credential_file": str(machine_credential)}}

    def start_ps(self, extra: dict | None = None) -> subprocess.Popen:
        conf = self.ps_config(extra)
        self.ps_proc = subprocess.Popen([bin_path("lifeboat-process-server"), "-c", str(conf)], stderr=self.log)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.ps_proc.poll() is not None:
                raise RuntimeError(f"process server exited with {self.ps_proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.ps_port), timeout=1):
                    pass
                if self.control:
                    self.wait_api()
                return self.ps_proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"process server not listening after {DAEMON_START_TIMEOUT_SECONDS} s")

    def stop_ps(self, sig: int = signal.SIGTERM) -> int:
        proc, self.ps_proc = self.ps_proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(sig)
        return proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)

    def ps_metrics(self) -> dict[str, float]:
        """The process server's /metrics as {"name{labels}": value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ps_metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    # --- agents -----------------------------------------------------------------------------

    def agent_config(self, machine: str, disks: dict[str, str], extra: dict | None = None) -> Path:
        i = self.init
        doc = merge({
            "machine": machine,
            "state_dir": str(self.work / f"agent-{machine}"),
            "process_server": {"url": f"https://127.0.0.1:{self.ps_port}", "ca_cert": i["ca_cert"],
                               "token_file": i["agent_token"], "retry_max_seconds": 1.0},
            "disks": [{"id": d, "path": str(p)} for d, p in disks.items()],
            "replication": {"interval_seconds": 0.5},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "log": {"format": "kv"},
        }, extra)
        path = self.work / f"mobility-{machine}.toml"
        path.write_text(to_toml(doc))
        return path

    def start_agent(self, machine: str, disks: dict[str, str], cycles: int | None = None,
                    extra: dict | None = None, env: dict | None = None) -> subprocess.Popen:
        conf = self.agent_config(machine, disks, extra)
        self.machines.add(machine)
        cmd = [bin_path("lifeboat-mobility"), "-c", str(conf)]
        if cycles is not None:
            cmd += ["--cycles", str(cycles)]
        proc = subprocess.Popen(cmd, stderr=self.log, env={**os.environ, **(env or {})})
        self.agents.append(proc)
        return proc

    def run_agent(self, machine: str, disks: dict[str, str], cycles: int, extra: dict | None = None,
                  env: dict | None = None, timeout: float = 600) -> int:
        return self.start_agent(machine, disks, cycles, extra, env).wait(timeout)

    # --- operator commands ------------------------------------------------------------------

    def repo_args(self) -> list[str]:
        args = ["--repo", self.init["repository"], "--key-file", self.init["key_file"]]
        if self.conn_file:
            args += ["--azure-connection-string-file", str(self.conn_file)]
        return args

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
        return proc

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """`lifeboat <command> <repo args> <args>`: the command name first, then this lab's repository."""
        command, *rest = args
        return self._run([bin_path("lifeboat"), command, *self.repo_args(), *rest], check)

    def points(self) -> list[dict]:
        return json.loads(self.cli("points", "--json", check=True).stdout)

    def wait_points(self, count: int, timeout: float = 120.0, complete: bool = True) -> list[dict]:
        """Poll the catalog until `count` (complete) points are listed."""
        deadline = time.monotonic() + timeout
        while True:
            pts = [p for p in self.points() if p["complete"] or not complete]
            if len(pts) >= count:
                return pts
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pts)} of {count} points after {timeout} s; see {self.log_path}")
            time.sleep(0.3)

    def failover(self, point: str, target: str | os.PathLike, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("failover", "--test", "--point", point, "--to", str(target), "-q", *extra)

    def close(self) -> None:
        for proc in self.agents:  # agents a test left running (e.g. after a failed assertion)
            if proc.poll() is None:
                proc.kill()
                proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)
        if self.machines and os.geteuid() == 0:
            # A stopped agent leaves its tracefs instance recording for the next start: not here.
            from lifeboat.mobility.tracepoint import instance_name, remove_instance
            for machine in self.machines:
                remove_instance(instance_name(machine, str(self.work / f"agent-{machine}")))
        try:
            for proc, _ in self.scale_outs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)
            self.stop_ps()
        finally:
            self.log.close()
