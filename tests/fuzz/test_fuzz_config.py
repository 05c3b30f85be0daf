"""Fuzz configuration files (core/config.py): a ConfigError naming the key, or a config whose every value has
its declared type and a usable range, never another exception at startup."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import typing
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import mutated
from lifeboat.core import config as cfgmod
from lifeboat.core.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "demo"))
from lab import to_toml  # noqa: E402

PS = {"ingest": {"host": "127.0.0.1", "port": 9443, "tls_cert": "/c.pem", "tls_key": "/c.key",
                 "agent_token_file": "/t", "max_batch_bytes": 1 << 20},
      "cache": {"dir": "/var/cache", "max_bytes": 1 << 30, "high_water_ratio": 0.8},
      "repository": {"url": "local:/r", "key_file": "/k"},
      "upload": {"threads": 2, "retry_max_seconds": 5.0},
      "metrics": {"host": "127.0.0.1", "port": 0}, "log": {"format": "kv"}}
MOBILITY = {"machine": "web01", "state_dir": "/s",
            "process_server": {"url": "https://127.0.0.1:9443", "ca_cert": "/ca", "token_file": "/t"},
            "disks": [{"id": "sda", "path": "/dev/sda"}],
            "replication": {"interval_seconds": 1.0, "block_size": 65536},
            "tracking": {"tracker": "digest", "bitmap_budget_bytes": 1024},
            "group": {"name": "g1", "cert": "/c", "key": "/k", "ca_cert": "/ca",
                      "members": [{"machine": "web01", "address": "127.0.0.1:20004"},
                                  {"machine": "db01", "address": "127.0.0.1:20005"}]}}
CASES = [(cfgmod.ProcessServerConfig, PS), (cfgmod.MobilityConfig, MOBILITY)]

toml_values = st.recursive(
    st.booleans() | st.integers(min_value=-2**63, max_value=2**63 - 1) | st.integers(min_value=10**19, max_value=10**30)
    | st.floats() | st.text(max_size=30) | st.sampled_from(["9" * 5000, "127.0.0.1:" + "9" * 5000, ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
    max_leaves=6)


def paths(doc, prefix=()):
    for k, v in doc.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from paths(v, prefix + (k,))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    yield from paths(item, prefix + (k, i))


@st.composite
def edited(draw, doc: dict) -> dict:
    """The document with a few keys set to values of any TOML type, deleted, or added."""
    import copy
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":
            parent[path[-1]] = draw(toml_values)
        elif op == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(toml_values)
    return doc


def check_types(obj, where: str = "") -> None:
    """An accepted config: every field of its declared type, numbers finite and not negative, ports valid."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_types(value, f"{where}{f.name}.")
        elif isinstance(value, list):
            for item in value:
                if dataclasses.is_dataclass(item):
                    check_types(item, f"{where}{f.name}[].")
                else:
                    assert isinstance(item, str), (where + f.name, item)
        else:
            assert isinstance(value, tp) and not isinstance(value, bool) or tp is bool, (where + f.name, value)
            if tp in (int, float):
                assert math.isfinite(value) and 0 <= value, (where + f.name, value)
                assert tp is float or value < 2**63, (where + f.name, value)
            if f.name == "port":
                assert value < 65536, (where + f.name, value)


def load_text(cls, text: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.toml")
        with open(path, "wb") as f:
            f.write(text)
        try:
            cfg = cfgmod.load(cls, path)
        except ConfigError as exc:
            assert exc.path and str(exc)
            return None
    check_types(cfg)
    return cfg


def test_the_base_documents_are_valid():
    for cls, doc in CASES:
        assert load_text(cls, to_toml(doc).encode()) is not None


@given(st.sampled_from(range(len(CASES))), st.data())
def test_edited_documents_give_a_config_error_or_a_typed_config(case, data):
    cls, doc = CASES[case]
    load_text(cls, to_toml(data.draw(edited(doc))).encode())


@given(st.sampled_from(range(len(CASES))), st.data())
@example(0, None)
def test_mutated_files_give_a_config_error_or_a_typed_config(case, data):
    cls, doc = CASES[case]
    text = to_toml(doc).encode()
    load_text(cls, data.draw(mutated(text)) if data is not None else b"[ingest]\nhost = \"\xff\"\n")


@given(st.binary(max_size=300))
def test_random_bytes_give_a_config_error_or_a_typed_config(data):
    # load_text fails on any exception but ConfigError, and checks the types of whatever it accepts (an
    # empty file is a valid master-target config).
    load_text(cfgmod.MasterTargetConfig, data)


def test_regressions_found_by_fuzzing():
    """Each was an exception other than ConfigError (or a config that crashed the daemon later)."""
    bad = {
        "not UTF-8": b"[log]\nlevel = \"\xff\"\n",
        "int too large for a float": to_toml({**PS, "upload": {"retry_max_seconds": 10**400}}).encode(),
        "huge int times a ratio": to_toml({**PS, "cache": {**PS["cache"], "max_bytes": 10**30}}).encode(),
        "port out of range": to_toml({**PS, "metrics": {"port": 70000}}).encode(),
        "float nan": to_toml({**PS, "upload": {"retry_max_seconds": 1.5}}).replace("1.5", "nan").encode(),
        "float inf": to_toml({**PS, "upload": {"retry_max_seconds": 1.5}}).replace("1.5", "inf").encode(),
    }
    group = MOBILITY["group"]
    bad["5000-digit port in an address"] = to_toml({**MOBILITY, "group": {**group, "members": [
        {"machine": "web01", "address": "h:" + "9" * 5000}, group["members"][1]]}}).encode()
    for what, text in bad.items():
        cls = cfgmod.MobilityConfig if b"machine" in text else cfgmod.ProcessServerConfig
        assert load_text(cls, text) is None, what
    with tempfile.TemporaryDirectory() as d:
        try:
            cfgmod.load(cfgmod.ProcessServerConfig, d)  # a directory, not a file
        except ConfigError as exc:
            assert d in str(exc)
        else:
            raise AssertionError("a directory was loaded as a config file")
