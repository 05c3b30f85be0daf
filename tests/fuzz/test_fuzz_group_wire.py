"""Fuzz the consistency-group frames (mobility/group_wire.py): GroupFrameError or a valid frame, bounded reads."""

from __future__ import annotations

import asyncio
import json

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation, mutated
from lifeboat.mobility import group_wire as gw
from lifeboat.mobility.group_wire import GroupFrameError

VALID = [
    gw.encode(gw.HELLO, group="g1", member="web01"),
    gw.encode(gw.HOLD, group="g1", tag="t-1", deadline_ms=5000, app=False),
    gw.encode(gw.HELD, tag="t-1"),
    gw.encode(gw.MARK, tag="t-1"),
    gw.encode(gw.MARKED, tag="t-1", point_id="web01-t-1", frozen_at=1.0, thawed_at=2.0),
    gw.encode(gw.ABORT, tag="t-1", reason="late"),
    gw.encode(gw.REFUSED, reason="busy"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def read_stream(data: bytes) -> list[tuple[int, dict]]:
    """Frames the way a member reads them: readexactly() after the header's length check, with a timeout."""
    async def run() -> list[tuple[int, dict]]:
        reader = asyncio.StreamReader(limit=2**16)
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        try:
            while True:
                frames.append(await gw.read_frame(reader, timeout=5))
        except asyncio.IncompleteReadError:
            return frames  # the peer is lost: the stream ended inside a header or a body
    return asyncio.run(run())


def check(data: bytes) -> None:
    with bounded_allocation(8 * len(data) + 256 * 1024, "group frames"):
        try:
            frames = read_stream(data)
        except GroupFrameError as exc:
            assert exc.reason == "malformed" and str(exc)
            return
    for kind, body in frames:  # accepted frames re-validate and re-encode
        assert gw.validate(kind, dict(body)) == body
        assert len(gw.encode(kind, **body)) <= gw.GROUP_HEADER_BYTES + gw.GROUP_MAX_BODY_BYTES


@given(st.binary(max_size=600))
@example(gw.GROUP_HEADER.pack(gw.GROUP_MAGIC, 1, gw.HELLO, 0, 2**32 - 1))
@example(gw.GROUP_HEADER.pack(gw.GROUP_MAGIC, 1, gw.HELLO, 0, 10) + b"[" * 10)
def test_random_bytes_give_a_clean_error_or_a_lost_peer(data):
    check(data)


@given(st.sampled_from(VALID).flatmap(lambda v: mutated(v, ((4, ">B"), (5, ">B"), (6, ">H"), (8, ">I")))))
def test_mutated_frames_give_a_clean_error_or_a_valid_frame(data):
    check(data)


@given(st.sampled_from(sorted(gw.FRAME_NAMES)), st.dictionaries(
    st.sampled_from(["group", "member", "tag", "deadline_ms", "app", "point_id", "frozen_at", "thawed_at",
                     "reason", "x"]), json_values, max_size=6))
@example(gw.MARKED, {"tag": "t", "point_id": "p", "frozen_at": 10**400, "thawed_at": 1})
@example(gw.HOLD, {"group": "g", "tag": "t", "deadline_ms": True, "app": False})
def test_bodies_of_any_shape_are_checked_field_by_field(kind, body):
    raw = json.dumps(body).encode()
    try:
        got = gw.decode_body(kind, raw)
    except GroupFrameError:
        return
    assert gw.validate(kind, dict(got)) == got


def test_huge_declared_body_is_refused_before_reading():
    header = gw.GROUP_HEADER.pack(gw.GROUP_MAGIC, gw.GROUP_VERSION, gw.HOLD, 0, gw.GROUP_MAX_BODY_BYTES + 1)
    try:
        gw.decode_header(header)
    except GroupFrameError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("a body over GROUP_MAX_BODY_BYTES was accepted")
    assert [k for k, _ in read_stream(b"".join(VALID))] == sorted(gw.FRAME_NAMES)
