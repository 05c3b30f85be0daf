"""Fuzz the trace_pipe parser (mobility/tracepoint.py): an event, a LOST marker or ValueError; the tracker
never grows its bitmap past the disk and never raises on what the kernel (or damage) prints."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation
from lifeboat.mobility.tracepoint import BioEvent, RingLost, TracepointTracker, parse_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from needs_root import require_root  # noqa: E402

BS = 4096
DISK_BYTES = 8 << 20
LINE = "  dd-1234 [001] ..... 12.5: block_bio_queue: {major},{minor} {rwbs} {sector} + {nr} [dd]"
numbers = st.integers(0, 2**64 - 1) | st.integers(0, 5000) | st.sampled_from([2**63, 2**64 + 5, 10**30])


@given(st.text(max_size=200))
@example("block_bio_queue: 7,0 WS 99999999999999999999999999 + 8 [x]")
@example("CPU:0 [LOST 18446744073709551616 EVENTS]")
def test_parse_line_returns_an_event_or_raises_value_error(line):
    try:
        ev = parse_line(line)
    except ValueError:
        return
    assert isinstance(ev, (BioEvent, RingLost))


@given(numbers, numbers, st.sampled_from(["W", "WS", "R", "D", "N", "FWS", "", "RA"]), numbers, numbers)
def test_structured_lines_parse_to_their_fields(major, minor, rwbs, sector, nr):
    line = LINE.format(major=major, minor=minor, rwbs=rwbs or "W", sector=sector, nr=nr)
    ev = parse_line(line)
    assert (ev.major, ev.minor, ev.sector, ev.nr_sectors) == (major, minor, sector, nr)


@pytest.fixture(scope="module")
def loop_tracker():
    """A started tracker on an 8 MiB loop device nobody writes to: the tests feed it trace lines by hand."""
    require_root()
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
        dev = subprocess.run(["losetup", "-f", "--show", image], check=True, capture_output=True,
                             text=True).stdout.strip()
        t = TracepointTracker({"sda": dev}, BS, f"lifeboat-fuzz-{uuid.uuid4().hex[:8]}", drain_interval=3600)
        try:
            t.start()
            st_ = os.stat(dev)
            yield t, os.major(st_.st_rdev), os.minor(st_.st_rdev)
        finally:
            t.close()
            subprocess.run(["losetup", "-d", dev], check=True)


def fresh(t: TracepointTracker) -> TracepointTracker:
    t.ingest(b"\n")           # end any partial line a previous test left
    t.rotate(overlap=False)   # and start from an empty epoch
    return t


def test_events_past_the_disk_end_lose_the_epoch_instead_of_allocating(loop_tracker):
    """Regression: a sector near 2^64 grew the dirty bitmap to the event's end (exabytes: MemoryError)."""
    t, major, minor = loop_tracker
    fresh(t)
    line = LINE.format(major=major, minor=minor, rwbs="WS", sector=2**63, nr=8) + "\n"
    with bounded_allocation(1 << 20, "tracker ingest"):
        t.ingest(line.encode())
    epoch = t.rotate(overlap=False)["sda"]
    assert epoch.ranges == [] and epoch.lost and epoch.lost.startswith("event_past_disk_end")


def test_a_line_without_newline_is_not_buffered_forever(loop_tracker):
    t = fresh(loop_tracker[0])
    with bounded_allocation(1 << 20, "tracker tail"):
        for _ in range(64):
            t.ingest(b"x" * 4096)
    assert t.rotate(overlap=False)["sda"].lost.startswith("unparseable_trace_line")


@given(st.lists(st.tuples(numbers, st.sampled_from(["W", "R", "D"]), numbers) | st.text(max_size=80), max_size=8),
       st.integers(1, 64))
def test_fed_trace_output_never_raises_and_stays_inside_the_disk(loop_tracker, items, chunk):
    t, major, minor = loop_tracker
    fresh(t)
    lines = [LINE.format(major=major, minor=minor, rwbs=it[1], sector=it[0], nr=it[2]) if isinstance(it, tuple)
             else it for it in items]
    text = "".join(line + "\n" for line in lines)
    data = text.encode(errors="replace")
    with bounded_allocation(1 << 20, "tracker ingest"):
        for i in range(0, len(data), chunk):
            t.ingest(data[i: i + chunk])
        epoch = t.rotate(overlap=False)["sda"]
    blocks = DISK_BYTES // BS
    assert all(0 <= first and first + count <= blocks for first, count in epoch.ranges), epoch.ranges
