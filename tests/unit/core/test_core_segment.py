"""Repository log segments (core/segment.py): round trip, compression choice, corruption tests."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifeboat.core import compression, crypto
from lifeboat.core.errors import IntegrityError
from lifeboat.core.segment import (
    SEGMENT_HEADER,
    SEGMENT_TRAILER,
    SegmentHeader,
    SegmentReader,
    assemble_segment,
    encode_record,
)
from lifeboat.core.wire import FRAME_BOOKMARK, FRAME_WRITE, FRAME_ZERO, Frame

KEY = bytes(range(32))
DISK = "web01.sda"
SEQ = 12
DISK_SIZE = 1 << 20
NAME = f"disks/{DISK}/log/{SEQ:016d}"

COMPRESSIBLE = b"lifeboat " * 455 + b"x"   # 4096 bytes
RANDOM = os.urandom(4096)
BOOKMARK = {"point_id": "p1", "machine": "web01", "created": 1.0, "consistency": "app", "cycle": 1,
            "block_size": 4096, "image_digest": "00" * 16}


def sample_frames() -> list[Frame]:
    return [
        Frame(FRAME_WRITE, 0, len(COMPRESSIBLE), COMPRESSIBLE),
        Frame(FRAME_ZERO, 8192, 4096),
        Frame(FRAME_WRITE, 16384, len(RANDOM), RANDOM),
        Frame(FRAME_BOOKMARK, 0, 0, json.dumps(BOOKMARK).encode()),
        Frame(FRAME_WRITE, 32768, 512, memoryview(b"\x07" * 512)),
    ]


def build(frames: list[Frame], key: bytes = KEY, disk_id: str = DISK, seq: int = SEQ) -> list[bytes]:
    header = SegmentHeader(disk_id, seq, DISK_SIZE, len(frames))
    header_bytes = header.encode()
    encoded = [encode_record(key, header_bytes, i, f) for i, f in enumerate(frames)]
    return assemble_segment(key, header, encoded)


@pytest.fixture(scope="module")
def parts() -> list[bytes]:
    return build(sample_frames())


@pytest.fixture(scope="module")
def data(parts) -> bytes:
    return b"".join(parts)


def regions(parts: list[bytes]) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of the header, each record, the index and the trailer."""
    out, pos = {}, 0
    for i, p in enumerate(parts):
        if i == 0:
            label = "header"
        elif i == len(parts) - 1:
            label = "trailer"
        elif i == len(parts) - 2:
            label = "index"
        else:
            label = f"record{i - 1}"
        out[label] = (pos, pos + len(p))
        pos += len(p)
    return out


