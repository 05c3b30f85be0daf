"""Batch format (core/wire.py): round trips, every rejection path, corruption and fuzzing."""

from __future__ import annotations

import json

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifeboat.core import compression, wire
from lifeboat.core.errors import FormatError, FrameError
from lifeboat.core.wire import (
    BATCH_HEADER,
    BATCH_HEADER_CHECKSUM,
    BATCH_MAGIC,
    BATCH_VERSION,
    FRAME_BOOKMARK,
    FRAME_CHECKSUM,
    FRAME_HEADER,
    FRAME_WRITE,
    FRAME_ZERO,
    MAX_BOOKMARK_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    SECTOR_BYTES,
    BatchBuilder,
    BatchParser,
    encode_frame,
    parse_batch,
)

DISK = "web01.sda"
DISK_SIZE = 64 * SECTOR_BYTES
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def point(**over) -> dict:
    p = {"point_id": "p-0001", "machine": "web01", "created": 1700000000.5, "consistency": "crash",
         "cycle": 3, "block_size": 65536, "image_digest": "ab" * 16}
    p.update(over)
    return p


def raw_header(magic: bytes = BATCH_MAGIC, version: int = BATCH_VERSION, disk_id: bytes = DISK.encode(),
               id_len: int | None = None, seq: int = 7, disk_size: int = DISK_SIZE, frame_count: int = 1,
               good_checksum: bool = True) -> bytes:
    """A batch header with arbitrary fields and (by default) a correct checksum."""
    body = BATCH_HEADER.pack(magic, version, 0, len(disk_id) if id_len is None else id_len, seq, disk_size,
                             frame_count, 0) + disk_id
    checksum = xxhash.xxh3_64_intdigest(body) ^ (0 if good_checksum else 1)
    return body + BATCH_HEADER_CHECKSUM.pack(checksum)


def raw_frame(index: int, kind: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    return b"".join(bytes(p) for p in encode_frame(index, kind, offset, length, payload))


def sample_batch() -> bytes:
    b = BatchBuilder(DISK, 7, DISK_SIZE)
    b.write(0, bytes(range(256)) * 4)           # 1024 bytes at sector 0
    b.zero(4096, 8192)
    b.write(DISK_SIZE - 512, b"\xab" * 512)     # last sector of the disk
    b.bookmark(point())
    return b.to_bytes()


def frame_spans(body: bytes) -> list[tuple[int, int, int]]:
    """(start, payload_start, end) of each frame in a well-formed batch body."""
    id_len = BATCH_HEADER.unpack_from(body)[3]
    pos = BATCH_HEADER.size + id_len + BATCH_HEADER_CHECKSUM.size
    spans = []
    while pos < len(body):
        payload_len = FRAME_HEADER.unpack_from(body, pos)[3]
        end = pos + FRAME_HEADER.size + payload_len + FRAME_CHECKSUM.size
        spans.append((pos, pos + FRAME_HEADER.size, end))
        pos = end
    assert pos == len(body)
    return spans


def reject(data: bytes, match: str, **kw) -> FrameError:
    """Parse data in one go (feed + finish) and expect a FrameError whose message matches."""
    parser = BatchParser(**kw)
    with pytest.raises(FrameError, match=match) as info:
        parser.feed(data)
        parser.finish()
    assert isinstance(info.value, FormatError) and info.value.exit_code == 65
    return info.value


# -- round trips ----------------------------------------------------------------------------------

def test_round_trip_in_one_go():
    data = sample_batch()
    header, frames = parse_batch(data, expected_disk_id=DISK, expected_seq=7)
    assert (header.disk_id, header.seq, header.disk_size, header.frame_count) == (DISK, 7, DISK_SIZE, 4)
    assert [(f.kind, f.offset, f.length) for f in frames] == [
        (FRAME_WRITE, 0, 1024), (FRAME_ZERO, 4096, 8192), (FRAME_WRITE, DISK_SIZE - 512, 512), (FRAME_BOOKMARK, 0, 0)]
    assert bytes(frames[0].payload) == bytes(range(256)) * 4
    assert bytes(frames[1].payload) == b""
    assert bytes(frames[2].payload) == b"\xab" * 512
    assert frames[3].bookmark() == point()


def test_builder_accounting_matches_the_encoding():
    b = BatchBuilder(DISK, 1, DISK_SIZE)
    b.write(0, b"x" * 1024)
    b.zero(1024, 512)
    assert b.frame_count == 2 and b.payload_bytes == 1024
    header_len = len(b.parts()[0])
    assert header_len + b.body_bytes == len(b.to_bytes())


def test_builder_accepts_memoryview_payloads():
    data = bytearray(b"m" * 1024)
    b = BatchBuilder(DISK, 1, DISK_SIZE)
    b.write(512, memoryview(data))
    _, frames = parse_batch(b.to_bytes())
    assert bytes(frames[0].payload) == bytes(data)


def test_empty_batch_round_trips():
    header, frames = parse_batch(BatchBuilder(DISK, 0, 0).to_bytes())
    assert header.frame_count == 0 and frames == []


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 15), st.integers(1, 4), st.integers(0, 255)),
        st.tuples(st.just("zero"), st.integers(0, 15), st.integers(1, 16), st.just(0)),
        st.tuples(st.just("bookmark"), st.integers(0, 999), st.just(0), st.just(0)),
    ),
    max_size=12,
)


