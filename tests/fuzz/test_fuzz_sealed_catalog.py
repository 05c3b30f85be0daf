"""Fuzz sealed objects and catalog entries (core/sealed.py, core/catalog.py): IntegrityError or the exact entry."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation, mutated
from lifeboat.core import sealed
from lifeboat.core.catalog import PointEntry, point_object_name
from lifeboat.core.errors import IntegrityError

KEY = bytes(range(32, 64))
ENTRY = PointEntry(point_id="web01-1", machine="web01", disk_id="web01.sda", seq=3, frame_index=2,
                   disk_size=1 << 20, created=1.5, consistency="crash", cycle=1, block_size=65536,
                   image_digest="ab" * 16, group="g", group_tag="t1", group_members=("web01", "web02"))
NAME = point_object_name(ENTRY.disk_id, ENTRY.point_id)
VALID = sealed.seal_object(KEY, NAME, sealed.OBJECT_POINT, ENTRY.to_json())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def open_entry(data: bytes, name: str = NAME) -> PointEntry | None:
    with bounded_allocation(4 * len(data) + 64 * 1024, "catalog entry"):
        try:
            return PointEntry.from_json(name, sealed.open_object(KEY, name, sealed.OBJECT_POINT, data))
        except IntegrityError as exc:
            assert name in str(exc)
            return None


@given(st.binary(max_size=512))
@example(sealed.SEALED_HEADER.pack(b"LBOB", 1, 2, 0))
def test_random_bytes_give_a_clean_error(data):
    assert open_entry(data) is None


@given(mutated(VALID, ((4, "<B"), (5, "<B"), (6, "<H"))))
def test_mutated_entries_give_a_clean_error_or_the_exact_entry(data):
    got = open_entry(data)
    assert got is None or got == ENTRY


def test_an_entry_under_another_name_fails():
    assert open_entry(VALID, point_object_name("web01.sdb", ENTRY.point_id)) is None


@given(st.dictionaries(st.sampled_from(sorted(ENTRY.to_json()) + ["extra"]), json_values, max_size=16),
       st.booleans())
@example({"version": 1, "group_members": "abc"}, True)   # a string is not a list of members
@example({"version": 1, "seq": "3"}, True)                # a catalog entry with a text sequence number
@example({"version": 1, "created": True}, True)           # JSON true is not a timestamp
@example({"created": 0}, True)                            # an integer timestamp is a number (deep run)
def test_well_sealed_bodies_of_any_shape_are_checked_field_by_field(fields, start_valid):
    """A key holder (or a bug) can seal any JSON: the reader checks every field's type, never crashes later."""
    body = {**ENTRY.to_json(), **fields} if start_valid else fields
    got = open_entry(sealed.seal_object(KEY, NAME, sealed.OBJECT_POINT, body))
    if got is not None:
        for name, value in got.to_json().items():
            want = type(getattr(ENTRY, name))
            want = {tuple: list, float: (int, float)}.get(want, want)  # JSON has one number type for created
            assert isinstance(value, want) and not isinstance(value, bool), (name, value)
        assert all(isinstance(m, str) for m in got.group_members)


def test_deeply_nested_body_is_a_clean_error():
    """Regression: json.loads raised RecursionError (not ValueError) for a deeply nested, well-sealed body."""
    header = sealed.SEALED_HEADER.pack(sealed.SEALED_MAGIC, sealed.SEALED_VERSION, sealed.OBJECT_POINT, 0)
    from lifeboat.core import crypto
    data = header + crypto.seal(KEY, b"[" * 100_000, header + NAME.encode())
    assert open_entry(data) is None


def test_config_object_round_trip_and_type_confusion():
    config = {"version": 1, "id": "ab", "created": 1.0, "cipher": "aegis256", "compression": "zstd-1"}
    blob = sealed.seal_object(KEY, "config", sealed.OBJECT_CONFIG, config)
    assert sealed.open_object(KEY, "config", sealed.OBJECT_CONFIG, blob) == config
    try:
        sealed.open_object(KEY, "config", sealed.OBJECT_POINT, blob)
    except IntegrityError as exc:
        assert "type" in str(exc)
    else:
        raise AssertionError("a config object was accepted as a catalog entry")
    assert json.loads(json.dumps(config)) == config


def _open_repository_with_config(body: object) -> None:
    """A repository whose key opens and whose config object is well sealed around `body`."""
    import asyncio
    import tempfile

    from lifeboat.core import crypto, keys
    from lifeboat.core.errors import LifeboatError
    from lifeboat.repository.local import LocalBackend
    from lifeboat.repository.repo import CONFIG_NAME, KEYS_PREFIX, Repository

    master = bytes(range(200, 232))
    unlocker = keys.Unlocker(keys.KDF_KEYFILE, bytes(32))
    object_key = crypto.derive_subkey(master, b"lifeboat-object")
    header = sealed.SEALED_HEADER.pack(sealed.SEALED_MAGIC, sealed.SEALED_VERSION, sealed.OBJECT_CONFIG, 0)
    blob = header + crypto.seal(object_key, json.dumps(body).encode(), header + CONFIG_NAME.encode())

    async def run() -> None:
        with tempfile.TemporaryDirectory() as d:
            backend = LocalBackend(d)
            await backend.put(KEYS_PREFIX + "00", keys.wrap_master_key(master, "00", unlocker))
            await backend.put(CONFIG_NAME, blob)
            try:
                repo = await Repository.open(backend, unlocker)
            except LifeboatError as exc:
                assert str(exc)
                return
            assert isinstance(repo.id, str) and repo.config["version"] == 1

    asyncio.run(run())


@given(st.dictionaries(st.sampled_from(["version", "id", "created", "cipher", "compression", "x"]), json_values,
                       max_size=6) | json_values)
@example({"version": 1})                 # no id: Repository.open raised KeyError
@example({"version": 1, "id": 7})        # an id that is not a string
@example({"version": True, "id": "ab"})  # JSON true == 1 in Python
def test_repository_config_objects_of_any_shape_open_or_fail_cleanly(body):
    _open_repository_with_config(body)
