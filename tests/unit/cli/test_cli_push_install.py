"""cli/push_install.py without a host: argument checks, package lookup, the agent config it writes, ssh options."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifeboat.cli import push_install as pi
from lifeboat.core import config as cfgmod
from lifeboat.core.errors import LifeboatError


def test_disks_need_an_id_and_an_absolute_path():
    assert pi.parse_disks(["sda=/dev/sda", "data.1=/srv/img"]) == [("sda", "/dev/sda"), ("data.1", "/srv/img")]
    for bad in (["sda"], ["SDA=/dev/sda"], ["sda=dev/sda"], ["sda=/dev/sda", "sda=/dev/sdb"]):
        with pytest.raises(LifeboatError):
            pi.parse_disks(bad)


def test_packages_from_a_directory_or_files(tmp_path: Path):
    for name in ("lifeboat_1.0_amd64.deb", "lifeboat-mobility_1.0_amd64.deb", "lifeboat-master-target_1.0_amd64.deb"):
        (tmp_path / name).write_bytes(b"!<arch>\n")
    found = pi.find_packages([str(tmp_path)])
    assert found == {"lifeboat": str(tmp_path / "lifeboat_1.0_amd64.deb"),
                     "lifeboat-mobility": str(tmp_path / "lifeboat-mobility_1.0_amd64.deb")}
    assert pi.find_packages(list(found.values())) == found
    with pytest.raises(pi.PushInstallError, match="no lifeboat-mobility .deb .*packaging/build-debs"):
        pi.find_packages([found["lifeboat"]])
    with pytest.raises(pi.PushInstallError, match="is not a .deb file"):
        pi.find_packages([str(tmp_path / "missing.deb")])


def test_written_agent_config_loads_with_the_schema(tmp_path: Path):
    text = pi.agent_config("web01", [("sda", "/dev/sda"), ("sdb", '/dev/disk/by-id/a"b')],
                           "https://ps.example:9443", "https://ps.example:443", 0)
    path = tmp_path / "mobility.toml"
    path.write_text(text)
    cfg = cfgmod.load(cfgmod.MobilityConfig, str(path))
    assert cfg.machine == "web01" and cfg.process_server.url == "https://ps.example:9443"
    assert cfg.control.api_url == "https://ps.example:443" and cfg.metrics.port == 0
    assert [(d.id, d.path) for d in cfg.disks] == [("sda", "/dev/sda"), ("sdb", '/dev/disk/by-id/a"b')]
    assert 'token_file = "%d/agent.token"' in text   # the unit's LoadCredential=, never the secret itself


def test_ssh_checks_host_keys_and_never_prompts():
    strict = pi.Remote("root@h", 2222, "/k", "/kh", accept_new_host_key=False)
    assert "StrictHostKeyChecking=yes" in strict.ssh_cmd and "BatchMode=yes" in strict.ssh_cmd
    assert "UserKnownHostsFile=/kh" in strict.ssh_cmd and strict.ssh_cmd[-2:] == ["-p", "2222"]
    assert strict.scp_cmd[-2:] == ["-P", "2222"]
    assert "StrictHostKeyChecking=accept-new" in pi.Remote("h", 22, None, None, True).ssh_cmd
    assert not any("StrictHostKeyChecking=no" in a for a in strict.ssh_cmd + strict.scp_cmd)
    for bad in ("", "-oProxyCommand=x", "a b"):
        with pytest.raises(LifeboatError):
            pi.Remote(bad, 22, None, None, False)
