"""Sealed repository objects (core/sealed.py) and catalog entries (core/catalog.py)."""

from __future__ import annotations

import json

import pytest

from lifeboat.core import crypto
from lifeboat.core.catalog import PointEntry, point_object_name
from lifeboat.core.errors import IntegrityError
from lifeboat.core.sealed import (
    MAX_SEALED_BYTES,
    OBJECT_CONFIG,
    OBJECT_POINT,
    SEALED_HEADER,
    open_object,
    seal_object,
)

KEY = crypto.derive_subkey(bytes(32), b"test-objects")
BODY = {"version": 1, "id": "abc", "nested": {"list": [1, 2, 3]}, "unicode": "snø"}


def entry(**over) -> PointEntry:
    fields = dict(point_id="p-0001", machine="web01", disk_id="web01.sda", seq=17, frame_index=4,
                  disk_size=1 << 30, created=1700000000.25, consistency="app", cycle=9, block_size=65536,
                  image_digest="0f" * 16)
    fields.update(over)
    return PointEntry(**fields)


# -- sealed objects --------------------------------------------------------------------------------

def test_round_trip():
    data = seal_object(KEY, "config", OBJECT_CONFIG, BODY)
    assert open_object(KEY, "config", OBJECT_CONFIG, data) == BODY


def test_body_is_encrypted():
    data = seal_object(KEY, "config", OBJECT_CONFIG, {"secret": "hunter2-very-distinct"})
    assert b"hunter2" not in data and b"secret" not in data


def test_sealing_twice_gives_different_bytes():
    # Random nonces: the same body never produces the same object.
    assert seal_object(KEY, "config", OBJECT_CONFIG, BODY) != seal_object(KEY, "config", OBJECT_CONFIG, BODY)


def test_name_is_bound_into_the_aad():
    data = seal_object(KEY, "points/web01.sda/p1", OBJECT_POINT, BODY)
    with pytest.raises(IntegrityError, match="authentication tag mismatch") as info:
        open_object(KEY, "points/web01.sda/p2", OBJECT_POINT, data)
    assert info.value.object_name == "points/web01.sda/p2"
    assert "points/web01.sda/p2" in str(info.value)


def test_type_mismatch():
    data = seal_object(KEY, "config", OBJECT_CONFIG, BODY)
    with pytest.raises(IntegrityError, match=f"object type {OBJECT_CONFIG}, expected {OBJECT_POINT}"):
        open_object(KEY, "config", OBJECT_POINT, data)


def test_type_byte_is_authenticated():
    # Rewriting the type byte to match the reader's expectation still fails: the header is AAD.
    data = bytearray(seal_object(KEY, "config", OBJECT_CONFIG, BODY))
    data[5] = OBJECT_POINT
    with pytest.raises(IntegrityError, match="authentication tag mismatch"):
        open_object(KEY, "config", OBJECT_POINT, bytes(data))


def test_wrong_key():
    data = seal_object(KEY, "config", OBJECT_CONFIG, BODY)
    with pytest.raises(IntegrityError, match="authentication"):
        open_object(crypto.new_key(), "config", OBJECT_CONFIG, data)


def test_every_byte_flip_is_detected():
    data = seal_object(KEY, "config", OBJECT_CONFIG, {"a": 1})
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x80
        with pytest.raises(IntegrityError) as info:
            open_object(KEY, "config", OBJECT_CONFIG, bytes(damaged))
        assert info.value.object_name == "config"


def test_header_rejections_name_the_problem():
    data = seal_object(KEY, "config", OBJECT_CONFIG, BODY)
    with pytest.raises(IntegrityError, match="magic b'XBOB' is not b'LBOB'"):
        open_object(KEY, "config", OBJECT_CONFIG, b"X" + data[1:])
    with pytest.raises(IntegrityError, match="sealed-object version 7 is not supported"):
        open_object(KEY, "config", OBJECT_CONFIG, data[:4] + b"\x07" + data[5:])


@pytest.mark.parametrize("cut", [0, 1, SEALED_HEADER.size - 1, SEALED_HEADER.size, SEALED_HEADER.size + 40, -1])
def test_truncated(cut):
    data = seal_object(KEY, "config", OBJECT_CONFIG, BODY)
    with pytest.raises(IntegrityError):
        open_object(KEY, "config", OBJECT_CONFIG, data[:cut])


def test_oversized_object_is_refused_before_decrypting():
    with pytest.raises(IntegrityError, match=f"exceeds {MAX_SEALED_BYTES}"):
        open_object(KEY, "config", OBJECT_CONFIG, b"LBOB" + bytes(MAX_SEALED_BYTES))


def test_body_must_be_a_json_object():
    data = seal_object(KEY, "config", OBJECT_CONFIG, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="not a JSON object"):
        open_object(KEY, "config", OBJECT_CONFIG, data)


def test_body_must_be_json():
    header = SEALED_HEADER.pack(b"LBOB", 1, OBJECT_CONFIG, 0)
    data = header + crypto.seal(KEY, b"\xff not json", header + b"config")
    with pytest.raises(IntegrityError, match="body is not JSON"):
        open_object(KEY, "config", OBJECT_CONFIG, data)


# -- catalog entries -------------------------------------------------------------------------------

def test_point_entry_round_trip_through_a_sealed_object():
    e = entry()
    name = point_object_name(e.disk_id, e.point_id)
    assert name == "points/web01.sda/p-0001"
    body = open_object(KEY, name, OBJECT_POINT, seal_object(KEY, name, OBJECT_POINT, e.to_json()))
    assert PointEntry.from_json(name, body) == e


def test_point_entry_json_is_plain_json():
    assert json.loads(json.dumps(entry().to_json()))["version"] == 1


@pytest.mark.parametrize("field", ["point_id", "machine", "disk_id", "seq", "frame_index", "disk_size", "created",
                                   "consistency", "cycle", "block_size", "image_digest"])
def test_point_entry_missing_field(field):
    body = entry().to_json()
    del body[field]
    with pytest.raises(IntegrityError, match=f"catalog entry lacks a field: '{field}'") as info:
        PointEntry.from_json("points/x/y", body)
    assert info.value.object_name == "points/x/y"


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_point_entry_bad_version(version):
    body = entry().to_json()
    if version is None:
        del body["version"]
    else:
        body["version"] = version
    with pytest.raises(IntegrityError, match=f"catalog entry version {version!r} is not supported"):
        PointEntry.from_json("points/x/y", body)


@pytest.mark.parametrize("consistency", ["App", "filesystem", "", None])
def test_point_entry_bad_consistency(consistency):
    body = entry().to_json()
    body["consistency"] = consistency
    with pytest.raises(IntegrityError, match="unknown consistency"):
        PointEntry.from_json("points/x/y", body)


def test_point_entry_drops_unknown_extra_keys():
    # Extra keys from a newer writer are dropped, the known ones must all be there.
    body = entry().to_json() | {"future": 1}
    assert PointEntry.from_json("n", body) == entry()
