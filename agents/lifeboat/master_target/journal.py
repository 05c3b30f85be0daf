"""Master-target write-ahead journal: batches fsynced before acknowledgement, applied in seq order, resumable.

Specified in FORMATS.md section 12. A batch is acknowledged only after its journal entry is
complete, fsynced and renamed; the applier writes an entry's frames to the target with pwrite,
fsyncs the target, and only then records `applied_seq` durably (state file, atomic rename). A
crash anywhere in between re-applies the entry from its first frame at restart: every frame
carries an absolute offset and frames apply in order, so applying an entry twice gives the same
bytes as applying it once (idempotent), and an interrupted apply is never left half done.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator

import xxhash

from ..core.errors import FormatError, LifeboatError
from ..core.wire import FRAME_BOOKMARK, FRAME_WRITE, FRAME_ZERO, BatchParser, Frame, frame_plaintext
from ..process_server.cache import fsync_dir, write_json_atomic
from .registry import TargetDisk
from .undo import UNDO_SUFFIX, UndoWriter, check_undo, undo_records_reversed

JOURNAL_MAGIC = b"LBMJ"
JOURNAL_VERSION = 1
# magic, version, flags, reserved, seq, body_len
JOURNAL_HEADER = struct.Struct("<4sBBHQQ")
JOURNAL_HEADER_CHECKSUM = struct.Struct("<Q")
JOURNAL_SUFFIX = ".lbj"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "state.json"
HOLD_FILE = "hold"   # present: entries are journaled but not applied (failover back in preparation)
STATE_VERSION = 1
SEQ_DIGITS = 20
APPLY_READ_BYTES = 1024 * 1024
# Frames applied per undo fsync (non-overlapping frames share one): bounds the memory held and the
# re-apply after a crash; the agent's sequential extents never overlap, so a batch is a few groups.
UNDO_GROUP_BYTES = 16 * 1024 * 1024
UNDO_GROUP_FRAMES = 64
ZERO_CHUNK_BYTES = 1024 * 1024
# Test hook (fault injection, never set in production): sleep this long after each applied frame,
# so that a test can SIGKILL the daemon in the middle of an entry.
APPLY_DELAY_ENV = "LIFEBOAT_MT_APPLY_FRAME_DELAY_SECONDS"
_ENTRY_RE = re.compile(r"^(\d{%d})\.lbj$" % SEQ_DIGITS)
_UNDO_RE = re.compile(r"^(\d{%d})\.undo$" % SEQ_DIGITS)
_ZEROS = bytes(ZERO_CHUNK_BYTES)


class JournalError(LifeboatError):
    """Master-target journal of disk {}: {}."""


def entry_header(seq: int, body_len: int) -> bytes:
    head = JOURNAL_HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, 0, 0, seq, body_len)
    return head + JOURNAL_HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))


def read_entry_header(disk_id: str, data: bytes, expected_seq: int) -> int:
    """Check size → magic → version → checksum → seq; return body_len."""
    need = JOURNAL_HEADER.size + JOURNAL_HEADER_CHECKSUM.size
    if len(data) < need:
        raise JournalError(disk_id, f"entry {expected_seq} is {len(data)} bytes, shorter than its {need}-byte header")
    magic, version, _flags, _res, seq, body_len = JOURNAL_HEADER.unpack_from(data)
    if magic != JOURNAL_MAGIC:
        raise JournalError(disk_id, f"entry {expected_seq} has magic {magic!r}, not {JOURNAL_MAGIC!r}")
    if version != JOURNAL_VERSION:
        raise JournalError(disk_id, f"entry {expected_seq} has version {version}, this build reads {JOURNAL_VERSION}")
    (check,) = JOURNAL_HEADER_CHECKSUM.unpack_from(data, JOURNAL_HEADER.size)
    if check != xxhash.xxh3_64_intdigest(data[: JOURNAL_HEADER.size]):
        raise JournalError(disk_id, f"entry {expected_seq}: header checksum mismatch (journal disk damaged)")
    if seq != expected_seq:
        raise JournalError(disk_id, f"entry file {expected_seq} says seq {seq}")
    return body_len


@dataclass
class DiskJournal:
    disk_id: str
    folder: str
    applied_seq: int = 0
    applied_bytes: int = 0
    points: list = field(default_factory=list)
    pending: dict = field(default_factory=dict)  # seq -> entry file size
    held: bool = False
    undo_void: dict = field(default_factory=dict)   # str(seq) -> first frame index whose undo record is void
    rollback: dict | None = None                    # an interrupted switch to an earlier point

    @property
    def acked_seq(self) -> int:
        return max([self.applied_seq, *self.pending])

    @property
    def lag_bytes(self) -> int:
        return sum(self.pending.values())


@dataclass
class ApplyResult:
    seq: int
    frames: int
    written_bytes: int
    zeroed_bytes: int
    points: list


class Journal:
    """Layout: <root>/<disk id>/<seq>.lbj (complete, fsynced entries) and state.json (applied_seq, points)."""

    def __init__(self, root: str, retention_seconds: float) -> None:
        self.root = root
        self.retention_seconds = retention_seconds
        self.disks: dict[str, DiskJournal] = {}
        os.makedirs(root, exist_ok=True)
        self.frame_delay = float(os.environ.get(APPLY_DELAY_ENV, "0") or 0)

    def recover(self) -> dict[str, DiskJournal]:
        """After a (re)start: drop partial entries (never acknowledged), keep complete ones above applied_seq."""
        for disk_id in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, disk_id)
            if not os.path.isdir(folder):
                continue
            dj = self.disk(disk_id)
            state = os.path.join(folder, STATE_FILE)
            if os.path.exists(state):
                with open(state) as f:
                    doc = json.load(f)
                if doc.get("version") != STATE_VERSION:
                    raise JournalError(disk_id, f"{state} has version {doc.get('version')}, expected {STATE_VERSION}")
                dj.applied_seq, dj.applied_bytes = int(doc["applied_seq"]), int(doc["applied_bytes"])
                dj.points = list(doc.get("points", []))
                dj.undo_void = dict(doc.get("undo_void", {}))
                dj.rollback = doc.get("rollback")
            dj.held = os.path.exists(os.path.join(folder, HOLD_FILE))
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.endswith(PARTIAL_SUFFIX) or name.endswith(".tmp"):
                    os.unlink(path)
                    continue
                m = _ENTRY_RE.match(name)
                if m:
                    seq = int(m.group(1))
                    if seq <= dj.applied_seq:
                        os.unlink(path)  # applied before the crash; its deletion was lost
                    else:
                        dj.pending[seq] = os.stat(path).st_size
        return self.disks

    def disk(self, disk_id: str) -> DiskJournal:
        dj = self.disks.get(disk_id)
        if dj is None:
            folder = os.path.join(self.root, disk_id)
            os.makedirs(folder, exist_ok=True)
            dj = self.disks[disk_id] = DiskJournal(disk_id, folder)
        return dj

    def entry_path(self, disk_id: str, seq: int, partial: bool = False) -> str:
        return os.path.join(self.root, disk_id, f"{seq:0{SEQ_DIGITS}d}" + (PARTIAL_SUFFIX if partial else JOURNAL_SUFFIX))

    @property
    def lag_bytes(self) -> int:
        return sum(d.lag_bytes for d in self.disks.values())

    # --- receiving (called from worker threads) ------------------------------------------

    def open_partial(self, disk_id: str, seq: int, body_len: int) -> int:
        self.disk(disk_id)
        fd = os.open(self.entry_path(disk_id, seq, True), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, entry_header(seq, body_len))
        return fd

    def commit(self, disk_id: str, seq: int, fd: int) -> int:
        """fsync and publish a fully received entry; returns its size. After this the batch may be acknowledged."""
        os.fsync(fd)
        size = os.fstat(fd).st_size
        os.close(fd)
        os.rename(self.entry_path(disk_id, seq, True), self.entry_path(disk_id, seq))
        fsync_dir(os.path.join(self.root, disk_id))
        return size

    def published(self, disk_id: str, seq: int, size: int) -> None:
        self.disk(disk_id).pending[seq] = size

    def discard_partial(self, disk_id: str, seq: int, fd: int | None) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.entry_path(disk_id, seq, True))
        except FileNotFoundError:
            pass

    # --- failover back: hold, then switch (release) or cancel ---------------------------

    def hold(self, disk_id: str) -> None:
        """Stop applying after the entry in progress; persisted, so a restart does not apply either."""
        dj = self.disk(disk_id)
        with open(os.path.join(dj.folder, HOLD_FILE), "w") as f:
            f.write("held\n")
            os.fsync(f.fileno())
        fsync_dir(dj.folder)
        dj.held = True

    def release(self, disk_id: str) -> None:
        dj = self.disk(disk_id)
        try:
            os.unlink(os.path.join(dj.folder, HOLD_FILE))
        except FileNotFoundError:
            pass
        fsync_dir(dj.folder)
        dj.held = False

    def cancel(self, disk_id: str) -> list[int]:
        """Drop the held, never-applied entries (the target stays at applied_seq), then release the hold."""
        dj = self.disk(disk_id)
        if not dj.held:
            raise JournalError(disk_id, "nothing to cancel: no failover back is being prepared (no hold)")
        dropped = sorted(dj.pending)
        for seq in dropped:
            os.unlink(self.entry_path(disk_id, seq))
            dj.pending.pop(seq)
        fsync_dir(dj.folder)
        self.release(disk_id)
        return dropped

    # --- applying (worker thread) ---------------------------------------------------------

    def undo_path(self, disk_id: str, seq: int) -> str:
        return os.path.join(self.root, disk_id, f"{seq:0{SEQ_DIGITS}d}" + UNDO_SUFFIX)

    def _entry_frames(self, target: TargetDisk, seq: int) -> Iterator[tuple[int, Frame]]:
        """Verified (index, frame) of a journal entry, read in bounded chunks (never the whole entry)."""
        with open(self.entry_path(target.disk_id, seq), "rb") as entry:
            head = entry.read(JOURNAL_HEADER.size + JOURNAL_HEADER_CHECKSUM.size)
            remaining = read_entry_header(target.disk_id, head, seq)
            # Compressed frames (batch version 2) are decompressed and checked once, when applied.
            parser = BatchParser(expected_disk_id=target.disk_id, expected_seq=seq, check_compressed=False)
            index = 0
            while remaining:
                chunk = entry.read(min(APPLY_READ_BYTES, remaining))
                if not chunk:
                    raise JournalError(target.disk_id, f"entry {seq} ends {remaining} bytes early")
                remaining -= len(chunk)
                try:
                    ready = parser.feed(chunk)
                except FormatError as exc:
                    raise JournalError(target.disk_id, f"entry {seq} is damaged on the journal disk: {exc}") from None
                if parser.header is not None and parser.header.disk_size != target.size:
                    raise JournalError(target.disk_id, f"entry {seq} is for a disk of {parser.header.disk_size} "
                                       f"bytes, the target holds {target.size}")
                for frame in ready:
                    yield index, frame
                    index += 1
            try:
                parser.finish()
            except FormatError as exc:
                raise JournalError(target.disk_id, f"entry {seq} is damaged on the journal disk: {exc}") from None

    def _entry_digest(self, disk_id: str, seq: int) -> int:
        h = xxhash.xxh3_64()
        with open(self.entry_path(disk_id, seq), "rb") as f:
            f.seek(JOURNAL_HEADER.size + JOURNAL_HEADER_CHECKSUM.size)
            while chunk := f.read(APPLY_READ_BYTES):
                h.update(chunk)
        return h.intdigest()

    def apply_next(self, target: TargetDisk) -> ApplyResult | None:
        """Apply the lowest pending entry of the target's disk; None when nothing is pending (or held).

        Write-ahead order, per group of non-overlapping frames: undo records (the bytes they will
        overwrite) fsynced → frames pwritten; then target fsynced → applied_seq recorded → entry deleted.
        """
        dj = self.disk(target.disk_id)
        if not dj.pending or dj.held:
            return None
        seq = min(dj.pending)
        if seq != dj.applied_seq + 1:
            raise JournalError(target.disk_id, f"next entry is {seq} but {dj.applied_seq} is applied: "
                               f"entry {dj.applied_seq + 1} is missing; resync the disk")
        written = zeroed = frames = 0
        points = []
        fd = os.open(target.path, os.O_RDWR)
        undo = UndoWriter(self.undo_path(target.disk_id, seq), seq, self._entry_digest(target.disk_id, seq))
        group: list[tuple[int, Frame]] = []
        group_bytes = 0

        def flush_group() -> None:
            nonlocal written, zeroed, group_bytes
            # Undo records of the whole group are durable before any of its frames touches the target.
            fresh = [(i, f) for i, f in group if i > undo.last_index and f.kind in (FRAME_WRITE, FRAME_ZERO)]
            if fresh:
                undo.record(fresh, fd)
            for index, frame in group:
                if frame.kind == FRAME_WRITE:
                    try:
                        data = frame_plaintext(frame, index)
                    except FormatError as exc:
                        raise JournalError(target.disk_id, f"entry {seq} is damaged on the journal disk: {exc}") from None
                    _pwrite_all(fd, data, frame.offset)
                    written += frame.length
                elif frame.kind == FRAME_ZERO:
                    _zero(fd, frame.offset, frame.length)
                    zeroed += frame.length
                if self.frame_delay:
                    time.sleep(self.frame_delay)
            group.clear()
            group_bytes = 0

        try:
            for index, frame in self._entry_frames(target, seq):
                frames += 1
                if frame.kind == FRAME_BOOKMARK:
                    flush_group()  # the point is the state after every frame before it
                    points.append({**frame.bookmark(), "seq": seq, "frame_index": index, "applied_at": time.time()})
                    continue
                end = frame.offset + frame.length
                if group and (group_bytes + frame.length > UNDO_GROUP_BYTES or len(group) >= UNDO_GROUP_FRAMES or any(
                        frame.offset < f.offset + f.length and f.offset < end for _i, f in group)):
                    flush_group()  # an overlap must see the earlier frame's bytes in its undo record
                group.append((index, frame))
                group_bytes += frame.length
            flush_group()
            undo.finish()
            os.fsync(fd)  # the target holds the entry before applied_seq says so
        finally:
            undo.close()
            os.close(fd)
        self._record_applied(dj, seq, written + zeroed, points)
        os.unlink(self.entry_path(target.disk_id, seq))
        dj.pending.pop(seq, None)
        return ApplyResult(seq, frames, written, zeroed, points)

    def _write_state(self, dj: DiskJournal, **changes) -> None:
        doc = {"version": STATE_VERSION, "disk_id": dj.disk_id, "applied_seq": dj.applied_seq,
               "applied_bytes": dj.applied_bytes, "points": dj.points, "undo_void": dj.undo_void,
               "rollback": dj.rollback, **changes}
        write_json_atomic(os.path.join(dj.folder, STATE_FILE), doc)
        dj.applied_seq, dj.applied_bytes, dj.points = doc["applied_seq"], doc["applied_bytes"], doc["points"]
        dj.undo_void, dj.rollback = doc["undo_void"], doc["rollback"]

    def _record_applied(self, dj: DiskJournal, seq: int, nbytes: int, points: list) -> None:
        horizon = time.time() - self.retention_seconds
        kept = [p for p in dj.points if float(p.get("created", 0)) >= horizon] + points
        void = {k: v for k, v in dj.undo_void.items() if int(k) != seq}  # a new undo file for seq replaced it
        self._write_state(dj, applied_seq=seq, applied_bytes=dj.applied_bytes + nbytes, points=kept, undo_void=void)
        self._prune_undo(dj)

    def _prune_undo(self, dj: DiskJournal) -> None:
        """Undo files older than the oldest retained point can never be used: the failback retention bounds them."""
        floor = min((int(p["seq"]) for p in dj.points), default=dj.applied_seq + 1)
        for name in os.listdir(dj.folder):
            m = _UNDO_RE.match(name)
            if m and (int(m.group(1)) < floor or int(m.group(1)) > dj.applied_seq + 1):
                os.unlink(os.path.join(dj.folder, name))

    # --- switching to an earlier point ------------------------------------------------------

    def rollback(self, target: TargetDisk, point_id: str) -> dict:
        """Switch the target back to a retained earlier point by applying undo records newest first.

        Only with nothing journaled and unapplied (cancel a held final sync first). The intent is
        recorded before the first byte changes, so a crash mid-way resumes (resume_rollback) and
        ends at the same bytes. Afterwards acked_seq = the point's seq: later batches continue from it.
        """
        dj = self.disk(target.disk_id)
        if dj.pending:
            raise JournalError(target.disk_id, f"{len(dj.pending)} journaled batches are not applied: cancel the "
                               "failover back (or let them apply) before switching to an earlier point")
        matches = [p for p in dj.points if p["point_id"] == point_id]
        if not matches:
            known = ", ".join(p["point_id"] for p in dj.points) or "none"
            raise JournalError(target.disk_id, f"no retained failback point {point_id!r} (retained: {known})")
        point = matches[-1]
        seq, frame = int(point["seq"]), int(point["frame_index"])
        for n in range(seq, dj.applied_seq + 1):  # every record needed is intact before anything changes
            check_undo(self.undo_path(target.disk_id, n), n)
        self._write_state(dj, rollback={"point_id": point_id, "seq": seq, "frame_index": frame})
        return self.resume_rollback(target)

    def resume_rollback(self, target: TargetDisk) -> dict:
        dj = self.disk(target.disk_id)
        intent = dj.rollback
        assert intent is not None
        seq, frame = int(intent["seq"]), int(intent["frame_index"])
        restored = 0
        fd = os.open(target.path, os.O_WRONLY)
        try:
            for n in range(dj.applied_seq, seq - 1, -1):
                void = dj.undo_void.get(str(n))
                for offset, old, length in undo_records_reversed(self.undo_path(target.disk_id, n), n,
                                                                 frame if n == seq else 0, void):
                    if old is None:
                        _zero(fd, offset, length)
                    else:
                        _pwrite_all(fd, old, offset)
                    restored += length
            os.fsync(fd)
        finally:
            os.close(fd)
        kept = [p for p in dj.points if (int(p["seq"]), int(p["frame_index"])) <= (seq, frame)]
        void = {k: v for k, v in dj.undo_void.items() if int(k) < seq}
        void[str(seq)] = min(frame, dj.undo_void.get(str(seq), frame))
        self._write_state(dj, applied_seq=seq, points=kept, undo_void=void, rollback=None)
        self._prune_undo(dj)
        return {"point_id": intent["point_id"], "applied_seq": seq, "restored_bytes": restored}


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _zero(fd: int, offset: int, length: int) -> None:
    while length:
        n = min(length, ZERO_CHUNK_BYTES)
        _pwrite_all(fd, _ZEROS[:n], offset)
        offset, length = offset + n, length - n
