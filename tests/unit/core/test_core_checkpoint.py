"""Checkpoint manifest and chunk objects: round trip, every field bound, damage refused with its name."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifeboat.core import checkpoint as ck
from lifeboat.core import crypto
from lifeboat.core.errors import IntegrityError

KEY = crypto.new_key()
DISK = "web01.sda"
CHUNK = ck.MIN_CHUNK_BYTES


ID_KEY = ck.chunk_id_key(KEY)
CID = bytes(range(32))


def manifest(size: int = 10 * CHUNK + 4096, present=(0, 3, 10), seq: int = 7) -> ck.Manifest:
    return ck.Manifest(DISK, seq, size, CHUNK, tuple((i, bytes([i]) * 32) for i in present))


def test_header_sizes_are_fixed():
    assert ck.CHUNK_HEADER.size == 32
    assert ck.MANIFEST_HEADER.size == 36
    assert ck.CHUNK_REF.size == 36


def test_manifest_round_trip_and_names():
    m = manifest()
    name = ck.manifest_name(DISK, 7)
    assert name == "checkpoints/web01.sda/00000000000000000007/manifest"
    assert ck.parse_object_name(name) == ("manifest", DISK, 7)
    assert ck.chunk_name(DISK, CID) == "checkpoints/web01.sda/chunks/" + CID.hex()
    assert ck.parse_object_name(ck.chunk_name(DISK, CID)) == ("chunk", DISK, CID)
    for other in ("disks/web01.sda/log/1", "checkpoints/web01.sda/7/manifest", "checkpoints/web01.sda/chunks/ab"):
        assert ck.parse_object_name(other) is None
    assert ck.open_manifest(KEY, name, ck.seal_manifest(KEY, m)) == m
    assert m.chunk_count == 11 and m.chunk_len(10) == 4096
    empty = manifest(present=())
    assert ck.open_manifest(KEY, name, ck.seal_manifest(KEY, empty)) == empty


def test_chunk_ids_depend_on_key_position_and_content():
    data = os.urandom(4096)
    a = ck.chunk_id(ID_KEY, 0, data)
    assert a == ck.chunk_id(ID_KEY, 0, bytes(data)) and len(a) == 32
    assert a != ck.chunk_id(ID_KEY, CHUNK, data)
    assert a != ck.chunk_id(ID_KEY, 0, data[:-1] + bytes([data[-1] ^ 1]))
    assert a != ck.chunk_id(ck.chunk_id_key(crypto.new_key()), 0, data)


def test_chunk_round_trip_last_chunk_is_short_and_incompressible_data_stays_raw():
    m = manifest()
    last = os.urandom(4096)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, CID), 10, 10 * CHUNK, last)
    assert ck.open_chunk(KEY, ck.chunk_name(DISK, CID), m, 10, blob) == last
    text = b"lifeboat " * (CHUNK // 9) + b"x" * (CHUNK % 9)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, CID), 0, 0, text)
    assert len(blob) < len(text) // 10 and ck.open_chunk(KEY, ck.chunk_name(DISK, CID), m, 0, blob) == text
    assert b"lifeboat" not in blob


def test_a_chunk_cannot_be_moved_to_another_position_disk_or_id():
    m = manifest()
    data = os.urandom(CHUNK)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, CID), 3, 3 * CHUNK, data)
    with pytest.raises(IntegrityError, match="manifest expects chunk 0"):
        ck.open_chunk(KEY, ck.chunk_name(DISK, CID), m, 0, blob)
    with pytest.raises(IntegrityError, match="authentication"):
        ck.open_chunk(KEY, ck.chunk_name("web01.sdb", CID), m, 3, blob)
    with pytest.raises(IntegrityError, match="authentication"):
        ck.open_chunk(KEY, ck.chunk_name(DISK, bytes(32)), m, 3, blob)


def test_a_manifest_cannot_be_moved_to_another_checkpoint():
    blob = ck.seal_manifest(KEY, manifest(seq=7))
    with pytest.raises(IntegrityError, match="sequence 7, its name says 8"):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 8), blob)
    with pytest.raises(IntegrityError, match="authentication"):
        ck.open_manifest(KEY, ck.manifest_name("db01.sda", 7), blob)


@pytest.mark.parametrize("field, value, match", [
    (0, b"XXXX", "magic"), (1, 9, "version"), (6, 1000, "chunk size"), (7, 1, "chunks"), (8, 99, "chunks"),
    (8, 2, "does not hold 2 chunk references"),
])
def test_manifest_header_fields_are_checked_before_decrypting(field, value, match):
    blob = ck.seal_manifest(KEY, manifest())
    fields = list(ck.MANIFEST_HEADER.unpack_from(blob))
    fields[field] = value
    bad = ck.MANIFEST_HEADER.pack(*fields) + blob[ck.MANIFEST_HEADER.size:]
    with pytest.raises(IntegrityError, match=match):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 7), bad)


def test_a_huge_declared_geometry_is_refused_without_allocating():
    fields = [ck.MANIFEST_MAGIC, 1, 0, 0, 7, 1 << 62, CHUNK, 0xFFFFFFFF, 0]
    with pytest.raises(IntegrityError, match="more than"):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 7), ck.MANIFEST_HEADER.pack(*fields))


def test_every_flipped_byte_of_a_chunk_is_detected():
    m = manifest()
    name = ck.chunk_name(DISK, CID)
    blob = ck.seal_chunk(KEY, name, 3, 3 * CHUNK, os.urandom(CHUNK))
    for pos in list(range(0, ck.CHUNK_HEADER.size)) + [ck.CHUNK_HEADER.size + 5, len(blob) // 2, len(blob) - 1]:
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(IntegrityError):
            ck.open_chunk(KEY, name, m, 3, bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_manifests_and_chunks_raise_only_integrity_errors(data):
    m = manifest()
    for fn in (lambda: ck.open_manifest(KEY, ck.manifest_name(DISK, 7), data),
               lambda: ck.open_chunk(KEY, ck.chunk_name(DISK, CID), m, 3, data)):
        with pytest.raises(IntegrityError):
            fn()


def test_unordered_or_out_of_disk_references_are_refused():
    for refs in (((3, CID), (1, CID)), ((3, CID), (3, CID)), ((11, CID),)):
        m = ck.Manifest(DISK, 7, 10 * CHUNK + 4096, CHUNK, refs)
        with pytest.raises(IntegrityError, match="increasing"):
            ck.open_manifest(KEY, ck.manifest_name(DISK, 7), ck.seal_manifest(KEY, m))
