"""Repository options shared by the CLI commands (a process-server config or explicit flags)."""

from __future__ import annotations

import argparse
import os

from ..core import config as cfgmod
from ..core.errors import ConfigError
from ..repository.open import open_repository

DEFAULT_PS_CONFIG = "/etc/lifeboat/process-server.toml"


def add_repo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repository")
    g.add_argument("-c", "--config", help=f"process-server config to take [repository] from (default {DEFAULT_PS_CONFIG} if it exists)")
    g.add_argument("--repo", default=os.environ.get("LIFEBOAT_REPO"), help="repository URL (local:/path or azure://container); env LIFEBOAT_REPO")
    g.add_argument("--key-file", default=os.environ.get("LIFEBOAT_KEY_FILE"), help="key file; env LIFEBOAT_KEY_FILE")
    g.add_argument("--passphrase-file", help="file holding the repository passphrase")
    g.add_argument("--azure-connection-string-file", help="file holding the Azure Storage connection string")


def repo_config(args: argparse.Namespace) -> cfgmod.RepositoryConfig:
    if args.repo:
        return cfgmod.RepositoryConfig(url=args.repo, key_file=args.key_file or "",
                                       passphrase_file=args.passphrase_file or "",
                                       azure_connection_string_file=args.azure_connection_string_file or "")
    path = args.config or (DEFAULT_PS_CONFIG if os.path.exists(DEFAULT_PS_CONFIG) else None)
    if not path:
        raise ConfigError("--repo", "name the repository with --repo and --key-file, or with -c <process-server config>")
    return cfgmod.load(cfgmod.ProcessServerConfig, path).repository


async def open_from_args(args: argparse.Namespace):
    return await open_repository(repo_config(args))
