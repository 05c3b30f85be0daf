"""Fuzz the .hrl change log reader (mobility/change_log.py): a damaged file never raises and never yields a
state other than the file's true one, except by asking for a resync (over-reporting is safe, under-reporting
loses data)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation, mutated
from lifeboat.mobility import change_log
from lifeboat.mobility.change_log import HRL_HEADER, RECORD_HEADER, ChangeLog, scan_file

DISK = "web01.sda"
BS = 4096
BLOCKS = 64
SIZE = BLOCKS * BS
BUDGETS = dict(pool_bytes=0, spill_bytes=1 << 20, extent_budget=10_000, bitmap_budget=1024)


def open_log(path: str) -> ChangeLog:
    return ChangeLog.open(path, DISK, SIZE, BS, **BUDGETS)


def state(log: ChangeLog) -> tuple:
    p = log.pending()
    return p.tier, p.resync, p.ranges, p.read_ranges, [(o, bytes(d)) for o, d in p.data]


@st.composite
def logs(draw) -> bytes:
    """A clean log written by the real writer: extents and spilled data over a few epochs, maybe an ack."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sda.hrl")
        log = open_log(path)
        for epoch in range(1, draw(st.integers(1, 3)) + 1):
            first = draw(st.integers(0, BLOCKS - 1))
            log.add_extents(epoch, [(first, draw(st.integers(1, BLOCKS - first)))])
            if draw(st.booleans()):
                block = draw(st.integers(0, BLOCKS - 1))
                log.add_data(epoch, block * BS, bytes([epoch]) * BS)
        if draw(st.booleans()):
            log.acknowledge(1)
        log.close(clean=True)
        with open(path, "rb") as f:
            return f.read()


def reopen(data: bytes) -> tuple:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sda.hrl")
        with open(path, "wb") as f:
            f.write(data)
        with bounded_allocation(4 * len(data) + 512 * 1024, "change log scan"):
            scan = scan_file(path)  # read-only pass: never raises on content
        assert scan.header_error or scan.corrupt or scan.end <= len(data)
        log = open_log(path)
        try:
            return state(log)
        finally:
            log.close(clean=True)


@given(st.data())
def test_damaged_logs_give_the_true_state_or_a_resync(data):
    valid = data.draw(logs())
    truth = reopen(valid)
    assert not truth[1], "a clean log needs no resync"
    header_end = HRL_HEADER.size + len(DISK) + 8
    fields = ((6, "<H"), (8, "<Q"), (16, "<I"), (header_end, "<I"), (header_end + 4, "<B"))
    got = reopen(data.draw(mutated(valid, fields)))
    assert got == truth or got[1], f"damage changed the state without a resync: {got} vs {truth}"


@given(st.binary(max_size=512))
def test_random_files_are_a_resync_never_an_exception(data):
    got = reopen(data)
    assert got[1] or got[2:] == ([], [], []), got


def test_record_declaring_a_huge_body_allocates_nothing():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sda.hrl")
        open_log(path).close(clean=True)
        with open(path, "ab") as f:
            f.write(RECORD_HEADER.pack(change_log.MAX_RECORD_BODY_BYTES, change_log.RECORD_DATA, 0, 0) + b"x" * 64)
            f.write(RECORD_HEADER.pack(2**32 - 1, change_log.RECORD_BITMAP, 0, 0) + b"x" * 64)
        with bounded_allocation(256 * 1024, "huge body_len"):
            scan = scan_file(path)
        assert scan.torn_at is not None or scan.corrupt