def build_from_ops(op_list) -> tuple[bytes, list[tuple]]:
    b = BatchBuilder(DISK, 42, 32 * SECTOR_BYTES)
    expected = []
    for kind, a, n, fill in op_list:
        if kind == "write":
            data = bytes((fill + i) % 256 for i in range(n * SECTOR_BYTES))
            b.write(a * SECTOR_BYTES, data)
            expected.append((FRAME_WRITE, a * SECTOR_BYTES, len(data), data))
        elif kind == "zero":
            b.zero(a * SECTOR_BYTES, n * SECTOR_BYTES)
            expected.append((FRAME_ZERO, a * SECTOR_BYTES, n * SECTOR_BYTES, b""))
        else:
            p = point(point_id=f"p{a}")
            b.bookmark(p)
            expected.append((FRAME_BOOKMARK, 0, 0, json.dumps(p, sort_keys=True, separators=(",", ":")).encode()))
    return b.to_bytes(), expected


@FAST
@given(op_list=ops, cuts=st.lists(st.integers(0, 40000), max_size=20))
def test_round_trip_fed_in_random_chunks(op_list, cuts):
    data, expected = build_from_ops(op_list)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    parser = BatchParser(expected_disk_id=DISK, expected_seq=42)
    frames = []
    for a, b in zip(bounds, bounds[1:]):
        frames += parser.feed(data[a:b])
    header = parser.finish()
    assert header.frame_count == len(expected)
    assert [(f.kind, f.offset, f.length, bytes(f.payload)) for f in frames] == expected
    assert parser.bytes_seen == len(data)


@FAST
@given(op_list=ops)
def test_round_trip_byte_by_byte_equals_one_go(op_list):
    data, expected = build_from_ops(op_list)
    parser = BatchParser()
    frames = []
    for i in range(len(data)):
        frames += parser.feed(data[i:i + 1])
    parser.finish()
    assert [(f.kind, f.offset, f.length, bytes(f.payload)) for f in frames] == expected


# -- header rejections -----------------------------------------------------------------------------

def test_bad_magic():
    err = reject(raw_header(magic=b"LBXX"), "magic")
    assert "not a Lifeboat batch" in str(err)


def test_bad_magic_detected_from_the_fixed_header_alone():
    parser = BatchParser()
    with pytest.raises(FrameError, match="magic"):
        parser.feed(raw_header(magic=b"HTTP")[:BATCH_HEADER.size])


def test_unsupported_version():
    err = reject(raw_header(version=BATCH_VERSION + 1), f"version {BATCH_VERSION + 1} is not supported")
    assert "header" in str(err)


def test_header_checksum_mismatch():
    reject(raw_header(good_checksum=False), "header checksum mismatch")


@pytest.mark.parametrize("pos", range(BATCH_HEADER.size + len(DISK) + BATCH_HEADER_CHECKSUM.size))
def test_any_header_byte_flip_is_rejected(pos):
    data = bytearray(sample_batch())
    data[pos] ^= 0x40
    parser = BatchParser(expected_disk_id=DISK, expected_seq=7)
    with pytest.raises(FrameError):
        parser.feed(bytes(data))
        parser.finish()


@pytest.mark.parametrize("id_len", [0, wire.MAX_DISK_ID_BYTES + 1, 0xFFFF])
def test_disk_id_length_out_of_bounds(id_len):
    reject(raw_header(id_len=id_len, disk_id=b""), f"disk id length {id_len} outside")


