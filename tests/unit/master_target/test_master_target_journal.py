"""The master-target journal and registry on real files: recovery, idempotent re-apply, damage, hold/cancel."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from lifeboat.core.wire import BatchBuilder
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
