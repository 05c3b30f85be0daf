"""SegmentReader.decode and crypto.open_sealed_into, the failover's copy-free decode path: the same
plaintext as payload(), and the same refusals of a modified record."""

from __future__ import annotations

import os

import pytest

from lifeboat.core import crypto
from lifeboat.core.errors import IntegrityError
from lifeboat.core.segment import SegmentHeader, SegmentReader, assemble_segment, encode_record
from lifeboat.core.wire import FRAME_WRITE, FRAME_ZERO, Frame

KEY = bytes(range(32))
DISK, SEQ = "web01.sda", 3
TEXT = b"lifeboat " * 50_000
RANDOM = os.urandom(300_000)


def segment(frames: list[Frame]) -> bytes:
    header = SegmentHeader(DISK, SEQ, 1 << 20, len(frames))
    hb = header.encode()
    return b"".join(assemble_segment(KEY, header, [encode_record(KEY, hb, i, f) for i, f in enumerate(frames)]))


FRAMES = [Frame(FRAME_WRITE, 0, len(TEXT), TEXT), Frame(FRAME_ZERO, 4096, 8192),
          Frame(FRAME_WRITE, 8192, len(RANDOM), RANDOM)]


def test_decode_matches_payload_with_a_small_reused_scratch():
    reader = SegmentReader("seg", segment(FRAMES), KEY, DISK, SEQ)
    scratch = bytearray(16)   # too small: decode must grow its own buffer, not overrun this one
    for i, f in enumerate(FRAMES):
        assert bytes(reader.decode(i, scratch)) == reader.payload(i) == (f.payload or b"")
    assert reader.entries[0].compression and not reader.entries[2].compression   # both branches ran


def test_decode_refuses_a_flipped_byte_in_a_record():
    data = bytearray(segment(FRAMES))
    reader = SegmentReader("seg", bytes(data), KEY, DISK, SEQ)
    e = reader.entries[2]
    data[e.record_offset + crypto.NONCE_BYTES + 100] ^= 1
    bad = SegmentReader("seg", bytes(data), KEY, DISK, SEQ)
    with pytest.raises(IntegrityError, match="record 2 .*authentication tag mismatch"):
        bad.decode(2, bytearray(1 << 20))


def test_open_sealed_into_checks_its_aad_and_output_size():
    sealed = crypto.seal(KEY, b"x" * 1000, b"aad")
    out = bytearray(1000)
    assert crypto.open_sealed_into(KEY, memoryview(sealed), b"aad", out) == 1000 and out == b"x" * 1000
    with pytest.raises(crypto.AuthenticationFailed):
        crypto.open_sealed_into(KEY, sealed, b"other", out)
    with pytest.raises(ValueError, match="cannot hold 1000 bytes"):
        crypto.open_sealed_into(KEY, sealed, b"aad", bytearray(999))
    with pytest.raises(crypto.AuthenticationFailed, match="shorter than nonce"):
        crypto.open_sealed_into(KEY, sealed[:10], b"aad", out)
