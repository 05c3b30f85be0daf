"""The master-target journal and registry on real files: recovery, idempotent re-apply, damage, hold/cancel."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import xxhash
import zstandard

from lifeboat.core.wire import (BATCH_FLAG_AGENT_COMPRESSED, FRAME_CHECKSUM, FRAME_FLAG_ZSTD, FRAME_HEADER, FRAME_WRITE,
                                 ZSTD_PLAIN_HASH, BatchBuilder, BatchHeader, frame_checksum, parse_batch)
from lifeboat.master_target.journal import (JOURNAL_HEADER, Journal, JournalError, entry_header,
                                            read_entry_header)
from lifeboat.master_target.registry import Registry, RegistryError

DISK = "web01.sda"
SIZE = 1 << 20


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def batch(seq: int, frames: list[tuple[int, bytes | int]], point: str | None = None) -> bytes:
    b = BatchBuilder(DISK, seq, SIZE)
    for offset, data in frames:
        if isinstance(data, int):
            b.zero(offset, data)
        else:
            b.write(offset, data)
    if point:
        b.bookmark({"point_id": point, "machine": "web01", "created": time.time(), "consistency": "crash",
                    "cycle": seq, "block_size": 65536, "image_digest": ""})
    return b.to_bytes()


def journal_batch(j: Journal, seq: int, body: bytes) -> None:
    fd = j.open_partial(DISK, seq, len(body))
    os.write(fd, body)
    j.published(DISK, seq, j.commit(DISK, seq, fd))


@pytest.fixture
def setup(tmp_path):
    target = tmp_path / "target.img"
    target.write_bytes(os.urandom(SIZE))
    reg = Registry(str(tmp_path / "state"))
    disk = reg.add_disk(DISK, str(target), SIZE)
    j = Journal(str(tmp_path / "state" / "journal"), retention_seconds=86400)
    j.recover()
    return j, disk, target, tmp_path


def expected_after(target_bytes: bytes, frames) -> bytes:
    out = bytearray(target_bytes)
    for offset, data in frames:
        out[offset: offset + (data if isinstance(data, int) else len(data))] = (
            bytes(data) if isinstance(data, int) else data)
    return bytes(out)


def test_entries_apply_in_order_overlaps_last_wins_points_recorded(setup):
    j, disk, target, _ = setup
    original = target.read_bytes()
    f1 = [(0, os.urandom(8192)), (4096, os.urandom(4096)), (65536, 16384)]
    f2 = [(512, os.urandom(1024))]
    journal_batch(j, 1, batch(1, f1))
    journal_batch(j, 2, batch(2, f2, point="p2"))
    assert j.disk(DISK).acked_seq == 2 and j.disk(DISK).applied_seq == 0
    assert j.apply_next(disk).seq == 1
    res = j.apply_next(disk)
    assert res.seq == 2 and [p["point_id"] for p in res.points] == ["p2"]
    assert j.apply_next(disk) is None
    assert target.read_bytes() == expected_after(expected_after(original, f1), f2)
    with open(os.path.join(j.disk(DISK).folder, "state.json")) as f:
        state = json.load(f)
    assert state["applied_seq"] == 2 and state["points"][0]["seq"] == 2 and state["points"][0]["frame_index"] == 1


def test_reapplying_an_interrupted_entry_is_idempotent(setup):
    """A crash after the pwrites but before applied_seq was recorded: the restart applies the entry again."""
    j, disk, target, tmp = setup
    frames = [(0, os.urandom(4096)), (0, os.urandom(2048)), (8192, 4096), (8192, os.urandom(512))]
    journal_batch(j, 1, batch(1, frames))
    entry = open(j.entry_path(DISK, 1), "rb").read()
    j.apply_next(disk)
    once = target.read_bytes()
    # Put the world back as a crash before _record_applied would have left it: entry present, state at 0.
    with open(j.entry_path(DISK, 1), "wb") as f:
        f.write(entry)
    os.unlink(os.path.join(j.disk(DISK).folder, "state.json"))
    j2 = Journal(j.root, 86400)
    assert j2.recover()[DISK].pending and j2.disk(DISK).applied_seq == 0
    j2.apply_next(disk)
    assert target.read_bytes() == once


def test_recover_drops_partials_and_entries_already_applied(setup):
    j, disk, target, _ = setup
    journal_batch(j, 1, batch(1, [(0, os.urandom(4096))]))
    j.apply_next(disk)
    fd = j.open_partial(DISK, 2, 100)  # a body that never finished arriving: never acknowledged
    os.write(fd, b"x" * 10)
    os.close(fd)
    with open(j.entry_path(DISK, 1), "wb") as f:  # applied, but its deletion was lost
        f.write(b"stale")
    j2 = Journal(j.root, 86400)
    dj = j2.recover()[DISK]
    assert dj.applied_seq == 1 and dj.acked_seq == 1 and not dj.pending
    assert sorted(os.listdir(dj.folder)) == ["state.json"]


def test_damaged_entry_is_refused_and_the_target_keeps_what_it_had(setup):
    j, disk, target, _ = setup
    journal_batch(j, 1, batch(1, [(0, os.urandom(4096))]))
    path = j.entry_path(DISK, 1)
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0xFF  # inside the frame payload/checksum: the frame check fails
    open(path, "wb").write(bytes(data))
    before = sha(target)
    with pytest.raises(JournalError, match="damaged on the journal disk"):
        j.apply_next(disk)
    assert sha(target) == before and j.disk(DISK).applied_seq == 0 and os.path.exists(path)


def test_entry_header_validation_order():
    good = entry_header(7, 123)
    assert read_entry_header(DISK, good, 7) == 123
    with pytest.raises(JournalError, match="shorter"):
        read_entry_header(DISK, good[:5], 7)
    with pytest.raises(JournalError, match="magic"):
        read_entry_header(DISK, b"XXXX" + good[4:], 7)
    with pytest.raises(JournalError, match="version"):
        read_entry_header(DISK, good[:4] + b"\x09" + good[5:], 7)
    with pytest.raises(JournalError, match="checksum"):
        read_entry_header(DISK, good[:JOURNAL_HEADER.size - 1] + b"\x01" + good[JOURNAL_HEADER.size:], 7)
    with pytest.raises(JournalError, match="says seq 7"):
        read_entry_header(DISK, good, 8)


def test_hold_blocks_apply_across_restart_and_cancel_drops_only_held_entries(setup):
    j, disk, target, _ = setup
    journal_batch(j, 1, batch(1, [(0, os.urandom(4096))]))
    j.apply_next(disk)
    applied = sha(target)
    j.hold(DISK)
    journal_batch(j, 2, batch(2, [(4096, os.urandom(4096))], point="final"))
    assert j.apply_next(disk) is None and sha(target) == applied
    j2 = Journal(j.root, 86400)
    dj = j2.recover()[DISK]
    assert dj.held and dj.acked_seq == 2
    assert j2.apply_next(disk) is None and sha(target) == applied
    assert j2.cancel(DISK) == [2]
    assert not j2.disk(DISK).held and j2.disk(DISK).acked_seq == 1 and sha(target) == applied
    with pytest.raises(JournalError, match="nothing to cancel"):
        j2.cancel(DISK)


def test_registry_checks_sizes_ids_tokens_and_refuses_to_overwrite(tmp_path):
    reg = Registry(str(tmp_path / "s"))
    img = tmp_path / "a.img"
    img.write_bytes(bytes(8192))
    with pytest.raises(RegistryError, match="holds 8192 bytes, disk web01.sda needs 4096"):
        reg.add_disk(DISK, str(img), 4096)
    with pytest.raises(RegistryError, match="must match"):
        reg.add_disk("Bad Id", str(img))
    with pytest.raises(RegistryError, match="already exists"):
        reg.add_disk(DISK, str(img), 8192, create=True)
    assert img.read_bytes() == bytes(8192)
    reg.add_disk(DISK, str(tmp_path / "new.img"), 1 << 20, create=True)
    assert (tmp_path / "new.img").stat().st_size == 1 << 20
    with pytest.raises(RegistryError, match="shorter than 16"):
        reg.add_sender("x", "short")
    reg.add_sender("agent", "a" * 32)
    again = Registry(str(tmp_path / "s"))
    assert again.sender_for("a" * 32) == "agent" and again.sender_for("b" * 32) is None
    assert again.disks[DISK].size == 1 << 20
    assert "a" * 32 not in (tmp_path / "s" / "registry.json").read_text()  # only its digest is stored


def apply_all(j: Journal, disk) -> None:
    while j.apply_next(disk):
        pass


def test_rollback_to_earlier_points_including_mid_entry_and_after_a_new_history(setup):
    j, disk, target, _ = setup
    snaps = {"start": target.read_bytes()}
    seq = 0
    for name in ("p1", "p2", "p3"):
        seq += 1
        journal_batch(j, seq, batch(seq, [(seq * 4096, os.urandom(8192)), (0, os.urandom(1024))], point=name))
        apply_all(j, disk)
        snaps[name] = target.read_bytes()
    # An entry whose point sits between two overlapping writes.
    seq += 1
    w1, w2 = os.urandom(16384), os.urandom(4096)
    b = BatchBuilder(DISK, seq, SIZE)
    b.write(65536, w1)
    b.bookmark({"point_id": "mid", "machine": "web01", "created": time.time(), "consistency": "crash", "cycle": 1,
                "block_size": 65536, "image_digest": ""})
    b.write(65536 + 4096, w2)
    b.zero(0, 8192)
    journal_batch(j, seq, b.to_bytes())
    apply_all(j, disk)
    snaps["mid"] = expected_after(snaps["p3"], [(65536, w1)])

    assert j.rollback(disk, "mid")["applied_seq"] == seq
    assert target.read_bytes() == snaps["mid"]
    assert j.rollback(disk, "p2")["applied_seq"] == 2
    assert target.read_bytes() == snaps["p2"]
    assert [p["point_id"] for p in j.disk(DISK).points] == ["p1", "p2"]
    assert j.disk(DISK).acked_seq == 2
    # A new history from p2, then back past it to p1.
    journal_batch(j, 3, batch(3, [(0, os.urandom(65536))], point="p3b"))
    apply_all(j, disk)
    assert j.rollback(disk, "p1")["applied_seq"] == 1
    assert target.read_bytes() == snaps["p1"]
    with pytest.raises(JournalError, match="no retained failback point 'p3'"):
        j.rollback(disk, "p3")


def test_an_interrupted_rollback_resumes_to_the_same_bytes(setup):
    from lifeboat.master_target.undo import undo_records_reversed

    j, disk, target, _ = setup
    for seq, name in ((1, "p1"), (2, "p2"), (3, "p3")):
        journal_batch(j, seq, batch(seq, [(0, os.urandom(12288)), (seq * 8192, os.urandom(8192))], point=name))
        apply_all(j, disk)
        if name == "p1":
            at_p1 = target.read_bytes()
    dj = j.disk(DISK)
    j._write_state(dj, rollback={"point_id": "p1", "seq": 1, "frame_index": 2})
    # The crash came after part of the reverse sequence: entry 3's records and one of entry 2's.
    fd = os.open(target, os.O_WRONLY)
    records = list(undo_records_reversed(j.undo_path(DISK, 3), 3, 0)) + list(
        undo_records_reversed(j.undo_path(DISK, 2), 2, 0))[:1]
    for offset, old, length in records:
        os.pwrite(fd, old if old is not None else bytes(length), offset)
    os.close(fd)
    j2 = Journal(j.root, 86400)
    assert j2.recover()[DISK].rollback["point_id"] == "p1"
    j2.resume_rollback(disk)
    assert target.read_bytes() == at_p1 and j2.disk(DISK).rollback is None


def test_retention_bounds_points_and_undo_files(setup):
    j, disk, target, _ = setup
    j.retention_seconds = 3600
    b = BatchBuilder(DISK, 1, SIZE)
    b.write(0, os.urandom(4096))
    b.bookmark({"point_id": "old", "machine": "web01", "created": time.time() - 7200, "consistency": "crash",
                "cycle": 1, "block_size": 65536, "image_digest": ""})
    journal_batch(j, 1, b.to_bytes())
    apply_all(j, disk)
    journal_batch(j, 2, batch(2, [(4096, os.urandom(4096))], point="new"))
    apply_all(j, disk)
    assert [p["point_id"] for p in j.disk(DISK).points] == ["new"]
    assert not os.path.exists(j.undo_path(DISK, 1)) and os.path.exists(j.undo_path(DISK, 2))


def test_a_crash_between_frames_keeps_the_undo_exact(setup, monkeypatch):
    """Overlapping frames, the apply dies after the third pwrite; resumed, then rolled back: the earlier point's bytes."""
    import lifeboat.master_target.journal as jmod

    j, disk, target, _ = setup
    journal_batch(j, 1, batch(1, [(0, os.urandom(4096))], point="p1"))
    apply_all(j, disk)
    at_p1 = target.read_bytes()
    frames = [(0, os.urandom(16384)), (4096, os.urandom(4096)), (0, 8192), (2048 * 4, os.urandom(8192)),
              (512, os.urandom(1024))]
    journal_batch(j, 2, batch(2, frames, point="p2"))
    real, calls = jmod._pwrite_all, []

    def dying_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError("simulated crash")
        real(fd, data, offset)

    monkeypatch.setattr(jmod, "_pwrite_all", dying_pwrite)
    with pytest.raises(OSError, match="simulated crash"):
        j.apply_next(disk)
    monkeypatch.setattr(jmod, "_pwrite_all", real)
    j2 = Journal(j.root, 86400)
    j2.recover()
    apply_all(j2, disk)
    assert target.read_bytes() == expected_after(at_p1, frames)
    j2.rollback(disk, "p1")
    assert target.read_bytes() == at_p1


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_fuzz_entry_header_raises_only_journal_errors(data, seq):
    try:
        read_entry_header(DISK, data, seq)
    except JournalError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.integers(0, 600))
