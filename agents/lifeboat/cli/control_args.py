"""How control-plane commands find the management API: flags, then LIFEBOAT_* env vars, then a CLI config file."""

from __future__ import annotations

import argparse
import os
import tomllib

from ..core.errors import LifeboatError

CLI_CONFIG_ENV = "LIFEBOAT_CLI_CONFIG"
CLI_CONFIG_KEYS = ("api", "ca_cert", "credential_file")


def add_api_args(p: argparse.ArgumentParser, credential: bool = True) -> None:
    g = p.add_argument_group("management API (else $LIFEBOAT_API, $LIFEBOAT_CA, $LIFEBOAT_CREDENTIAL, else the "
                             f"file ${CLI_CONFIG_ENV} with keys {', '.join(CLI_CONFIG_KEYS)})")
    g.add_argument("--api", help="https://host:port of the primary process server's management API")
    g.add_argument("--ca", help="CA certificate (tls/ca.pem of 'lifeboat init')")
    if credential:
        g.add_argument("--credential", help="credential file (operator.credential of 'lifeboat init', or the "
                                            "file 'lifeboat register' wrote)")
    g.add_argument("--cli-config", help=f"CLI config file (TOML: {', '.join(CLI_CONFIG_KEYS)})")


def _cli_config(path: str | None) -> dict:
    path = path or os.environ.get(CLI_CONFIG_ENV)
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LifeboatError(f"cannot read the CLI config {path}: {exc}") from None
    unknown = set(doc) - set(CLI_CONFIG_KEYS)
    if unknown:
        raise LifeboatError(f"CLI config {path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(CLI_CONFIG_KEYS)})")
    return doc


def api_settings(args) -> dict:
    """{api, ca_cert, credential_file} from flags, env and config file, in that order ('' when unset)."""
    conf = _cli_config(getattr(args, "cli_config", None))
    return {
        "api": getattr(args, "api", None) or os.environ.get("LIFEBOAT_API") or conf.get("api", ""),
        "ca_cert": getattr(args, "ca", None) or os.environ.get("LIFEBOAT_CA") or conf.get("ca_cert", ""),
        "credential_file": getattr(args, "credential", None) or os.environ.get("LIFEBOAT_CREDENTIAL")
        or conf.get("credential_file", ""),
    }


def api_configured(args) -> bool:
    return bool(api_settings(args)["api"])


def client_from_args(args, credential: bool = True):
    """An ApiClient (aiohttp is imported only by the commands that talk to the API: CLI start-up stays fast)."""
    from ..control.auth import read_secret_file
    from ..control.client import ApiClient

    s = api_settings(args)
    if not s["api"]:
        raise LifeboatError("no management API given: pass --api https://HOST:PORT (or set $LIFEBOAT_API, or "
                            f"${CLI_CONFIG_ENV})")
    if not s["ca_cert"]:
        raise LifeboatError("no CA certificate given: pass --ca <dir of lifeboat init>/tls/ca.pem (or $LIFEBOAT_CA)")
    token = ""
    if credential:
        if not s["credential_file"]:
            raise LifeboatError("no credential given: pass --credential <file> (operator.credential from "
                                "'lifeboat init', or $LIFEBOAT_CREDENTIAL)")
        try:
            token = read_secret_file(s["credential_file"])
        except OSError as exc:
            raise LifeboatError(f"cannot read the credential file {s['credential_file']}: {exc.strerror}") from None
    return ApiClient(s["api"], s["ca_cert"], token)