def flipped(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def read_all(data: bytes, **kw) -> list[bytes]:
    reader = SegmentReader(NAME, data, KEY, **kw)
    return [reader.payload(i) for i in range(len(reader.entries))]


# -- round trip ------------------------------------------------------------------------------------

def test_round_trip(data):
    reader = SegmentReader(NAME, data, KEY, disk_id=DISK, seq=SEQ)
    assert reader.header == SegmentHeader(DISK, SEQ, DISK_SIZE, 5)
    frames = sample_frames()
    assert [(e.kind, e.disk_offset, e.length) for e in reader.entries] == [(f.kind, f.offset, f.length) for f in frames]
    assert [reader.payload(i) for i in range(5)] == [bytes(f.payload) for f in frames]
    assert reader.payload(1) == b""
    assert reader.bookmark_indexes() == [3]
    assert json.loads(reader.payload(3)) == BOOKMARK
    reader.verify_all()


def test_zero_frames_have_no_record(data):
    reader = SegmentReader(NAME, data, KEY)
    zero = reader.entries[1]
    assert zero.kind == FRAME_ZERO and zero.record_len == 0 and zero.plain_len == 0


def test_empty_segment_round_trips():
    reader = SegmentReader(NAME, b"".join(build([])), KEY, disk_id=DISK, seq=SEQ)
    assert reader.entries == [] and reader.bookmark_indexes() == []


def test_compressible_data_is_compressed_random_data_is_stored(data):
    reader = SegmentReader(NAME, data, KEY)
    text, rand = reader.entries[0], reader.entries[2]
    assert text.compression == compression.COMPRESSION_ZSTD
    assert text.record_len < len(COMPRESSIBLE) // 10
    assert rand.compression == compression.COMPRESSION_NONE
    assert rand.record_len == crypto.sealed_size(len(RANDOM))
    assert reader.entries[3].compression == compression.COMPRESSION_NONE  # bookmarks are never compressed


def test_plaintext_does_not_appear_in_the_object(data):
    assert RANDOM[:64] not in data and b"lifeboat lifeboat" not in data and b"image_digest" not in data


def test_parts_layout(parts):
    # header, one record per non-zero frame, sealed index, 16-byte trailer
    assert len(parts) == 1 + 4 + 2
    assert len(parts[-1]) == SEGMENT_TRAILER.size
    assert parts[0][:4] == b"LBSG"


# -- corruption ------------------------------------------------------------------------------------

@pytest.mark.parametrize("region", ["header", "index", "trailer"])
def test_flip_in_structure_fails_at_open_and_names_the_object(parts, data, region):
    start, end = regions(parts)[region]
    for pos in range(start, end):
        with pytest.raises(IntegrityError) as info:
            SegmentReader(NAME, flipped(data, pos), KEY)
        assert info.value.object_name == NAME
        assert NAME in str(info.value) and info.value.exit_code == 66


@pytest.mark.parametrize("record", [0, 2, 3, 4])
def test_flip_in_a_record_loses_only_that_record(parts, data, record):
    part = {0: 1, 2: 2, 3: 3, 4: 4}[record]  # the zero frame (1) has no record part
    start, end = regions(parts)[f"record{part - 1}"]
    expected = [bytes(f.payload) for f in sample_frames()]
    for pos in (start, start + 31, start + 32, (start + end) // 2, end - 1):  # nonce, ciphertext, tag
        reader = SegmentReader(NAME, flipped(data, pos), KEY)
        with pytest.raises(IntegrityError, match=f"record {record} at offset {start}") as info:
            reader.payload(record)
        assert info.value.object_name == NAME
        for other in range(5):
            if other != record:
                assert reader.payload(other) == expected[other]
        with pytest.raises(IntegrityError):
            reader.verify_all()


def test_swapped_records_fail(data):
    frames = [Frame(FRAME_WRITE, 0, 4096, os.urandom(4096)), Frame(FRAME_WRITE, 4096, 4096, os.urandom(4096))]
    parts = build(frames)
    assert len(parts[1]) == len(parts[2])
    swapped = b"".join([parts[0], parts[2], parts[1], *parts[3:]])
    reader = SegmentReader(NAME, swapped, KEY)
    for i in range(2):
        with pytest.raises(IntegrityError, match=f"record {i}"):
            reader.payload(i)


def test_record_from_another_segment_fails():
    a = build([Frame(FRAME_WRITE, 0, 512, b"a" * 512)], seq=1)
    b = build([Frame(FRAME_WRITE, 0, 512, b"b" * 512)], seq=2)
    assert len(a[1]) == len(b[1])
    mixed = b"".join([a[0], b[1], *a[2:]])
    with pytest.raises(IntegrityError, match="record 0"):
        SegmentReader(NAME, mixed, KEY).payload(0)


def test_wrong_key(data):
    with pytest.raises(IntegrityError, match="index") as info:
        SegmentReader(NAME, data, bytes(32))
    assert info.value.object_name == NAME


def test_wrong_expected_disk(data):
    with pytest.raises(IntegrityError, match="segment belongs to disk 'web01.sda', expected 'web01.sdb'"):
        SegmentReader(NAME, data, KEY, disk_id="web01.sdb")


def test_wrong_expected_seq(data):
    with pytest.raises(IntegrityError, match=f"segment carries sequence {SEQ}, its name says {SEQ + 1}"):
        SegmentReader(NAME, data, KEY, seq=SEQ + 1)


def test_truncated_object_at_every_length(data):
    for cut in range(len(data)):
        with pytest.raises(IntegrityError) as info:
            SegmentReader(NAME, data[:cut], KEY)
        assert info.value.object_name == NAME


def test_appended_bytes_fail(data):
    with pytest.raises(IntegrityError, match="trailer magic"):
        SegmentReader(NAME, data + b"\0" * 16, KEY)


def test_bad_magic_and_version_messages(data):
    with pytest.raises(IntegrityError, match="magic b'XBSG' is not b'LBSG'"):
        SegmentReader(NAME, b"X" + data[1:], KEY)
    with pytest.raises(IntegrityError, match="segment version 2 is not supported"):
        SegmentReader(NAME, data[:4] + b"\x02" + data[5:], KEY)
    with pytest.raises(IntegrityError, match="unknown cipher id 9"):
        SegmentReader(NAME, data[:5] + b"\x09" + data[6:], KEY)


def test_header_fields_are_authenticated(data):
    # seq lives at offset 8 in SEGMENT_HEADER; changing it (without an expected seq) breaks the index AAD.
    assert SEGMENT_HEADER.unpack_from(data)[5] == SEQ
    with pytest.raises(IntegrityError, match="index: authentication tag mismatch"):
        SegmentReader(NAME, flipped(data, 8), KEY)


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10 ** 9), mask=st.integers(1, 255))
def test_any_single_byte_flip_is_detected(data, pos, mask):
    pos %= len(data)
    damaged = flipped(data, pos, mask)
    with pytest.raises(IntegrityError) as info:
        reader = SegmentReader(NAME, damaged, KEY)
        reader.verify_all()
    assert info.value.object_name == NAME


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=200))
def test_fuzz_arbitrary_objects_only_raise_integrity_error(blob):
    for candidate in (blob, b"LBSG\x01\x01" + blob, blob + SEGMENT_TRAILER.pack(0, 0, b"LBSX")):
        try:
            SegmentReader(NAME, candidate, KEY).verify_all()
        except IntegrityError:
            pass