def test_fuzz_undo_files_are_read_as_records_or_refused(tmp_path, garbage, cut):
    """A damaged undo file is refused (rollback does not start), never misread or crashing."""
    from lifeboat.master_target.undo import UndoError, UndoWriter, check_undo
    from lifeboat.core.wire import Frame, FRAME_WRITE

    target = tmp_path / "t.img"
    target.write_bytes(os.urandom(8192))
    path = str(tmp_path / "x.undo")
    if os.path.exists(path):
        os.unlink(path)
    w = UndoWriter(path, 3, 99)
    fd = os.open(target, os.O_RDONLY)
    w.record([(0, Frame(FRAME_WRITE, 0, 4096, b"")), (1, Frame(FRAME_WRITE, 4096, 512, b""))], fd)
    os.close(fd)
    w.finish()
    w.close()
    data = open(path, "rb").read()
    damaged = data[: len(data) - cut] + garbage
    open(path, "wb").write(damaged)
    try:
        n = check_undo(path, 3)
    except UndoError:
        return
    assert damaged == data and n == 2  # anything else, even a cut at a record boundary, is refused


def compressed_batch(seq: int, frames: list[tuple[int, bytes]]) -> bytes:
    """A version 2 batch as an agent sends it (write frames zstd-compressed where that is smaller)."""
    b = BatchBuilder(DISK, seq, SIZE, compress=True)
    for offset, data in frames:
        b.write(offset, data)
    b.compress_frames()
    return b.to_bytes()


