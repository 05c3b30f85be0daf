"""A configuration-server role on 127.0.0.1 with a real CA, TLS, SQLite and bootstrap secrets."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry

from lifeboat.control.auth import new_passphrase, new_token
from lifeboat.control.client import ApiClient
from lifeboat.control.role import ControlRole
from lifeboat.core import config as cfgmod
from lifeboat.core import tls


def write(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return str(path)


class RunningControl:
    def __init__(self, tmp: Path, **control) -> None:
        self.tmp = tmp
        tls_dir = tmp / "tls"
        self.ca, ca_key = tls.create_ca(str(tls_dir))
        self.cert, self.key = tls.issue_server_cert(self.ca, ca_key, str(tls_dir), "server", ["127.0.0.1"])
        self.passphrase, self.operator_token = new_passphrase(), new_token()
        self.passphrase_file = write(tmp / "registration.passphrase", self.passphrase)
        self.operator_file = write(tmp / "operator.credential", self.operator_token)
        self.control = {"enabled": True, "host": "127.0.0.1", "port": 0, "state_dir": str(tmp / "control"),
                        "registration_passphrase_file": self.passphrase_file,
                        "operator_credential_file": self.operator_file, **control}
        self.registry = CollectorRegistry()
        self.role: ControlRole | None = None

    def config(self) -> cfgmod.ProcessServerConfig:
        return cfgmod.build(cfgmod.ProcessServerConfig, {
            "ingest": {"host": "127.0.0.1", "port": 0, "tls_cert": self.cert, "tls_key": self.key,
                       "agent_token_file": self.operator_file},
            "cache": {"dir": str(self.tmp / "cache")},
            "repository": {"url": f"local:{self.tmp / 'repo'}", "key_file": str(self.tmp / 'repo.key')},
            "control": self.control})

    async def with_repository(self):
        """A real local-directory repository, opened the way the process server opens it (its .repo)."""
        from types import SimpleNamespace

        from lifeboat.core import keys
        from lifeboat.repository.open import backend_from_url
        from lifeboat.repository.repo import Repository

        unlocker = keys.write_key_file(str(self.tmp / "repo.key"))
        self.repo = await Repository.init(backend_from_url(f"local:{self.tmp / 'repo'}"), unlocker)
        return SimpleNamespace(repo=self.repo, cache=None)

    async def start(self, customize=None, server=None) -> ControlRole:
        self.registry = CollectorRegistry()   # a restart is a new process: fresh metrics
        self.role = ControlRole(self.config(), self.registry, customize=customize, server=server)
        await self.role.start(ingest_port=9443)
        return self.role

    async def stop(self) -> None:
        if self.role:
            await self.role.stop()
            self.role = None

    @property
    def url(self) -> str:
        assert self.role
        return f"https://127.0.0.1:{self.role.port}"

    def client(self, token: str = "") -> ApiClient:
        return ApiClient(self.url, self.ca, token)

    def operator(self) -> ApiClient:
        return self.client(self.operator_token)

    def refusals(self, reason: str) -> float:
        return self.registry.get_sample_value("lifeboat_control_refusals_total", {"reason": reason}) or 0.0
