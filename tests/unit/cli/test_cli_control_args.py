"""How control-plane commands find the API: flags, then LIFEBOAT_* env vars, then the CLI config file."""

from __future__ import annotations

import argparse

import pytest

from lifeboat.cli.control_args import add_api_args, api_settings, client_from_args
from lifeboat.core.errors import LifeboatError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_api_args(p)
    return p.parse_args(list(argv))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("LIFEBOAT_API", "LIFEBOAT_CA", "LIFEBOAT_CREDENTIAL", "LIFEBOAT_CLI_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_flags_win_over_env_which_wins_over_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "cli.toml"
    conf.write_text('api = "https://file:1"\nca_cert = "/file/ca.pem"\ncredential_file = "/file/cred"\n')
    monkeypatch.setenv("LIFEBOAT_CLI_CONFIG", str(conf))
    assert api_settings(parse()) == {"api": "https://file:1", "ca_cert": "/file/ca.pem", "credential_file": "/file/cred"}
    monkeypatch.setenv("LIFEBOAT_API", "https://env:2")
    assert api_settings(parse())["api"] == "https://env:2"
    assert api_settings(parse("--api", "https://flag:3"))["api"] == "https://flag:3"


def test_unknown_config_keys_and_missing_settings_are_named(tmp_path):
    conf = tmp_path / "cli.toml"
    conf.write_text('api = "https://x:1"\ntoken = "no"\n')
    with pytest.raises(LifeboatError, match="unknown key 'token'"):
        api_settings(parse("--cli-config", str(conf)))
    with pytest.raises(LifeboatError, match="no management API given: pass --api"):
        client_from_args(parse())
    with pytest.raises(LifeboatError, match="no CA certificate given"):
        client_from_args(parse("--api", "https://x:1"))
    with pytest.raises(LifeboatError, match="cannot read the credential file /none"):
        client_from_args(parse("--api", "https://x:1", "--ca", "/etc/hostname", "--credential", "/none"))