def test_compressed_entry_is_decompressed_onto_the_target(setup):
    j, disk, target, _ = setup
    original = target.read_bytes()
    # Compressible (text-like) and incompressible (random) extents: the first two go as zstd frames.
    frames = [(0, (b"lifeboat block " * 4370)[:65536]), (131072, bytes(8192) + b"\1" * 4096), (262144, os.urandom(4096))]
    body = compressed_batch(1, frames)
    _header, parsed = parse_batch(body)
    assert [f.compressed for f in parsed] == [True, True, False]
    assert len(body) < sum(len(d) for _o, d in frames)
    journal_batch(j, 1, body)
    assert j.apply_next(disk).seq == 1
    assert sha(target) == hashlib.sha256(expected_after(original, frames)).hexdigest()


def test_damaged_compressed_entry_is_refused_and_the_target_keeps_what_it_had(setup):
    j, disk, target, _ = setup
    before = sha(target)
    # A zstd frame that decompresses to other bytes than its plaintext hash says, with a valid frame
    # checksum (as a buggy sender would write it): only the plaintext hash can catch it.
    payload = ZSTD_PLAIN_HASH.pack(xxhash.xxh3_64_intdigest(b"a" * 65536)) + zstandard.ZstdCompressor().compress(b"b" * 65536)
    frame_head = FRAME_HEADER.pack(FRAME_WRITE, FRAME_FLAG_ZSTD, 0, len(payload), 0, 65536)
    body = b"".join([BatchHeader(DISK, 1, SIZE, 1, version=2, flags=BATCH_FLAG_AGENT_COMPRESSED).encode(), frame_head,
                     payload, FRAME_CHECKSUM.pack(frame_checksum(frame_head, payload, 0))])
    journal_batch(j, 1, body)
    with pytest.raises(JournalError, match="plaintext hash"):
        j.apply_next(disk)
    assert sha(target) == before
