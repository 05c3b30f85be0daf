"""A real lifeboat-master-target process for failback tests, and a byte-counting TCP proxy (bytes on the wire)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from lab import DAEMON_START_TIMEOUT_SECONDS, bin_path, free_port, to_toml


class MasterTargetProc:
    def __init__(self, lab, name: str = "mt", ingest: dict | None = None) -> None:
        self.lab = lab
        self.work = lab.work / name
        self.state_dir = self.work / "state"
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.token_file = self.work / "sender.token"
        self.token_file.write_text(secrets.token_hex(24))
        self.token_file.chmod(0o600)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_cert = lab.init["ca_cert"]
        self.config = self.work / "master-target.toml"
        self.config.write_text(to_toml({
            "state_dir": str(self.state_dir),
            "ingest": {"host": "127.0.0.1", "port": self.port, "tls_cert": lab.init["server_cert"],
                       "tls_key": lab.init["server_key"], "max_batch_bytes": 32 << 20, **(ingest or {})},
            "metrics": {"host": "127.0.0.1", "port": self.metrics_port},
            "log": {"format": "kv"},
        }))
        self.cli("add-sender", "--name", "reprotect-agent", "--token-file", str(self.token_file))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([bin_path("lifeboat"), "master-target", "--state-dir", str(self.state_dir), *args],
                              capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"lifeboat master-target {' '.join(args)}: {proc.stderr}")
        return proc

    def add_disk(self, disk: str, target: Path) -> None:
        self.cli("add-disk", "--disk", disk, "--target", str(target), "--size", str(target.stat().st_size))

    def start(self, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([bin_path("lifeboat-master-target"), "-c", str(self.config)],
                                     stderr=self.lab.log, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"master target exited with {self.proc.returncode}; see {self.lab.log_path}")
            try:
                # Both listeners: the data port binds first, /metrics right after it.
                for port in (self.port, self.metrics_port):
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        pass
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("master target not listening")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(sig)
        return proc.wait(40)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def wait_applied(self, disk: str, seq: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metrics().get(f'lifeboat_mt_applied_seq{{disk="{disk}"}}', 0) < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{disk}: seq {seq} not applied after {timeout} s; see {self.lab.log_path}")
            time.sleep(0.1)

    def reprotect(self, source: Path, disk: str, *extra: str, check: bool = True) -> dict | subprocess.CompletedProcess:
        return reprotect_cli(source, disk, self.url, self.ca_cert, self.token_file, *extra, check=check)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def reprotect_cli(source, disk, url, ca_cert, token_file, *extra: str, check: bool = True, command: str = "reprotect"):
    cmd = [bin_path("lifeboat"), command, *(["--source-image", str(source)] if source else []), "--disk", disk,
           "--master-target", url,
           "--ca-cert", str(ca_cert), "--token-file", str(token_file), "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not check:
        return proc
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)


class CountingProxy:
    """127.0.0.1:<port> → upstream; counts the bytes each way (TLS records included: what the wire carries)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.up_bytes = 0      # client → upstream
        self.down_bytes = 0    # upstream → client
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if direction == "up":
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
