"""Open a backend and the repository from a URL and unlock settings."""

from __future__ import annotations

from ..core import keys
from ..core.config import RepositoryConfig, resolve_credential
from ..core.errors import ConfigError
from .backend import Backend
from .local import LocalBackend
from .repo import Repository


def backend_from_url(url: str, azure_connection_string: str | None = None) -> Backend:
    if url.startswith("azure://"):
        from .azure import AzureBackend

        container = url[len("azure://"):].strip("/")
        if not azure_connection_string:
            raise ConfigError("repository.azure_connection_string_file", f"{url} needs an Azure connection string")
        return AzureBackend(container, azure_connection_string)
    if url.startswith("local:"):
        url = url[len("local:"):]
    if not url.startswith("/"):
        raise ConfigError("repository.url", f"{url!r}: use local:/absolute/path or azure://container")
    return LocalBackend(url)


def _read_secret(path: str, what: str) -> str:
    try:
        with open(resolve_credential(path)) as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}") from None


def unlocker_from_config(cfg: RepositoryConfig) -> keys.Unlocker:
    if cfg.key_file:
        return keys.Unlocker.from_key_file(resolve_credential(cfg.key_file))
    if cfg.passphrase_file:
        return keys.Unlocker.from_passphrase(_read_secret(cfg.passphrase_file, "repository.passphrase_file"))
    raise ConfigError("repository.key_file", "set key_file or passphrase_file to unlock the repository")


def backend_from_config(cfg: RepositoryConfig) -> Backend:
    conn = None
    if cfg.azure_connection_string_file:
        conn = _read_secret(cfg.azure_connection_string_file, "repository.azure_connection_string_file")
    return backend_from_url(cfg.url, conn)


async def open_repository(cfg: RepositoryConfig) -> Repository:
    backend = backend_from_config(cfg)
    try:
        return await Repository.open(backend, unlocker_from_config(cfg))
    except BaseException:
        await backend.close()
        raise