def test_disk_id_not_utf8():
    reject(raw_header(disk_id=b"\xff\xfe"), "not UTF-8")


@pytest.mark.parametrize("disk_id", [b"Web01", b"-sda", b"a/b", b"sda\n", b"a b"])
def test_disk_id_not_allowed(disk_id):
    reject(raw_header(disk_id=disk_id), "must match")


def test_disk_id_with_trailing_newline_rejected_by_builder():
    with pytest.raises(FrameError, match="must match"):
        BatchBuilder("sda\n", 0, DISK_SIZE)


def test_disk_id_mismatch_with_expected():
    err = reject(sample_batch(), "batch is for disk 'web01.sda', URL says 'web01.sdb'", expected_disk_id="web01.sdb")
    assert err.args[0] == "header"


def test_seq_mismatch_with_expected():
    reject(sample_batch(), "batch has sequence 7, URL says 8", expected_seq=8)


def test_frame_count_over_limit():
    reject(raw_header(frame_count=wire.MAX_FRAMES_PER_BATCH + 1), "frame count")


def test_disk_size_not_sector_multiple():
    reject(raw_header(disk_size=DISK_SIZE + 1), "not a multiple of 512")


# -- frame rejections ------------------------------------------------------------------------------

def test_unknown_frame_type():
    err = reject(raw_header() + raw_frame(0, 9, 0, 512, b"\0" * 512), "unknown frame type 9")
    assert err.args[0] == 0


@pytest.mark.parametrize("kind,limit", [(FRAME_WRITE, MAX_FRAME_PAYLOAD_BYTES), (FRAME_BOOKMARK, MAX_BOOKMARK_BYTES)])
def test_oversized_payload_rejected_from_the_frame_header_alone(kind, limit):
    # Only the 24-byte frame header is fed: the parser must refuse before the payload arrives.
    huge = limit + SECTOR_BYTES
    frame_header = FRAME_HEADER.pack(kind, 0, 0, huge, 0, huge if kind == FRAME_WRITE else 0)
    parser = BatchParser()
    assert parser.feed(raw_header(disk_size=2 * huge)) == []
    with pytest.raises(FrameError, match=f"payload of {huge} bytes exceeds the limit of {limit}"):
        parser.feed(frame_header)


def test_payload_limit_is_configurable():
    data = raw_header() + raw_frame(0, FRAME_WRITE, 0, 1024, b"a" * 1024)
    reject(data, "payload of 1024 bytes exceeds the limit of 512", max_payload=512)
    parse_batch(data, max_payload=1024)


@pytest.mark.parametrize("kind,offset,length,payload", [
    (FRAME_WRITE, 100, 512, b"a" * 512),      # offset not aligned
    (FRAME_WRITE, 512, 100, b"a" * 100),      # length not aligned
    (FRAME_ZERO, 0, 0, b""),                  # empty extent
    (FRAME_ZERO, 513, 1024, b""),
])
def test_extent_not_sector_aligned(kind, offset, length, payload):
    reject(raw_header() + raw_frame(0, kind, offset, length, payload), f"extent {offset}\\+{length} is not")


@pytest.mark.parametrize("kind,offset,length", [(FRAME_WRITE, DISK_SIZE - 512, 1024), (FRAME_ZERO, DISK_SIZE, 512),
                                                 (FRAME_ZERO, 2 ** 63, 2 ** 63)])
def test_extent_past_disk_end(kind, offset, length):
    payload = b"a" * length if kind == FRAME_WRITE else b""
    reject(raw_header() + raw_frame(0, kind, offset, length, payload), f"ends past the disk size {DISK_SIZE}")


def test_write_length_differs_from_payload_length():
    reject(raw_header() + raw_frame(0, FRAME_WRITE, 0, 1024, b"a" * 512),
           "write frame length 1024 differs from its payload length 512")


def test_zero_frame_with_payload():
    reject(raw_header() + raw_frame(0, FRAME_ZERO, 0, 512, b"abc"), "zero frame carries a payload")


def test_frame_errors_name_the_frame_index():
    data = raw_header(frame_count=2) + raw_frame(0, FRAME_ZERO, 0, 512) + raw_frame(1, FRAME_ZERO, 0, 512, b"x")
    err = reject(data, "zero frame carries a payload")
    assert err.args[0] == 1 and str(err).startswith("Bad frame 1 in batch")


