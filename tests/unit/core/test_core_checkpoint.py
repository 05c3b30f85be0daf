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


def manifest(size: int = 10 * CHUNK + 4096, present=(0, 3, 10), seq: int = 7) -> ck.Manifest:
    return ck.Manifest(DISK, seq, size, CHUNK, b"B" * 16, tuple(present))


def test_header_sizes_are_fixed():
    assert ck.CHUNK_HEADER.size == 48
    assert ck.MANIFEST_HEADER.size == 52


def test_manifest_round_trip_and_names():
    m = manifest()
    name = ck.manifest_name(DISK, 7)
    assert name == "checkpoints/web01.sda/00000000000000000007/manifest"
    assert ck.parse_object_name(name) == (DISK, 7, "manifest")
    assert ck.parse_object_name(ck.chunk_name(DISK, 7, 3)) == (DISK, 7, "0000000003")
    assert ck.parse_object_name("disks/web01.sda/log/1") is None
    assert ck.open_manifest(KEY, name, ck.seal_manifest(KEY, m)) == m
    assert m.chunk_count == 11


def test_chunk_round_trip_last_chunk_is_short_and_incompressible_data_stays_raw():
    m = manifest()
    last = os.urandom(4096)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, 7, 10), 10, 10 * CHUNK, m.build_id, last)
    assert ck.open_chunk(KEY, ck.chunk_name(DISK, 7, 10), m, 10, blob) == last
    text = b"lifeboat " * (CHUNK // 9) + b"x" * (CHUNK % 9)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, 7, 0), 0, 0, m.build_id, text)
    assert len(blob) < len(text) // 10 and ck.open_chunk(KEY, ck.chunk_name(DISK, 7, 0), m, 0, blob) == text
    assert b"lifeboat" not in blob


def test_a_chunk_cannot_be_moved_to_another_position_disk_or_build():
    m = manifest()
    data = os.urandom(CHUNK)
    blob = ck.seal_chunk(KEY, ck.chunk_name(DISK, 7, 3), 3, 3 * CHUNK, m.build_id, data)
    with pytest.raises(IntegrityError, match="manifest expects chunk 0"):
        ck.open_chunk(KEY, ck.chunk_name(DISK, 7, 0), m, 0, blob)
    with pytest.raises(IntegrityError, match="authentication"):
        ck.open_chunk(KEY, ck.chunk_name("web01.sdb", 7, 3), m, 3, blob)
    with pytest.raises(IntegrityError, match="another build"):
        ck.open_chunk(KEY, ck.chunk_name(DISK, 7, 3), ck.Manifest(DISK, 7, m.disk_size, CHUNK, b"C" * 16, m.present),
                      3, blob)


def test_a_manifest_cannot_be_moved_to_another_checkpoint():
    blob = ck.seal_manifest(KEY, manifest(seq=7))
    with pytest.raises(IntegrityError, match="sequence 7, its name says 8"):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 8), blob)
    with pytest.raises(IntegrityError, match="authentication"):
        ck.open_manifest(KEY, ck.manifest_name("db01.sda", 7), blob)


@pytest.mark.parametrize("field, value, match", [
    (0, b"XXXX", "magic"), (1, 9, "version"), (6, 1000, "chunk size"), (7, 1, "chunks"), (8, 99, "chunks"),
])
def test_manifest_header_fields_are_checked_before_decrypting(field, value, match):
    blob = ck.seal_manifest(KEY, manifest())
    fields = list(ck.MANIFEST_HEADER.unpack_from(blob))
    fields[field] = value
    bad = ck.MANIFEST_HEADER.pack(*fields) + blob[ck.MANIFEST_HEADER.size:]
    with pytest.raises(IntegrityError, match=match):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 7), bad)


def test_a_huge_declared_geometry_is_refused_without_allocating():
    fields = [ck.MANIFEST_MAGIC, 1, 0, 0, 7, 1 << 62, CHUNK, 0xFFFFFFFF, 0, b"B" * 16]
    with pytest.raises(IntegrityError, match="more than"):
        ck.open_manifest(KEY, ck.manifest_name(DISK, 7), ck.MANIFEST_HEADER.pack(*fields))


def test_every_flipped_byte_of_a_chunk_is_detected():
    m = manifest()
    name = ck.chunk_name(DISK, 7, 3)
    blob = ck.seal_chunk(KEY, name, 3, 3 * CHUNK, m.build_id, os.urandom(CHUNK))
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
               lambda: ck.open_chunk(KEY, ck.chunk_name(DISK, 7, 3), m, 3, data)):
        with pytest.raises(IntegrityError):
            fn()
