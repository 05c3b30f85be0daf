"""Consistency-group frames (mobility/group_wire.py, port 20004): round trips, every rejection path,
bounded reads and fuzzing. A peer on 20004 can only ever cause a clean GroupFrameError (the
connection is closed and counted) or a lost-peer IncompleteReadError, never anything else."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifeboat.core.errors import FormatError
from lifeboat.mobility import group_wire as gw
from lifeboat.mobility.group_wire import (
    ABORT,
    FRAME_NAMES,
    GROUP_HEADER,
    GROUP_HEADER_BYTES,
    GROUP_MAGIC,
    GROUP_MAX_BODY_BYTES,
    GROUP_VERSION,
    HELD,
    HELLO,
    HOLD,
    MARK,
    MARKED,
    REFUSED,
    GroupFrameError,
    decode_body,
    decode_header,
    encode,
    read_frame,
    write_frame,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[int, dict] = {
    HELLO: {"group": "web-tier", "member": "db01"},
    HOLD: {"group": "web-tier", "tag": "g-20261128T154600Z-0001", "deadline_ms": 10_000, "app": False},
    HELD: {"tag": "g-20261128T154600Z-0001"},
    MARK: {"tag": "g-20261128T154600Z-0001"},
    MARKED: {"tag": "g-20261128T154600Z-0001", "point_id": "db01-000042", "frozen_at": 1764344760.25,
             "thawed_at": 1764344760.5},
    ABORT: {"tag": "g-20261128T154600Z-0001", "reason": "member web02 did not answer HOLD within 10 s"},
    REFUSED: {"reason": "HOLD from web02, which is not the coordinator (web01)"},
}


def header(kind: int = HELD, length: int = 0, magic: bytes = GROUP_MAGIC, version: int = GROUP_VERSION,
           reserved: int = 0) -> bytes:
    return GROUP_HEADER.pack(magic, version, kind, reserved, length)


def decode(data: bytes) -> tuple[int, dict]:
    kind, length = decode_header(data[:GROUP_HEADER_BYTES])
    body = data[GROUP_HEADER_BYTES:]
    assert len(body) == length
    return kind, decode_body(kind, body)


def body_error(kind: int, obj) -> GroupFrameError:
    with pytest.raises(GroupFrameError) as info:
        decode_body(kind, json.dumps(obj).encode())
    return info.value


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FRAME_NAMES), ids=lambda k: FRAME_NAMES[k])
def test_every_frame_type_round_trips(kind):
    data = encode(kind, **VALID[kind])
    assert data[:4] == GROUP_MAGIC and data[4] == GROUP_VERSION and data[5] == kind
    assert len(data) == GROUP_HEADER_BYTES + len(json.dumps(VALID[kind], separators=(",", ":")))
    assert decode(data) == (kind, VALID[kind])


def test_the_header_is_big_endian_and_twelve_bytes():
    data = encode(HELD, tag="t1")
    assert GROUP_HEADER_BYTES == 12
    assert data[:12] == b"LBGP" + bytes([1, HELD, 0, 0]) + (len(data) - 12).to_bytes(4, "big")


def test_hold_app_true_and_edge_values_round_trip():
    body = {"group": "a", "tag": "A", "deadline_ms": 1, "app": True}
    assert decode(encode(HOLD, **body)) == (HOLD, body)
    body = {"group": "a" * 32, "tag": "Z" + "9._+-" * 25 + "xx", "deadline_ms": 600_000, "app": False}
    assert len(body["tag"]) == 128
    assert decode(encode(HOLD, **body)) == (HOLD, body)


def test_integer_timestamps_are_read_as_floats():
    kind, body = decode(encode(MARKED, tag="t", point_id="p", frozen_at=1764344760, thawed_at=1764344761))
    assert kind == MARKED and body["frozen_at"] == 1764344760.0 and isinstance(body["frozen_at"], float)
    assert isinstance(body["thawed_at"], float)


def test_unknown_extra_fields_are_kept_and_ignored():
    kind, body = decode(encode(HELD, tag="t", future_field=[1, 2]))
    assert body == {"tag": "t", "future_field": [1, 2]}


def test_a_body_of_exactly_the_maximum_is_accepted():
    base = len(json.dumps({"tag": "t", "pad": ""}, separators=(",", ":")))
    data = encode(HELD, tag="t", pad="x" * (GROUP_MAX_BODY_BYTES - base))
    assert len(data) == GROUP_HEADER_BYTES + GROUP_MAX_BODY_BYTES
    assert decode(data)[0] == HELD


async def test_write_frame_and_read_frame_over_a_socket():
    a, b = socket.socketpair()
    r1, w1 = await asyncio.open_connection(sock=a)
    r2, w2 = await asyncio.open_connection(sock=b)
    try:
        for kind in sorted(FRAME_NAMES):
            await write_frame(w1, kind, **VALID[kind])
        for kind in sorted(FRAME_NAMES):
            assert await read_frame(r2, timeout=5) == (kind, VALID[kind])
    finally:
        for w in (w1, w2):
            w.close()


# --- header rejections --------------------------------------------------------------------------

def test_group_frame_error_is_a_format_error_with_reason_malformed():
    with pytest.raises(FormatError) as info:
        decode_header(header(magic=b"HTTP"))
    assert isinstance(info.value, GroupFrameError) and info.value.reason == "malformed"
    assert info.value.exit_code == 65
    assert "not a Lifeboat group peer" in str(info.value)


@pytest.mark.parametrize("magic", [b"LBGQ", b"lbgp", b"\0\0\0\0", b"GET ", b"\x16\x03\x01\x02"])
def test_bad_magic_is_rejected(magic):
    with pytest.raises(GroupFrameError, match="bad magic"):
        decode_header(header(magic=magic))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_versions_are_rejected(version):
    with pytest.raises(GroupFrameError, match=f"protocol version {version} is not supported"):
        decode_header(header(version=version))


@pytest.mark.parametrize("kind", [0, 8, 100, 255])
def test_unknown_frame_types_are_rejected(kind):
    with pytest.raises(GroupFrameError, match=f"unknown frame type {kind}"):
        decode_header(header(kind=kind))


@pytest.mark.parametrize("reserved", [1, 0x8000, 0xFFFF])
def test_a_nonzero_reserved_field_is_rejected(reserved):
    with pytest.raises(GroupFrameError, match=f"reserved field {reserved}"):
        decode_header(header(reserved=reserved))


@pytest.mark.parametrize("length", [GROUP_MAX_BODY_BYTES + 1, 1 << 20, 2**32 - 1])
def test_a_declared_body_above_the_maximum_is_rejected(length):
    with pytest.raises(GroupFrameError, match="exceeds 65536"):
        decode_header(header(length=length))


@pytest.mark.parametrize("length", [0, 1, GROUP_MAX_BODY_BYTES])
def test_declared_lengths_up_to_the_maximum_pass_the_header(length):
    assert decode_header(header(kind=MARK, length=length)) == (MARK, length)


# --- body rejections ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{", b"{\"tag\": }", b"\xff\xfe\x00garbage", b"\xc3\x28", b"nul",
                                 b"{\"tag\": \"t\"} trailing"])
def test_a_body_that_is_not_json_is_rejected(raw):
    with pytest.raises(GroupFrameError, match="HELD body is not JSON"):
        decode_body(HELD, raw)


@pytest.mark.parametrize("obj", [[], ["tag", "t"], "t", 3, 1.5, True, None])
def test_a_body_that_is_not_an_object_is_rejected(obj):
    with pytest.raises(GroupFrameError, match="MARK body is not a JSON object"):
        decode_body(MARK, json.dumps(obj).encode())


@pytest.mark.parametrize("kind", sorted(FRAME_NAMES), ids=lambda k: FRAME_NAMES[k])
def test_every_required_field_is_required(kind):
    for field in VALID[kind]:
        obj = {k: v for k, v in VALID[kind].items() if k != field}
        exc = body_error(kind, obj)
        assert f"{FRAME_NAMES[kind]} field {field!r} is missing" in str(exc)


@pytest.mark.parametrize("kind,field,value", [
    (HELLO, "group", 7), (HELLO, "member", None), (HELLO, "member", ["db01"]),
    (HOLD, "tag", 12), (HOLD, "deadline_ms", "1000"), (HOLD, "deadline_ms", 1000.0), (HOLD, "deadline_ms", True),
    (HOLD, "app", 1), (HOLD, "app", 0), (HOLD, "app", "true"), (HOLD, "app", None),
    (HELD, "tag", {"t": 1}), (MARK, "tag", False),
    (MARKED, "point_id", 5), (MARKED, "frozen_at", "1.5"), (MARKED, "frozen_at", True), (MARKED, "thawed_at", None),
    (ABORT, "reason", 3), (REFUSED, "reason", ["no"]),
])
def test_a_field_of_the_wrong_type_is_rejected(kind, field, value):
    exc = body_error(kind, {**VALID[kind], field: value})
    assert f"field {field!r} is missing or not" in str(exc)


@pytest.mark.parametrize("kind,field,value", [
    (HELLO, "group", ""), (HELLO, "group", "Web"), (HELLO, "group", "-web"), (HELLO, "group", "_web"),
    (HELLO, "group", "a" * 33), (HELLO, "member", "db.01"), (HELLO, "member", "db01\n"), (HELLO, "member", "db 01"),
    (HOLD, "group", "g/1"), (HOLD, "tag", ""), (HOLD, "tag", ".t"), (HOLD, "tag", "t" * 129), (HOLD, "tag", "a/b"),
    (HOLD, "tag", "a b"), (HOLD, "tag", "t\n"), (HOLD, "tag", "é"),
    (HELD, "tag", "../x"), (MARK, "tag", "x:y"), (MARKED, "tag", "*"), (MARKED, "point_id", "p/1"),
    (ABORT, "tag", "+x"),
])
def test_a_field_not_matching_its_pattern_is_rejected(kind, field, value):
    exc = body_error(kind, {**VALID[kind], field: value})
    assert f"field {field!r}={value!r} must match" in str(exc)


@pytest.mark.parametrize("deadline", [0, -1, 600_001, 2**63])
def test_a_deadline_outside_its_range_is_rejected(deadline):
    exc = body_error(HOLD, {**VALID[HOLD], "deadline_ms": deadline})
    assert "is outside 1..600000" in str(exc)


@pytest.mark.parametrize("kind", [ABORT, REFUSED])
def test_a_reason_longer_than_1024_characters_is_rejected(kind):
    assert decode_body(kind, json.dumps({**VALID[kind], "reason": "r" * 1024}).encode())["reason"] == "r" * 1024
    exc = body_error(kind, {**VALID[kind], "reason": "r" * 1025})
    assert "longer than 1024 characters" in str(exc)


def test_encode_validates_what_it_sends():
    with pytest.raises(GroupFrameError, match="'deadline_ms' is missing"):
        encode(HOLD, group="g", tag="t", app=True)
    with pytest.raises(GroupFrameError, match="must match"):
        encode(HELLO, group="G", member="m")


def test_encode_refuses_a_body_above_the_maximum():
    with pytest.raises(GroupFrameError, match="HELD body of 65537 bytes exceeds 65536"):
        encode(HELD, tag="t", pad="x" * (GROUP_MAX_BODY_BYTES + 1 - len('{"tag":"t","pad":""}')))


# --- reads from a stream ------------------------------------------------------------------------

async def test_a_declared_length_above_the_maximum_is_rejected_without_waiting_for_the_body():
    reader = asyncio.StreamReader()
    reader.feed_data(header(kind=HELD, length=GROUP_MAX_BODY_BYTES + 1))  # no body, no EOF: it never comes
    t0 = time.monotonic()
    with pytest.raises(GroupFrameError, match="exceeds"):
        await read_frame(reader, timeout=30)
    assert time.monotonic() - t0 < 1.0


async def test_a_huge_declared_length_allocates_nothing():
    reader = asyncio.StreamReader()
    reader.feed_data(header(kind=HOLD, length=2**32 - 1) + b"{")
    with pytest.raises(GroupFrameError, match="exceeds"):
        await read_frame(reader, timeout=30)
    assert reader._buffer == bytearray(b"{")  # the header was consumed, the body never read


async def test_read_frame_reads_exactly_one_frame():
    reader = asyncio.StreamReader()
    reader.feed_data(encode(HELD, tag="t1") + encode(MARK, tag="t1")[:5])
    assert await read_frame(reader, timeout=5) == (HELD, {"tag": "t1"})
    reader.feed_data(encode(MARK, tag="t1")[5:])
    assert await read_frame(reader, timeout=5) == (MARK, {"tag": "t1"})


@pytest.mark.parametrize("cut", [0, 1, 11, 12, 13])
async def test_a_truncated_stream_raises_incomplete_read(cut):
    reader = asyncio.StreamReader()
    reader.feed_data(encode(HELD, tag="tag-1")[:cut])
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader, timeout=5)


async def test_a_stream_that_stalls_mid_body_times_out():
    reader = asyncio.StreamReader()
    reader.feed_data(encode(HELD, tag="tag-1")[:-2])
    with pytest.raises(TimeoutError):
        await read_frame(reader, timeout=0.05)


async def test_a_garbage_body_on_the_stream_is_a_group_frame_error():
    reader = asyncio.StreamReader()
    reader.feed_data(header(kind=HOLD, length=4) + b"\x00\x01\x02\x03")
    reader.feed_eof()
    with pytest.raises(GroupFrameError):
        await read_frame(reader, timeout=5)


# --- fuzzing ------------------------------------------------------------------------------------

def check_valid(kind: int, body: dict) -> None:
    """What a caller may rely on after a successful decode."""
    assert isinstance(body, dict)
    for field, (typ, check) in gw._FIELDS[kind].items():
        assert isinstance(body[field], typ)
        if typ is not bool:
            assert not isinstance(body[field], bool)
        if typ is str:
            pattern = gw.NAME_RE if field in ("group", "member") else gw.TAG_RE if field != "reason" else None
            assert pattern is None or pattern.fullmatch(body[field])


@FAST
@given(st.binary(min_size=GROUP_HEADER_BYTES, max_size=GROUP_HEADER_BYTES))
def test_fuzz_decode_header_random_bytes(data):
    try:
        kind, length = decode_header(data)
    except GroupFrameError:
        return
    assert kind in FRAME_NAMES and 0 <= length <= GROUP_MAX_BODY_BYTES


@FAST
@given(st.sampled_from([GROUP_MAGIC, b"LBGQ", b"\0\0\0\0"]), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1))
def test_fuzz_decode_header_fields(magic, version, kind, reserved, length):
    data = GROUP_HEADER.pack(magic, version, kind, reserved, length)
    try:
        got = decode_header(data)
    except GroupFrameError:
        assert (magic != GROUP_MAGIC or version != GROUP_VERSION or kind not in FRAME_NAMES or reserved
                or length > GROUP_MAX_BODY_BYTES)
        return
    assert got == (kind, length)


# JSON values (huge integers included: a float field must reject them cleanly).
SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(10**309), 2**53 + 1])
           | st.floats(allow_nan=True) | st.text(max_size=40)
           | st.from_regex(gw.TAG_RE, fullmatch=True) | st.from_regex(gw.NAME_RE, fullmatch=True))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
FIELD_NAMES = sorted({f for fields in gw._FIELDS.values() for f in fields})


@st.composite
def mutated_bodies(draw) -> tuple[int, bytes]:
    """Mostly-valid bodies with fields dropped, replaced or added: reaches every validation branch."""
    kind = draw(st.sampled_from(sorted(FRAME_NAMES)))
    obj = dict(VALID[kind])
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(FIELD_NAMES))
        if draw(st.booleans()):
            obj.pop(field, None)
        else:
            obj[field] = draw(JSON)
    return kind, json.dumps(obj).encode()


def decode_body_cleanly(kind: int, body: bytes) -> None:
    try:
        result = decode_body(kind, body)
    except GroupFrameError:
        return
    check_valid(kind, result)


@FAST
@given(st.sampled_from(sorted(FRAME_NAMES)), st.binary(max_size=512))
def test_fuzz_decode_body_random_bytes(kind, body):
    decode_body_cleanly(kind, body)


@FAST
@given(st.sampled_from(sorted(FRAME_NAMES)), JSON)
def test_fuzz_decode_body_random_json(kind, obj):
    decode_body_cleanly(kind, json.dumps(obj).encode())


@FAST
@given(mutated_bodies())
def test_fuzz_decode_body_mutated_valid_bodies(kind_body):
    decode_body_cleanly(*kind_body)


@FAST
@given(st.sampled_from(sorted(FRAME_NAMES)), st.data())
def test_fuzz_bit_flips_of_valid_frames(kind, data):
    frame = bytearray(encode(kind, **VALID[kind]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        k, length = decode_header(bytes(frame[:GROUP_HEADER_BYTES]))
    except GroupFrameError:
        return
    decode_body_cleanly(k, bytes(frame[GROUP_HEADER_BYTES:GROUP_HEADER_BYTES + length]))


# --- pathological bodies --------------------------------------------------------------------------

def test_a_deeply_nested_body_is_a_clean_error():
    # 64 KiB of "[" nests deeper than json's parser stack: RecursionError must not escape.
    with pytest.raises(GroupFrameError, match="nests too deeply"):
        decode_body(HELD, b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(GroupFrameError):
        decode_body(HOLD, b'{"group": ' + b"[" * 30_000)


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**53 + 1])
def test_a_huge_integer_timestamp_is_a_clean_error(value):
    # float() of an integer above 1e308 overflows: it must be a GroupFrameError, not OverflowError.
    body = {**VALID[MARKED], "frozen_at": value}
    with pytest.raises(GroupFrameError, match="'frozen_at' is out of range"):
        decode_body(MARKED, json.dumps(body).encode())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_timestamps_are_rejected(constant):
    # NaN/Infinity are JSON extensions Python accepts by default; they would poison the histogram.
    with pytest.raises(GroupFrameError, match="not a JSON number"):
        decode_body(MARKED, b'{"tag":"t","point_id":"p","frozen_at":%s,"thawed_at":1.0}' % constant.encode())