@FAST
@given(data=st.data())
def test_any_single_byte_flip_in_a_frame_is_rejected(data):
    body = sample_batch()
    spans = frame_spans(body)
    which = data.draw(st.integers(0, len(spans) - 1))
    start, payload_start, end = spans[which]
    pos = data.draw(st.integers(start, end - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(body)
    damaged[pos] ^= mask
    parser = BatchParser()
    good = []
    with pytest.raises(FrameError) as info:
        good += parser.feed(bytes(damaged))
        parser.finish()
    # Frames before the damaged one are still delivered; nothing at or after it is.
    assert len(good) <= which
    if pos >= payload_start:
        # The payload or the checksum itself: only the checksum can catch it.
        assert "checksum mismatch" in str(info.value) and info.value.args[0] == which
    else:
        assert info.value.args[0] in (which, "header") or "truncated" in str(info.value)


def test_every_payload_and_checksum_byte_flip_says_checksum_mismatch():
    body = sample_batch()
    for which, (_, payload_start, end) in enumerate(frame_spans(body)):
        for pos in range(payload_start, end):
            damaged = bytearray(body)
            damaged[pos] ^= 0x01
            with pytest.raises(FrameError, match="checksum mismatch") as info:
                BatchParser().feed(bytes(damaged))
            assert info.value.args[0] == which


def test_swapped_frames_fail_the_index_seeded_checksum():
    b = BatchBuilder(DISK, 1, DISK_SIZE)
    b.write(0, b"A" * 512)
    b.write(512, b"B" * 512)
    body = b.to_bytes()
    (s0, _, e0), (s1, _, e1) = frame_spans(body)
    assert e0 - s0 == e1 - s1
    swapped = body[:s0] + body[s1:e1] + body[s0:e0]
    err = reject(swapped, "checksum mismatch")
    assert err.args[0] == 0


def test_frame_from_another_batch_position_fails():
    # A valid frame #0 copied verbatim into position 1.
    frame = raw_frame(0, FRAME_ZERO, 0, 512)
    reject(raw_header(frame_count=2) + frame + frame, "checksum mismatch")


def test_trailing_garbage_in_same_chunk():
    reject(sample_batch() + b"\0", "1 trailing bytes after the last declared frame")


def test_trailing_garbage_in_later_chunk():
    parser = BatchParser()
    assert len(parser.feed(sample_batch())) == 4
    with pytest.raises(FrameError, match="3 trailing bytes"):
        parser.feed(b"abc")


def test_trailing_garbage_after_empty_batch():
    reject(BatchBuilder(DISK, 0, 0).to_bytes() + b"x", "trailing")


def test_truncation_at_every_position_fails_at_finish():
    body = sample_batch()
    header_len = BATCH_HEADER.size + len(DISK) + BATCH_HEADER_CHECKSUM.size
    for cut in range(len(body)):
        parser = BatchParser()
        parser.feed(body[:cut])  # an incomplete body is not an error until finish()
        with pytest.raises(FrameError, match="truncated") as info:
            parser.finish()
        if cut < header_len:
            assert "header incomplete" in str(info.value)
        else:
            assert "of 4 frames complete" in str(info.value)
    parse_batch(body)


# -- bookmark payloads -----------------------------------------------------------------------------

def bookmark_batch(payload: bytes) -> bytes:
    return raw_header() + raw_frame(0, FRAME_BOOKMARK, 0, 0, payload)


def test_bookmark_round_trips_through_raw_frame():
    _, frames = parse_batch(bookmark_batch(json.dumps(point()).encode()))
    assert frames[0].bookmark() == point()


@pytest.mark.parametrize("field", sorted(wire.BOOKMARK_FIELDS))
def test_bookmark_missing_field(field):
    p = point()
    del p[field]
    reject(bookmark_batch(json.dumps(p).encode()), f"not valid point JSON: field '{field}' is missing")


@pytest.mark.parametrize("field,value", [("cycle", "3"), ("cycle", True), ("created", "now"), ("block_size", 1.5),
                                         ("point_id", 5), ("machine", None), ("created", False)])
def test_bookmark_field_wrong_type(field, value):
    reject(bookmark_batch(json.dumps(point(**{field: value})).encode()), f"field '{field}'")


@pytest.mark.parametrize("consistency", ["App", "filesystem", ""])
def test_bookmark_bad_consistency(consistency):
    reject(bookmark_batch(json.dumps(point(consistency=consistency)).encode()),
           f"consistency '{consistency}' is not app, crash or none")


@pytest.mark.parametrize("point_id", ["", "-lead", "a/b", "../x", "p1\n", "x" * 129, "é"])
def test_bookmark_bad_point_id(point_id):
    reject(bookmark_batch(json.dumps(point(point_id=point_id)).encode()), "point_id .* must match")


@pytest.mark.parametrize("payload", [b"", b"{", b"[1,2]", b'"str"', b"\xff\xfe", b"[" * 50000])
def test_bookmark_not_json_object(payload):
    reject(bookmark_batch(payload), "bookmark payload is not valid point JSON")


def test_builder_refuses_invalid_bookmarks():
    b = BatchBuilder(DISK, 0, DISK_SIZE)
    with pytest.raises(ValueError, match="consistency"):
        b.bookmark(point(consistency="maybe"))
    with pytest.raises(FrameError, match="exceeds"):
        b.bookmark(point(machine="m" * MAX_BOOKMARK_BYTES))
    assert b.frame_count == 0


# -- fuzzing: the parser only ever raises FrameError -----------------------------------------------

def run_parser(chunks: list[bytes], **kw) -> None:
    parser = BatchParser(**kw)
    try:
        for c in chunks:
            parser.feed(c)
        parser.finish()
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=300), split=st.integers(0, 300))
def test_fuzz_arbitrary_bytes(blob, split):
    run_parser([blob[:split], blob[split:]])


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=300))
def test_fuzz_bytes_after_a_valid_header_prefix(blob):
    run_parser([BATCH_MAGIC + bytes([BATCH_VERSION]) + blob])
    run_parser([raw_header(frame_count=3) + blob], expected_disk_id=DISK, expected_seq=7)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1),
                                 st.binary(max_size=64)), max_size=4),
       disk_size=st.integers(0, 2 ** 40).map(lambda n: n * SECTOR_BYTES))
