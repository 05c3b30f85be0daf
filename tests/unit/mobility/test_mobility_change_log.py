"""Change log (.hrl, mobility/change_log.py): round trips, tiers, torn tails, damage, compaction."""

from __future__ import annotations

import os
import random
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifeboat.core.errors import FormatError
from lifeboat.mobility import change_log as cl_mod
from lifeboat.mobility.change_log import (
    HRL_HEADER,
    RECORD_CLEAN,
    RECORD_HEADER,
    ChangeLog,
    ChangeLogChanged,
    Tier,
    merge_ranges,
    reason_code,
    scan_file,
    subtract_ranges,
)

BS = 4096
BLOCKS = 64
SIZE = BLOCKS * BS
BIG = dict(pool_bytes=1 << 20, spill_bytes=1 << 20, extent_budget=10_000, bitmap_budget=1024)


def open_log(tmp_path, name="sda.hrl", size=SIZE, disk_id="m1.sda", events=None, **budgets):
    b = {**BIG, **budgets}
    cb = (lambda old, new, reason: events.append((old, new, reason))) if events is not None else None
    return ChangeLog.open(str(tmp_path / name), disk_id, size, BS, on_tier_change=cb, **b)


def blocks_of(ranges) -> set[int]:
    return {b for first, count in ranges for b in range(first, first + count)}


def block(i: int, tag: int = 0) -> bytes:
    return bytes([(i * 7 + tag) % 251 + 1]) * BS


