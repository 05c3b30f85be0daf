"""Persisted digest map (mobility/digest_map.py): zero maps, save/load, damage, write-ahead UNKNOWN."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifeboat.core.digest import DIGEST_BYTES, block_digest, image_digest
from lifeboat.mobility.digest_map import (
    DIGEST_MAP_HEADER,
    DIGEST_MAP_HEADER_BYTES,
    UNKNOWN_DIGEST,
    DigestMap,
    block_count,
)

BS = 4096


def digests_of_image(path: str, block_size: int) -> bytes:
    """What the tracker computes: xxh3-128 of each block, the last one only as long as the disk."""
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            out += block_digest(chunk)
    return bytes(out)


def zero_image(tmp_path, size: int) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def saved_map(tmp_path, disk_size: int = 10 * BS + 1536, seq: int = 41, cycle: int = 7) -> DigestMap:
    m = DigestMap.fresh(str(tmp_path / "sda.map"), BS, disk_size, replica_is_zero=True)
    for i in range(block_count(disk_size, BS)):  # make every entry distinct so moves are visible
        m.digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = block_digest(i.to_bytes(4, "little"))
    m.seq, m.cycle = seq, cycle
    m.save()
    return m


@pytest.mark.parametrize("disk_size", [BS, 5 * BS, 5 * BS + 512, 5 * BS + BS - 512, 512, 0])
def test_fresh_zero_map_equals_the_digests_of_a_zero_image(tmp_path, disk_size):
    m = DigestMap.fresh(str(tmp_path / "m"), BS, disk_size, replica_is_zero=True)
    expected = digests_of_image(zero_image(tmp_path, disk_size), BS)
    assert bytes(m.digests) == expected
    assert len(m.digests) == block_count(disk_size, BS) * DIGEST_BYTES
    assert image_digest(m.digests) == image_digest(expected)
    assert (m.seq, m.cycle, m.block_size, m.disk_size) == (0, 0, BS, disk_size)


def test_partial_last_block_is_not_the_full_block_digest(tmp_path):
    m = DigestMap.fresh(str(tmp_path / "m"), BS, 2 * BS + 512, replica_is_zero=True)
    assert m.get(0) == m.get(1) == block_digest(bytes(BS))
    assert m.get(2) == block_digest(bytes(512)) != m.get(1)


@settings(max_examples=60, deadline=None)
@given(block_shift=st.integers(9, 16), sectors=st.integers(0, 300))
def test_fresh_zero_map_any_geometry(block_shift, sectors):
    bs, size = 1 << block_shift, sectors * 512
    m = DigestMap.fresh("/nonexistent/m", bs, size, replica_is_zero=True)
    expected = b"".join(block_digest(bytes(min(bs, size - off))) for off in range(0, size, bs))
    assert bytes(m.digests) == expected


def test_fresh_unknown_map(tmp_path):
    m = DigestMap.fresh(str(tmp_path / "m"), BS, 3 * BS + 512, replica_is_zero=False)
    assert bytes(m.digests) == UNKNOWN_DIGEST * 4
    # UNKNOWN never equals a real block digest, so every block is resent.
    assert all(m.get(i) != block_digest(bytes(BS)) for i in range(4))


def test_save_load_round_trip(tmp_path):
    m = saved_map(tmp_path)
    loaded = DigestMap.load(m.path)
    assert loaded is not None
    assert (loaded.block_size, loaded.disk_size, loaded.seq, loaded.cycle) == (BS, m.disk_size, 41, 7)
    assert loaded.digests == m.digests and loaded.path == m.path
    assert os.path.getsize(m.path) == DIGEST_MAP_HEADER_BYTES + 11 * DIGEST_BYTES
    assert not os.path.exists(m.path + ".tmp")


def test_save_replaces_the_previous_map(tmp_path):
    m = saved_map(tmp_path)
    m.seq, m.cycle = 99, 8
    m.digests[:DIGEST_BYTES] = b"\x01" * DIGEST_BYTES
    m.save()
    loaded = DigestMap.load(m.path)
    assert (loaded.seq, loaded.cycle) == (99, 8) and loaded.get(0) == b"\x01" * DIGEST_BYTES


def test_large_values_round_trip(tmp_path):
    m = DigestMap.fresh(str(tmp_path / "m"), 4 * 1024 * 1024, 3 * 4 * 1024 * 1024, replica_is_zero=False)
    m.seq, m.cycle = 2 ** 63, 2 ** 40
    m.save()
    loaded = DigestMap.load(m.path)
    assert (loaded.seq, loaded.cycle, loaded.block_size) == (2 ** 63, 2 ** 40, 4 * 1024 * 1024)


def test_missing_map_loads_as_none(tmp_path):
    assert DigestMap.load(str(tmp_path / "absent.map")) is None


@pytest.mark.parametrize("pos", range(DIGEST_MAP_HEADER.size))
def test_damaged_header_loads_as_none(tmp_path, pos):
    m = saved_map(tmp_path)
    with open(m.path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))
    assert DigestMap.load(m.path) is None


def test_truncated_map_loads_as_none(tmp_path):
    m = saved_map(tmp_path)
    data = open(m.path, "rb").read()
    for cut in [0, 1, DIGEST_MAP_HEADER.size, DIGEST_MAP_HEADER_BYTES, DIGEST_MAP_HEADER_BYTES + 1,
                len(data) - DIGEST_BYTES, len(data) - 1]:
        with open(m.path, "wb") as f:
            f.write(data[:cut])
        assert DigestMap.load(m.path) is None, cut


def test_extended_map_loads_as_none(tmp_path):
    m = saved_map(tmp_path)
    with open(m.path, "ab") as f:
        f.write(UNKNOWN_DIGEST)
    assert DigestMap.load(m.path) is None


def test_map_for_another_geometry_is_not_confused(tmp_path):
    # A header declaring a different disk size needs a different number of entries.
    m = saved_map(tmp_path, disk_size=10 * BS)
    other = DigestMap(m.path, BS, 11 * BS, m.digests, m.seq, m.cycle)
    with open(m.path, "r+b") as f:
        f.write(other.header())
    assert DigestMap.load(m.path) is None


def test_mark_unknown(tmp_path):
    m = saved_map(tmp_path)
    before = bytes(m.digests)
    m.mark_unknown([(0, 2), (5, 1), (10, 1)])
    loaded = DigestMap.load(m.path)
    assert loaded is not None and (loaded.seq, loaded.cycle) == (41, 7)
    for i in range(11):
        if i in (0, 1, 5, 10):
            assert loaded.get(i) == UNKNOWN_DIGEST, i
        else:
            assert loaded.get(i) == before[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES], i
    # In memory too: if the cycle fails after the server took the batch, the next cycle must
    # resend those blocks even if their content returned to what the old digest says.
    assert bytes(m.digests) == bytes(loaded.digests)


def test_mark_unknown_with_no_ranges_leaves_the_file_alone(tmp_path):
    m = saved_map(tmp_path)
    data = open(m.path, "rb").read()
    m.mark_unknown([])
    assert open(m.path, "rb").read() == data


def test_mark_unknown_then_save_restores_known_entries(tmp_path):
    m = saved_map(tmp_path)
    m.mark_unknown([(3, 4)])
    m.save()  # the cycle's batches were all acknowledged
    assert DigestMap.load(m.path).digests == m.digests