def test_fuzz_well_checksummed_frames_with_arbitrary_fields(frames, disk_size):
    # Valid checksums get past integrity checks, so the semantic checks and the bookmark
    # decoder see arbitrary values.
    body = raw_header(frame_count=len(frames), disk_size=disk_size)
    body += b"".join(raw_frame(i, *f) for i, f in enumerate(frames))
    run_parser([body])


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255), st.sampled_from(["set", "ins", "del"])),
                      min_size=1, max_size=4))
def test_fuzz_mutated_valid_batch(edits):
    data = bytearray(sample_batch())
    for pos, value, op in edits:
        pos %= len(data) + 1
        if op == "ins":
            data[pos:pos] = bytes([value])
        elif pos < len(data):
            if op == "set":
                data[pos] = value
            else:
                del data[pos]
    run_parser([bytes(data)], expected_disk_id=DISK)



# -- verify-only parsing (the process server's ingest) ---------------------------------------------

def test_verify_only_parser_checks_every_payload_byte_without_keeping_it():
    body = sample_batch()
    frames = []
    parser = BatchParser(keep_payloads=False)
    for i in range(0, len(body), 100):  # payloads span chunks: hashed piece by piece
        frames += parser.feed(body[i:i + 100])
    parser.finish()
    assert [(f.kind, len(f.payload)) for f in frames][:3] == [(FRAME_WRITE, 0), (FRAME_ZERO, 0), (FRAME_WRITE, 0)]
    assert frames[3].bookmark()["point_id"] == "p-0001"  # bookmarks are kept: they are validated JSON
    for which, (_, payload_start, end) in enumerate(frame_spans(body)):
        for pos in (payload_start, (payload_start + end) // 2, end - 1):
            damaged = bytearray(body)
            damaged[pos] ^= 0x80
            with pytest.raises(FrameError, match="checksum mismatch") as info:
                BatchParser(keep_payloads=False).feed(bytes(damaged))
            assert info.value.args[0] == which


def test_parsed_payloads_do_not_change_when_the_caller_reuses_its_buffer():
    body = bytearray(sample_batch())
    parser = BatchParser()
    frames = parser.feed(body)
    body[:] = bytes(len(body))  # the caller overwrites its buffer: the parser copied it
    parser.finish()
    assert bytes(frames[0].payload) == bytes(range(256)) * 4


# -- version 2: agent-compressed write frames -----------------------------------------------------

TEXT = b"the quick brown fox jumps over the lazy dog " * 200  # compresses well
NOISE = bytes(xxhash.xxh3_128_digest(i.to_bytes(4, "little")) [j] for i in range(512) for j in range(16))[:8192]


def compressed_batch() -> bytes:
    b = BatchBuilder(DISK, 7, 1 << 20, compress=True)
    b.write(0, TEXT[:8192])
    b.write(8192, NOISE)
    b.zero(16384, 4096)
    b.bookmark(point())
    b.compress_frames(0, 1)
    b.compress_frames(1, 3)  # in slices, as the agent's threads do
    b.compress_frames(3, 99)  # the last slice may reach past the end
    return b.to_bytes()


def test_compressed_batch_is_version_2_and_round_trips():
    data = compressed_batch()
    assert BATCH_HEADER.unpack_from(data)[1:3] == (2, wire.BATCH_FLAG_AGENT_COMPRESSED)
    assert len(data) < 8192 + 8192 + 1024  # the text frame went compressed
    header, frames = parse_batch(data, expected_disk_id=DISK, expected_seq=7)
    assert header.flags == wire.BATCH_FLAG_AGENT_COMPRESSED
    text, noise = frames[0], frames[1]
    assert text.compressed and (text.offset, text.length) == (0, 8192) and len(text.payload) < 1024
    assert text.plain_hash == xxhash.xxh3_64_intdigest(TEXT[:8192])
    assert compression.decompress(bytes(text.payload), 8192) == TEXT[:8192]
    assert not noise.compressed and bytes(noise.payload) == NOISE  # incompressible: sent raw
    frames_v = []
    parser = BatchParser(keep_payloads=False)
    for i in range(0, len(data), 7):
        frames_v += parser.feed(data[i:i + 7])
    parser.finish()
    assert [f.compressed for f in frames_v] == [True, False, False, False]


def test_uncompressed_builder_still_writes_version_1():
    assert BATCH_HEADER.unpack_from(sample_batch())[1:3] == (1, 0)


def _compressed_frame(index: int, plain: bytes, packed: bytes, plain_hash: int | None = None) -> bytes:
    hash_bytes = wire.ZSTD_PLAIN_HASH.pack(xxhash.xxh3_64_intdigest(plain) if plain_hash is None else plain_hash)
    header = FRAME_HEADER.pack(FRAME_WRITE, wire.FRAME_FLAG_ZSTD, 0, len(hash_bytes) + len(packed), 0, len(plain))
    return header + hash_bytes + packed + FRAME_CHECKSUM.pack(wire.frame_checksum(header, hash_bytes + packed, index))


def test_compressed_frame_that_does_not_match_its_hash_is_refused_before_it_is_acknowledged():
    plain = TEXT[:4096]
    bad_hash = _compressed_frame(0, plain, compression.compress(plain), plain_hash=12345)
    reject(raw_header(disk_size=DISK_SIZE * 16) + bad_hash, "does not match its plaintext hash", keep_payloads=False)
    garbage = _compressed_frame(0, plain, b"\x28\xb5\x2f\xfd" + b"junk" * 20)
    reject(raw_header(disk_size=DISK_SIZE * 16) + garbage, "does not decompress", keep_payloads=False)
    other_length = _compressed_frame(0, plain, compression.compress(plain[:2048]))
    reject(raw_header(disk_size=DISK_SIZE * 16) + other_length, "does not decompress", keep_payloads=False)


def test_frame_flags_only_on_version_2_write_frames():
    zero = FRAME_HEADER.pack(FRAME_ZERO, wire.FRAME_FLAG_ZSTD, 0, 0, 0, 512)
    frame = zero + FRAME_CHECKSUM.pack(wire.frame_checksum(zero, b"", 0))
    reject(raw_header() + frame, "not valid on a zero frame")
    assert parse_batch(raw_header(version=1) + frame)[1][0].kind == FRAME_ZERO  # version 1 ignored flags
    reject(raw_header(disk_size=DISK_SIZE * 16) + _compressed_frame(0, b"x" * 512, b""), "too short")


def test_compressed_frame_plaintext_is_bounded_like_a_payload():
    plain = bytes(8192)
    frame = _compressed_frame(0, plain, compression.compress(plain))
    reject(raw_header(disk_size=DISK_SIZE * 16) + frame, "8192 plain bytes exceeds the limit of 4096", max_payload=4096)