def reconstruct(p, device: dict[int, bytes]) -> dict[int, bytes]:
    """What the engine sends: the data first (oldest first), then the read ranges from the device."""
    replica: dict[int, bytes] = {}
    for offset, data in p.data:
        for i in range(0, len(data), BS):
            replica[(offset + i) // BS] = bytes(data[i:i + BS])
    for b in blocks_of(p.read_ranges):
        replica[b] = device[b]
    return replica


# ---------------------------------------------------------------- helpers


def test_merge_and_subtract():
    assert merge_ranges([(5, 2), (0, 1), (1, 1), (7, 1), (20, 0)]) == [(0, 2), (5, 3)]
    assert subtract_ranges([(0, 10), (20, 5)], [(2, 2), (8, 14)]) == [(0, 2), (4, 4), (22, 3)]
    assert reason_code("corrupt_record: bad checksum at offset 9") == "corrupt_record"


# ---------------------------------------------------------------- round trips


def test_fresh_log_is_empty_data_tier(tmp_path):
    log = open_log(tmp_path)
    assert log.fresh and log.tier == Tier.DATA and log.tier_reason is None
    p = log.pending()
    assert p.empty and not p.resync and list(p.data) == [] and len(p.epochs) == 0
    log.close()
    again = open_log(tmp_path)
    assert not again.fresh and again.tier == Tier.DATA and again.pending().empty


def test_round_trip_extents_and_data_through_a_clean_restart(tmp_path):
    log = open_log(tmp_path, pool_bytes=2 * BS, spill_bytes=4 * BS)
    log.add_extents(1, [(10, 3), (40, 2)])
    log.add_data(1, 0, block(0) + block(1))          # memory pool
    log.add_data(2, 5 * BS, block(5, 2))             # spilled to the file
    log.add_extents(2, [(11, 1)])
    before = log.pending()
    assert before.ranges == [(0, 2), (5, 1), (10, 3), (40, 2)]
    assert before.read_ranges == [(10, 3), (40, 2)]
    assert list(before.epochs) == [1, 2]
    log.close()
    after = open_log(tmp_path, pool_bytes=2 * BS, spill_bytes=4 * BS)
    assert after.tier == Tier.DATA and after.last_epoch == 2
    p = after.pending()
    assert (p.ranges, p.read_ranges, list(p.epochs)) == (before.ranges, before.read_ranges, [1, 2])
    assert sorted(p.data) == [(0, block(0) + block(1)), (5 * BS, block(5, 2))]


def test_pool_data_over_the_spill_budget_survives_restart_as_extents(tmp_path):
    log = open_log(tmp_path, pool_bytes=4 * BS, spill_bytes=BS)
    log.add_data(3, 8 * BS, block(8) + block(9))
    log.close()
    after = open_log(tmp_path, pool_bytes=4 * BS, spill_bytes=BS)
    p = after.pending()
    assert p.ranges == [(8, 2)] and p.read_ranges == [(8, 2)] and list(p.data) == []


def test_last_block_may_be_partial(tmp_path):
    size = 10 * BS + 512
    log = open_log(tmp_path, size=size)
    log.add_data(1, 10 * BS, b"z" * 512)
    with pytest.raises(ValueError):
        log.add_data(1, 5 * BS, b"z" * 512)  # unaligned end inside the disk
    with pytest.raises(ValueError):
        log.add_extents(1, [(10, 2)])        # beyond the last block
    assert log.pending().ranges == [(10, 1)]
    log.close()
    assert list(open_log(tmp_path, size=size).pending().data) == [(10 * BS, b"z" * 512)]


def test_later_extents_make_earlier_data_stale(tmp_path):
    log = open_log(tmp_path)
    log.add_data(1, 0, block(0))
    log.add_extents(2, [(0, 1)])
    log.add_data(3, BS, block(1))
    log.add_extents(2, [(1, 1)])
    p = log.pending()
    assert p.read_ranges == [(0, 1)]  # block 1's newest version (epoch 3) is in the data


# ---------------------------------------------------------------- tiers


def test_forced_tier_steps_pool_spill_extents_bitmap_resync(tmp_path):
    events: list = []
    log = open_log(tmp_path, events=events, pool_bytes=BS, spill_bytes=BS, extent_budget=3, bitmap_budget=1)
    written: set[int] = set()

    def check():
        p = log.pending()
        assert p.resync or blocks_of(p.ranges) >= written

    log.add_data(1, 0, block(0)); written.add(0); check()
    assert log.stats["pool_bytes"] == BS and log.tier == Tier.DATA
    log.add_data(1, 2 * BS, block(2)); written.add(2); check()
    assert log.stats["spill_bytes"] == BS and log.tier == Tier.DATA
    log.add_data(1, 4 * BS, block(4)); written.add(4); check()
    assert (log.tier, log.tier_reason) == (Tier.EXTENTS, "spill_full")
    assert list(log.pending().data) == []
    log.add_extents(2, [(10, 1), (20, 1)]); written |= {10, 20}; check()
    assert (log.tier, log.tier_reason) == (Tier.BITMAP, "extent_budget")
    assert log.stats["granularity"] == BLOCKS // 8
    log.add_extents(3, [(63, 1)]); written.add(63); check()
    log.close()
    reopened = open_log(tmp_path, events=events, pool_bytes=BS, spill_bytes=BS, extent_budget=3, bitmap_budget=1)
    assert reopened.tier == Tier.BITMAP
    assert blocks_of(reopened.pending().ranges) >= written
    reopened.require_resync("ring_overrun")
    assert (reopened.tier, reopened.tier_reason) == (Tier.RESYNC, "ring_overrun")
    assert reopened.pending().resync
    assert [(o, n, r) for o, n, r in events] == [
        (Tier.DATA, Tier.EXTENTS, "spill_full"), (Tier.EXTENTS, Tier.BITMAP, "extent_budget"),
        (Tier.BITMAP, Tier.RESYNC, "ring_overrun")]


def test_zero_bitmap_budget_degrades_to_resync(tmp_path):
    log = open_log(tmp_path, extent_budget=1, bitmap_budget=0)
    log.add_extents(4, [(1, 1), (3, 1)])
    assert (log.tier, log.tier_reason) == (Tier.RESYNC, "bitmap_budget")
    p = log.pending()
    assert p.resync and 4 in p.epochs
    log.acknowledge(4)
    assert (log.tier, log.tier_reason) == (Tier.DATA, "caught_up")


def test_acknowledge_drops_epochs_and_returns_to_data(tmp_path):
    events: list = []
    log = open_log(tmp_path, events=events, extent_budget=2)
    log.add_extents(1, [(1, 1)])
    log.add_extents(2, [(5, 1)])
    log.add_extents(3, [(9, 1)])
    assert log.tier == Tier.BITMAP
    log.acknowledge(2)
    assert log.tier == Tier.BITMAP and 9 in blocks_of(log.pending().ranges)  # bitmap kept whole
    log.acknowledge(3)
    assert (log.tier, log.tier_reason) == (Tier.DATA, "caught_up") and log.pending().empty
    assert events[-1] == (Tier.BITMAP, Tier.DATA, "caught_up")
    log.add_extents(4, [(1, 1)])
    log.add_extents(5, [(2, 1)])
    log.acknowledge(4)
    assert log.pending().ranges == [(2, 1)] and list(log.pending().epochs) == [5]
    log.add_extents(4, [(7, 1)])  # a late add for an acknowledged epoch is kept
    assert blocks_of(log.pending().ranges) == {2, 7}
    log.close()
    assert blocks_of(open_log(tmp_path).pending().ranges) == {2, 7}


def test_resync_keeps_tracking_later_epochs(tmp_path):
    log = open_log(tmp_path)
    log.add_extents(1, [(1, 1)])
    log.require_resync("tracking_lost")           # covers the epoch in progress (2)
    log.add_extents(2, [(2, 1)])                  # absorbed by the resync
    log.add_extents(3, [(3, 1)])                  # after the resync's point: tracked
    p = log.pending()
    assert p.resync and p.ranges == [(3, 1)] and list(p.epochs) == [0, 1, 2, 3]
    log.acknowledge(2)
    assert (log.tier, log.tier_reason) == (Tier.DATA, "resync_done")
    assert log.pending().ranges == [(3, 1)] and not log.pending().resync


def test_pending_data_iterator_refuses_a_changed_log(tmp_path):
    log = open_log(tmp_path)
    log.add_data(1, 0, block(0))
    p = log.pending()
    log.acknowledge(1)
    with pytest.raises(ChangeLogChanged):
        list(p.data)


# ---------------------------------------------------------------- property: never under-report


ops = st.lists(
    st.one_of(
        st.tuples(st.just("extents"), st.lists(st.tuples(st.integers(0, BLOCKS - 1), st.integers(1, 6)),
                                              min_size=1, max_size=4)),
        st.tuples(st.just("data"), st.integers(0, BLOCKS - 1), st.integers(1, 3)),
        st.tuples(st.just("next_epoch")),
        st.tuples(st.just("ack")),
        st.tuples(st.just("restart")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, pool=st.integers(0, 4), spill=st.integers(0, 4), extents=st.integers(0, 6),
       bitmap=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_pending_always_covers_every_unacknowledged_block(tmp_path_factory, ops, pool, spill, extents, bitmap, seed):
    tmp = tmp_path_factory.mktemp("prop")
    budgets = dict(pool_bytes=pool * BS, spill_bytes=spill * BS, extent_budget=extents, bitmap_budget=bitmap)
    log = open_log(tmp, **budgets)
    rng = random.Random(seed)
    device = {b: block(b) for b in range(BLOCKS)}
    dirty: set[int] = set()   # written since the last acknowledge
    epoch = 1
    for op in ops:
        if op[0] == "extents":
            ranges = [(f, min(c, BLOCKS - f)) for f, c in op[1]]
            for b in blocks_of(ranges):
                device[b] = block(b, rng.randrange(250))
            log.add_extents(epoch, ranges)
            dirty |= blocks_of(ranges)
        elif op[0] == "data":
            first, count = op[1], min(op[2], BLOCKS - op[1])
            for b in range(first, first + count):
                device[b] = block(b, rng.randrange(250))
            log.add_data(epoch, first * BS, b"".join(device[b] for b in range(first, first + count)))
            dirty |= set(range(first, first + count))
            epoch += 1  # freeze-copy data is the state at the end of its epoch
        elif op[0] == "next_epoch":
            epoch += 1
        elif op[0] == "ack":
            p = log.pending()
            log.acknowledge(epoch)
            dirty.clear()
            epoch += 1
        elif op[0] == "restart":
            log.close()
            log = open_log(tmp, **budgets)
            assert log.tier != Tier.RESYNC or log.tier_reason != "unclean_stop"
            epoch = max(epoch, log.last_epoch + 1)
        p = log.pending()
        if p.resync:
            assert log.tier == Tier.RESYNC
            continue
        assert blocks_of(p.ranges) >= dirty
        assert blocks_of(p.read_ranges) <= blocks_of(p.ranges)
        replica = reconstruct(p, device)
        assert all(replica[b] == device[b] for b in dirty)
    log.close()


# ---------------------------------------------------------------- crash safety


def closed_log_with_records(tmp_path) -> str:
    log = open_log(tmp_path, pool_bytes=0)
    log.add_extents(1, [(3, 2)])
    log.add_data(2, 8 * BS, block(8))
    log.close(clean=False)
    return str(tmp_path / "sda.hrl")


def test_unclean_stop_means_resync(tmp_path):
    events: list = []
    closed_log_with_records(tmp_path)
    log = open_log(tmp_path, events=events)
    assert (log.tier, log.tier_reason) == (Tier.RESYNC, "unclean_stop")
    assert log.pending().resync and events == [(Tier.DATA, Tier.RESYNC, "unclean_stop")]
    assert log.last_epoch == 3  # the resync covers the epoch after the last one seen
    log.close()
    still = open_log(tmp_path)  # a clean stop does not forget a pending resync
    assert (still.tier, still.tier_reason) == (Tier.RESYNC, "unclean_stop")
    still.acknowledge(still.last_epoch + 1)
    assert still.tier == Tier.DATA


def test_opening_and_crashing_without_a_write_is_still_unclean(tmp_path):
    open_log(tmp_path).close()
    log = open_log(tmp_path)          # writes OPEN: the file no longer ends with CLEAN
    os.close(log._fd)                 # simulate a crash: no close()
    log._fd, log._closed = None, True
    assert open_log(tmp_path).tier_reason == "unclean_stop"


def test_torn_tail_at_every_offset_of_the_last_record_is_discarded(tmp_path):
    log = open_log(tmp_path, pool_bytes=0)
    log.add_extents(1, [(3, 2)])
    log.add_data(2, 8 * BS, block(8))
    log.add_extents(2, [(30, 1)])
    log.close()
    path = str(tmp_path / "sda.hrl")
    full = open(path, "rb").read()
    records = scan_file(path).records
    assert records[-1].type == RECORD_CLEAN
    last = records[-1]
    # Tear the last two records (the CLEAN marker and the extents record before it) at every byte.
    for rec in records[-2:]:
        for cut in range(rec.offset + 1, rec.end):
            with open(path, "wb") as f:
                f.write(full[:cut])
            s = scan_file(path)
            assert s.torn_at == rec.offset and s.corrupt is None
            assert [r.offset for r in s.records] == [r.offset for r in records if r.end <= rec.offset]
            reopened = open_log(tmp_path)
            assert (reopened.tier, reopened.tier_reason) == (Tier.RESYNC, "unclean_stop")
            reopened.close()
            after = scan_file(path)
            # The torn bytes are gone, the earlier records survive unchanged, RESYNC + OPEN follow.
            assert [r.offset for r in after.records][:len(s.records)] == [r.offset for r in s.records]
            assert open(path, "rb").read()[:rec.offset] == full[:rec.offset]
            assert after.corrupt is None and after.torn_at is None
    assert last.end == len(full)


def test_bad_checksum_of_the_last_record_is_a_torn_tail(tmp_path):
    closed_log_with_records(tmp_path)
    path = str(tmp_path / "sda.hrl")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(data)
    s = scan_file(path)
    assert s.torn_at is not None and s.corrupt is None
    assert open_log(tmp_path).tier_reason == "unclean_stop"


def test_bad_checksum_in_the_middle_means_resync_naming_the_offset(tmp_path):
    log = open_log(tmp_path)
    log.add_extents(1, [(3, 2)])
    log.add_extents(2, [(9, 1)])
    log.close()
    path = str(tmp_path / "sda.hrl")
    victim = scan_file(path).records[1]
    data = bytearray(open(path, "rb").read())
    data[victim.offset + RECORD_HEADER.size + 2] ^= 0x01
    open(path, "wb").write(data)
    events: list = []
    reopened = open_log(tmp_path, events=events)
    assert reopened.tier == Tier.RESYNC and reason_code(reopened.tier_reason) == "corrupt_record"
    assert f"offset {victim.offset}" in reopened.tier_reason
    assert events and events[0][1] == Tier.RESYNC
    assert os.path.exists(path + ".corrupt")          # the damaged file is kept for inspection
    reopened.close()
    assert open_log(tmp_path).tier == Tier.RESYNC      # the new file still says so


def test_valid_checksum_but_impossible_content_is_corruption(tmp_path):
    log = open_log(tmp_path)
    log.add_extents(1, [(3, 2)])
    log.close(clean=False)
    path = str(tmp_path / "sda.hrl")
    pos = os.path.getsize(path)
    bad = cl_mod.EXTENTS_BODY.pack(1, 1) + cl_mod.EXTENT_ENTRY.pack(BLOCKS, 5)  # beyond the disk
    rec = cl_mod.encode_record(pos, cl_mod.RECORD_EXTENTS, bad)
    with open(path, "ab") as f:
        f.write(rec + cl_mod.encode_record(pos + len(rec), RECORD_CLEAN, b""))
    reopened = open_log(tmp_path)
    assert reason_code(reopened.tier_reason) == "corrupt_record" and f"offset {pos}" in reopened.tier_reason


def test_geometry_change_means_resync(tmp_path):
    log = open_log(tmp_path)
    log.add_extents(7, [(3, 2)])
    log.close()
    other = open_log(tmp_path, disk_id="m1.sdb")
    assert (other.tier, other.tier_reason) == (Tier.RESYNC, "geometry_changed")
    assert other.last_epoch == 8 and other.pending().resync
    other.close()
    assert open_log(tmp_path, disk_id="m1.sdb").tier_reason == "geometry_changed"


def test_damaged_header_means_resync(tmp_path):
    open_log(tmp_path).close()
    path = str(tmp_path / "sda.hrl")
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF
    open(path, "wb").write(data)
    log = open_log(tmp_path)
    assert log.tier == Tier.RESYNC and reason_code(log.tier_reason) == "corrupt_header"


@pytest.mark.parametrize("length", [0xFFFFFFFF, cl_mod.MAX_RECORD_BODY_BYTES + 1])
def test_huge_corrupt_length_is_rejected_without_allocation(tmp_path, length):
    log = open_log(tmp_path)
    log.add_extents(1, [(3, 2)])
    log.add_extents(2, [(5, 2)])
    log.close()
    path = str(tmp_path / "sda.hrl")
    victim = scan_file(path).records[1]
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<I", data, victim.offset, length)
    open(path, "wb").write(data)
    tracemalloc.start()
    try:
        s = scan_file(path)
        reopened = open_log(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024
    assert s.corrupt and f"offset {victim.offset}" in s.corrupt
    assert reopened.tier == Tier.RESYNC and reason_code(reopened.tier_reason) == "corrupt_record"


def test_damaged_spilled_data_is_reported_not_returned(tmp_path):
    log = open_log(tmp_path, pool_bytes=0)
    log.add_data(1, 0, block(0))
    pos = log._epochs[1].data[0].pos
    fd = os.open(str(tmp_path / "sda.hrl"), os.O_RDWR)
    os.pwrite(fd, b"\x00", pos + RECORD_HEADER.size + 20)
    os.close(fd)
    with pytest.raises(FormatError):
        list(log.pending().data)
    log.compact()  # compaction drops the damaged data but keeps its blocks to be re-read
    p = log.pending()
    assert list(p.data) == [] and p.read_ranges == [(0, 1)]


# ---------------------------------------------------------------- compaction


def test_compaction_preserves_content(tmp_path, monkeypatch):
    monkeypatch.setattr(cl_mod, "COMPACT_MIN_BYTES", 4096)
    log = open_log(tmp_path, pool_bytes=0, spill_bytes=64 * BS)
    path = str(tmp_path / "sda.hrl")
    for epoch in range(1, 40):
        log.add_data(epoch, (epoch % BLOCKS) * BS, block(epoch, epoch))
        log.add_extents(epoch, [((epoch * 3) % BLOCKS, 1)])
        if epoch % 5 == 0:
            log.acknowledge(epoch - 2)
    assert os.path.getsize(path) < 2 * log._live_bytes() + 4096  # it was compacted along the way
    before = log.pending()
    before_data = list(before.data)
    log.compact()
    after = log.pending()
    assert (after.ranges, after.read_ranges, list(after.epochs)) == (before.ranges, before.read_ranges,
                                                                        list(before.epochs))
    assert list(after.data) == before_data
    log.close()
    reopened = open_log(tmp_path, pool_bytes=0, spill_bytes=64 * BS)
    p = reopened.pending()
    assert (p.ranges, p.read_ranges, list(p.data)) == (before.ranges, before.read_ranges, before_data)
    assert reopened.tier == Tier.DATA


def test_compaction_of_a_bitmap_tier_log(tmp_path, monkeypatch):
    monkeypatch.setattr(cl_mod, "COMPACT_MIN_BYTES", 1024)
    log = open_log(tmp_path, extent_budget=1, bitmap_budget=8)
    for epoch in range(1, 200):
        log.add_extents(epoch, [(epoch % BLOCKS, 1)])
    assert log.tier == Tier.BITMAP
    assert os.path.getsize(str(tmp_path / "sda.hrl")) < 4096
    ranges = log.pending().ranges
    log.close()
    assert open_log(tmp_path).pending().ranges == ranges == [(0, BLOCKS)]


def test_header_layout(tmp_path):
    open_log(tmp_path).close()
    data = open(str(tmp_path / "sda.hrl"), "rb").read()
    magic, version, _f, id_len, size, bs, _r = HRL_HEADER.unpack_from(data)
    assert (magic, version, id_len, size, bs) == (b"LBHL", 1, len("m1.sda"), SIZE, BS)
    assert data[HRL_HEADER.size:HRL_HEADER.size + id_len] == b"m1.sda"
