"""Fuzz the batch decoder (core/wire.py): a clean FrameError or the exact batch, never more than one frame buffered."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation, mutated
from lifeboat.core import wire
from lifeboat.core.errors import FrameError
from lifeboat.core.wire import BATCH_HEADER, FRAME_HEADER, BatchBuilder, BatchHeader, BatchParser, encode_frame

DISK = "web01.sda"
DISK_SIZE = 1 << 20
BOOKMARK = {"point_id": "web01-1", "machine": "web01", "created": 1.5, "consistency": "crash", "cycle": 3,
            "block_size": 65536, "image_digest": "00"}


@st.composite
def batches(draw) -> tuple[bytes, list[tuple]]:
    seq = draw(st.integers(1, 2**64 - 1))
    b = BatchBuilder(DISK, seq, DISK_SIZE)
    frames = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([wire.FRAME_WRITE, wire.FRAME_ZERO, wire.FRAME_BOOKMARK]))
        offset = draw(st.integers(0, DISK_SIZE // 512 - 2)) * 512
        length = draw(st.integers(1, min(4, (DISK_SIZE - offset) // 512))) * 512
        if kind == wire.FRAME_WRITE:
            data = draw(st.binary(min_size=length, max_size=length))
            b.write(offset, data)
            frames.append((kind, offset, length, data))
        elif kind == wire.FRAME_ZERO:
            b.zero(offset, length)
            frames.append((kind, offset, length, b""))
        else:
            b.bookmark(BOOKMARK)
            frames.append((kind, 0, 0, None))
    return b.to_bytes(), frames


def field_offsets(body: bytes) -> tuple[tuple[int, str], ...]:
    """Length and count fields of the batch header and of the first frame header."""
    fixed = BATCH_HEADER.size
    first = fixed + len(DISK.encode()) + 8
    return ((6, "<H"), (8, "<Q"), (16, "<Q"), (24, "<I"),
            (first + 4, "<I"), (first + 8, "<Q"), (first + 16, "<Q"), (first, "<B"))


def reencode(header: BatchHeader, frames: list[wire.Frame]) -> bytes:
    parts = [header.encode()]
    for i, f in enumerate(frames):
        parts += encode_frame(i, f.kind, f.offset, f.length, f.payload)
    return b"".join(bytes(p) for p in parts)


def decode(data: bytes, chunk: int | None = None):
    """The server's way: feed chunks into a parser bound to the URL's disk, then finish()."""
    parser = BatchParser(expected_disk_id=DISK)
    frames = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        frames += parser.feed(data[i: i + step])
    return parser.finish(), frames


def check(data: bytes, chunk: int | None = None) -> None:
    # Never more than the input plus one frame's header: a declared length is checked before it is buffered.
    with bounded_allocation(4 * len(data) + 256 * 1024, "BatchParser"):
        try:
            header, frames = decode(data, chunk)
        except FrameError as exc:
            assert str(exc), "a rejection must say what was wrong"
            return
    # Accepted: the decoded batch is exactly what the bytes encode.
    assert reencode(header, frames) == data


@given(st.binary(max_size=4096))
@example(b"LBWB")
@example(BATCH_HEADER.pack(b"LBWB", 1, 0, 9, 1, 512, 1, 0) + DISK.encode())
def test_random_bytes_give_a_clean_error(data):
    check(data)


@given(batches())
def test_valid_batches_decode_exactly_in_any_chunking(batch):
    body, frames = batch
    header, got = decode(body)
    assert [(f.kind, f.offset, f.length) for f in got] == [(k, o, n) for k, o, n, _ in frames]
    for f, (kind, _, _, data) in zip(got, frames):
        if kind == wire.FRAME_WRITE:
            assert bytes(f.payload) == data
    assert reencode(header, got) == body
    for chunk in (1, 7, 512):
        _, again = decode(body, chunk)
        assert [(f.kind, f.offset, bytes(f.payload)) for f in again] == [(f.kind, f.offset, bytes(f.payload)) for f in got]


@given(st.data())
def test_mutated_batches_give_a_clean_error_or_the_exact_batch(data):
    body, _ = data.draw(batches())
    bad = data.draw(mutated(body, field_offsets(body)))
    check(bad, data.draw(st.sampled_from([None, 1, 13, 4096])))


def _resealed_header(disk_size: int, frame_count: int, seq: int = 1) -> bytes:
    return BatchHeader(DISK, seq, disk_size, frame_count).encode()


def test_huge_declared_frame_length_allocates_nothing():
    head = _resealed_header(DISK_SIZE, 1)
    frame = FRAME_HEADER.pack(wire.FRAME_WRITE, 0, 0, 2**32 - 1, 0, 2**32 - 1)
    with bounded_allocation(64 * 1024, "huge payload_len"):
        try:
            BatchParser(DISK).feed(head + frame)
        except FrameError as exc:
            assert "exceeds the limit" in str(exc)
        else:
            raise AssertionError("a 4 GiB payload_len was accepted")


def test_streamed_body_buffers_at_most_one_frame():
    """The ingest feeds 256 KiB chunks: a frame declaring the maximum payload is buffered, never more."""
    head = _resealed_header(8 << 20, 1)
    n = wire.MAX_FRAME_PAYLOAD_BYTES
    frame = FRAME_HEADER.pack(wire.FRAME_WRITE, 0, 0, n, 0, n)
    parser = BatchParser(DISK)
    parser.feed(head + frame)
    chunk = bytes(256 * 1024)
    # The frame in the buffer, its payload copy and the bytearray's growth slack: ~3 frames, not the body.
    with bounded_allocation(4 * n, "streamed frame"):
        try:
            for _ in range(n // len(chunk) + 4):
                parser.feed(chunk)
        except FrameError as exc:
            assert "checksum" in str(exc)
        else:
            raise AssertionError("a frame of zeros with a zero checksum was accepted")


def test_header_checksum_covers_the_disk_id():
    body = bytearray(_resealed_header(DISK_SIZE, 0))
    body[BATCH_HEADER.size] ^= 1  # "web01.sda" -> "veb01.sda": a valid id, a wrong checksum
    try:
        BatchParser().feed(bytes(body))
    except FrameError as exc:
        assert "checksum" in str(exc)
    else:
        raise AssertionError("header checksum not checked")
