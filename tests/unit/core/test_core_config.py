"""Typed daemon configuration (core/config.py): samples, and errors that name the key path."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from lifeboat.core import config
from lifeboat.core.config import SCHEMAS, MobilityConfig, ProcessServerConfig, build, load, sample
from lifeboat.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
COMMENTED_DEFAULT_RE = re.compile(r"^# (\w+ = .*)$", re.MULTILINE)


def mobility_toml(extra: str = "", disks: str = '[[disks]]\nid = "sda"\npath = "/dev/sda"\n') -> str:
    return (
        'machine = "web01"\nstate_dir = "/var/lib/lifeboat/mobility"\n' + extra +
        '[process_server]\nurl = "https://ps:9443"\nca_cert = "/ca.pem"\ntoken_file = "/token"\n' + disks
    )


def ps_toml(repository: str = 'url = "local:/r"\nkey_file = "/k"\n', cache: str = 'dir = "/c"\n', ingest: str = "") -> str:
    return (
        f'[ingest]\ntls_cert = "/c.pem"\ntls_key = "/c.key"\nagent_token_file = "/t"\n{ingest}'
        f"[cache]\n{cache}[repository]\n{repository}"
    )


def load_text(tmp_path, cls, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return load(cls, str(path))


def config_error(tmp_path, cls, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, cls, text)
    assert info.value.exit_code == 78
    assert str(info.value).startswith(f"Error in configuration at '{info.value.path}'")
    return info.value


# -- samples ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("daemon", sorted(SCHEMAS))
def test_sample_builds(daemon):
    cls = SCHEMAS[daemon]
    cfg = build(cls, tomllib.loads(sample(cls)))
    assert isinstance(cfg, cls)


@pytest.mark.parametrize("daemon", sorted(SCHEMAS))
def test_commented_defaults_in_the_sample_are_the_real_defaults(daemon):
    # Uncommenting every "# key = value" line must not change the resulting configuration.
    cls = SCHEMAS[daemon]
    text = sample(cls)
    uncommented = COMMENTED_DEFAULT_RE.sub(r"\1", text)
    assert uncommented != text
    assert build(cls, tomllib.loads(uncommented)) == build(cls, tomllib.loads(text))


def test_mobility_sample_passes_validation(tmp_path):
    cfg = load_text(tmp_path, MobilityConfig, sample(MobilityConfig))
    assert cfg.machine == "web01" and [d.id for d in cfg.disks] == ["sda"]
    assert cfg.replication.block_size == 64 * 1024
    assert cfg.metrics.port == 9461 and cfg.process_server.timeout_seconds == 120.0


def test_process_server_sample_asks_for_a_key(tmp_path):
    # The sample leaves the unlock method to the operator; loading it as-is says what to set.
    err = config_error(tmp_path, ProcessServerConfig, sample(ProcessServerConfig))
    assert err.path == "repository.key_file"


def test_per_daemon_metrics_ports(tmp_path):
    assert load_text(tmp_path, ProcessServerConfig, ps_toml()).metrics.port == 9462
    mt = {"ingest": {"tls_cert": "server.pem", "tls_key": "server.key"}}  # the 9444 listener needs its TLS pair
    assert build(SCHEMAS["master-target"], mt).metrics.port == 9463
    assert build(SCHEMAS["master-target"], {**mt, "metrics": {"host": "::1"}}).metrics.port == 9463
    assert build(SCHEMAS["master-target"], {**mt, "metrics": {"port": 1}}).metrics.port == 1
    assert build(SCHEMAS["master-target"], mt).ingest.port == 9444


@pytest.mark.parametrize("daemon", sorted(SCHEMAS))
def test_shipped_config_file_equals_the_generated_sample(daemon):
    path = REPO_ROOT / "config" / f"{daemon}.toml"
    assert path.exists(), f"{path} is missing: run 'lifeboat config-sample {daemon} > config/{daemon}.toml'"
    assert path.read_text() == sample(SCHEMAS[daemon]), (
        f"{path} differs from the schema: regenerate it with 'lifeboat config-sample {daemon}'")


def test_defaults_are_not_shared_between_instances():
    a = build(MobilityConfig, tomllib.loads(mobility_toml()))
    b = build(MobilityConfig, tomllib.loads(mobility_toml()))
    assert a.replication is not b.replication and a.log is not b.log


# -- errors name the key path ----------------------------------------------------------------------

@pytest.mark.parametrize("text,path", [
    (mobility_toml(extra="bogus = 1\n"), "bogus"),
    (mobility_toml() + "[replication]\nblok_size = 4096\n", "replication.blok_size"),
    (mobility_toml() + "[log]\nlevel = \"info\"\ncolour = true\n", "log.colour"),
    (mobility_toml(disks='[[disks]]\nid = "sda"\npath = "/dev/sda"\n[[disks]]\nid = "sdb"\npath = "/b"\nsize = 1\n'),
     "disks[1].size"),
])
def test_unknown_key(tmp_path, text, path):
    err = config_error(tmp_path, MobilityConfig, text)
    assert err.path == path and "unknown key" in str(err)


def test_unknown_key_lists_the_known_ones(tmp_path):
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + "[replication]\nblok_size = 4096\n")
    assert "block_size" in str(err) and "batch_bytes" in str(err)


@pytest.mark.parametrize("text,path,expected", [
    (mobility_toml() + "[replication]\nblock_size = \"64k\"\n", "replication.block_size", "expected int, got str"),
    (mobility_toml() + "[replication]\nblock_size = 65536.0\n", "replication.block_size", "expected int, got float"),
    (mobility_toml() + "[replication]\nblock_size = true\n", "replication.block_size", "expected int, got bool"),
    (mobility_toml() + "[replication]\ninterval_seconds = false\n", "replication.interval_seconds", "expected float"),
    (mobility_toml().replace('machine = "web01"', "machine = 7"), "machine", "expected str, got int"),
    (mobility_toml() + "[metrics]\nport = \"9461\"\n", "metrics.port", "expected int"),
    (mobility_toml(extra="replication = 5\n"), "replication", "expected a table, got int"),
    (mobility_toml(extra='disks = "sda"\n', disks=""), "disks", "expected a non-empty array of tables"),
    (mobility_toml(extra="disks = []\n", disks=""), "disks", "expected a non-empty array of tables"),
    (mobility_toml(extra="disks = [1]\n", disks=""), "disks[0]", "expected a table"),
])
def test_wrong_type(tmp_path, text, path, expected):
    err = config_error(tmp_path, MobilityConfig, text)
    assert err.path == path and expected in str(err)


def test_int_is_accepted_for_a_float(tmp_path):
    cfg = load_text(tmp_path, MobilityConfig, mobility_toml() + "[replication]\ninterval_seconds = 60\n")
    assert cfg.replication.interval_seconds == 60.0 and isinstance(cfg.replication.interval_seconds, float)


@pytest.mark.parametrize("text,path", [
    (mobility_toml().replace('machine = "web01"\n', ""), "machine"),
    (mobility_toml().replace('token_file = "/token"\n', ""), "process_server.token_file"),
    (mobility_toml(disks='[[disks]]\nid = "sda"\npath = "/a"\n[[disks]]\nid = "sdb"\n'), "disks[1].path"),
    (mobility_toml(disks=""), "disks"),
    (mobility_toml().split("[process_server]")[0] + '[[disks]]\nid = "sda"\npath = "/a"\n', "process_server"),
])
def test_missing_required_key(tmp_path, text, path):
    err = config_error(tmp_path, MobilityConfig, text)
    assert err.path == path and "required key is missing" in str(err)


def test_missing_required_key_in_process_server(tmp_path):
    err = config_error(tmp_path, ProcessServerConfig, ps_toml(cache=""))
    assert err.path == "cache.dir" and "directory of the on-disk batch cache" in str(err)


def test_duplicate_disk_id(tmp_path):
    disks = '[[disks]]\nid = "sda"\npath = "/a"\n[[disks]]\nid = "sda"\npath = "/b"\n'
    err = config_error(tmp_path, MobilityConfig, mobility_toml(disks=disks))
    assert err.path == "disks[1].id" and "listed twice" in str(err)


@pytest.mark.parametrize("disk_id", ["SDA", "sd.a", "sda\n", "a/b", "", "x" * 64])
def test_bad_disk_id(tmp_path, disk_id):
    # json.dumps gives a valid TOML basic string, escapes included.
    disks = f'[[disks]]\nid = "ok"\npath = "/a"\n[[disks]]\nid = {json.dumps(disk_id)}\npath = "/b"\n'
    err = config_error(tmp_path, MobilityConfig, mobility_toml(disks=disks))
    assert err.path == "disks[1].id"


@pytest.mark.parametrize("machine", ["Web01", "web.01", "w" * 33, "web01\\n", ""])
def test_bad_machine_name(tmp_path, machine):
    err = config_error(tmp_path, MobilityConfig, mobility_toml().replace('"web01"', f'"{machine}"'))
    assert err.path == "machine"


@pytest.mark.parametrize("block_size", [0, 1000, 2048, 3 * 4096, 8 * 1024 * 1024])
def test_bad_block_size(tmp_path, block_size):
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + f"[replication]\nblock_size = {block_size}\n")
    assert err.path == "replication.block_size" and str(block_size) in str(err)


@pytest.mark.parametrize("block_size", [4096, 65536, 4 * 1024 * 1024])
def test_good_block_sizes(tmp_path, block_size):
    text = mobility_toml() + f"[replication]\nblock_size = {block_size}\nextent_max_bytes = {4 * 1024 * 1024}\n"
    assert load_text(tmp_path, MobilityConfig, text).replication.block_size == block_size


@pytest.mark.parametrize("replication,path", [
    ("extent_max_bytes = 100000\n", "replication.extent_max_bytes"),
    ("extent_max_bytes = 8388608\nblock_size = 4096\n", "replication.extent_max_bytes"),
    ("batch_bytes = 4096\n", "replication.batch_bytes"),
])
def test_replication_cross_checks(tmp_path, replication, path):
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + "[replication]\n" + replication)
    assert err.path == path


@pytest.mark.parametrize("text,path", [
    (mobility_toml() + "[replication]\ninterval_seconds = -1.0\n", "replication.interval_seconds"),
    (mobility_toml() + "[metrics]\nport = -1\n", "metrics.port"),
    (mobility_toml() + "[consistency]\nscript_timeout_seconds = -5\n", "consistency.script_timeout_seconds"),
])
def test_negative_number(tmp_path, text, path):
    err = config_error(tmp_path, MobilityConfig, text)
    assert err.path == path and "must not be negative" in str(err)


@pytest.mark.parametrize("table,key,value", [("log", "level", "verbose"), ("log", "format", "xml"),
                                             ("log", "level", "INFO")])
def test_choices(tmp_path, table, key, value):
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + f'[{table}]\n{key} = "{value}"\n')
    assert err.path == f"{table}.{key}" and f"{value!r} is not one of" in str(err)


def test_process_server_cross_checks(tmp_path):
    err = config_error(tmp_path, ProcessServerConfig, ps_toml(cache='dir = "/c"\nhigh_water_ratio = 1.5\n'))
    assert err.path == "cache.high_water_ratio"
    err = config_error(tmp_path, ProcessServerConfig, ps_toml(cache='dir = "/c"\nmax_bytes = 1000\n'))
    assert err.path == "cache.max_bytes"
    err = config_error(tmp_path, ProcessServerConfig, ps_toml(repository='url = "local:/r"\n'))
    assert err.path == "repository.key_file"
    cfg = load_text(tmp_path, ProcessServerConfig, ps_toml(repository='url = "/r"\npassphrase_file = "/p"\n'))
    assert cfg.repository.passphrase_file == "/p"


def test_missing_file_and_bad_toml(tmp_path):
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load(MobilityConfig, missing)
    assert info.value.path == missing
    err = config_error(tmp_path, MobilityConfig, "machine = \n")
    assert "not valid TOML" in str(err) and err.path.endswith("cfg.toml")


def test_credentials_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.resolve_credential("%d/agent.token") == str(tmp_path / "agent.token")
    assert config.resolve_credential("/etc/x") == "/etc/x"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        config.resolve_credential("%d/agent.token")


def test_snapshot_providers_are_an_ordered_list_of_known_names(tmp_path):
    cfg = load_text(tmp_path, MobilityConfig, mobility_toml() + '[snapshot]\nproviders = ["freeze-copy", "none"]\n')
    assert cfg.snapshot.providers == ["freeze-copy", "none"]
    assert load_text(tmp_path, MobilityConfig, mobility_toml()).snapshot.providers == [
        "reflink", "lvm", "freeze-copy", "none"]
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + '[snapshot]\nproviders = ["reflink", "zfs"]\n')
    assert err.path == "snapshot.providers[1]" and "'zfs' is not one of reflink, lvm, freeze-copy, none" in str(err)
    err = config_error(tmp_path, MobilityConfig, mobility_toml() + '[snapshot]\nproviders = "reflink"\n')
    assert err.path == "snapshot.providers" and "expected an array of strings" in str(err)


def test_forward_mode_needs_the_master_targets_ca_and_token_but_no_repository_key(tmp_path):
    forward = '[forward]\nmaster_target_url = "https://mt:9444"\n'
    err = config_error(tmp_path, ProcessServerConfig, ps_toml(repository='url = "local:/r"\n') + forward)
    assert err.path == "forward.ca_cert"
    cfg = load_text(tmp_path, ProcessServerConfig, ps_toml(repository='url = "local:/r"\n') + forward
                    + 'ca_cert = "/ca.pem"\ntoken_file = "/mt.token"\n')
    assert cfg.forward.master_target_url == "https://mt:9444" and not cfg.repository.key_file
    assert load_text(tmp_path, ProcessServerConfig, ps_toml()).forward.master_target_url == ""
