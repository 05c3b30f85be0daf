"""Undo records: the bytes each journal entry overwrote, so that a disk can be switched back to an earlier failback point.

Specified in FORMATS.md section 12. Written (fsynced, renamed) before the entry is applied, from
the target as it is then; kept while a retained point needs it (the failback policy's retention).
Applying undo records in reverse order down to a point restores the target to that point, and
doing it again from any intermediate state gives the same bytes (each position ends with the
value the oldest record covering it saved), so an interrupted rollback is simply restarted.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

import xxhash

from ..core.wire import FRAME_WRITE, FRAME_ZERO, MAX_FRAME_PAYLOAD_BYTES, Frame

UNDO_MAGIC = b"LBMU"
UNDO_VERSION = 1
# magic, version, flags, reserved, seq, entry_digest (xxh3_64 of the journal entry's batch body)
UNDO_HEADER = struct.Struct("<4sBBHQQ")
UNDO_HEADER_CHECKSUM = struct.Struct("<Q")
# frame_index, flags, reserved, reserved, offset, length
UNDO_RECORD = struct.Struct("<IBBHQQ")
UNDO_RECORD_CHECKSUM = struct.Struct("<Q")
UNDO_FLAG_ZERO = 1          # the old bytes were all zero: no payload stored
UNDO_FLAG_END = 2           # last record of a complete file: offset = number of records before it
UNDO_SUFFIX = ".undo"
MAX_UNDO_RECORD_BYTES = MAX_FRAME_PAYLOAD_BYTES
_ZEROS = bytes(MAX_UNDO_RECORD_BYTES)


class UndoError(Exception):
    pass


def _header(seq: int, entry_digest: int) -> bytes:
    head = UNDO_HEADER.pack(UNDO_MAGIC, UNDO_VERSION, 0, 0, seq, entry_digest)
    return head + UNDO_HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))


class UndoWriter:
    """Appends one record per WRITE/ZERO frame, each fsynced before that frame touches the target.

    So after a crash, with records for frames ≤ `last_index`, no later frame has changed the
    target: re-applying frames ≤ last_index rebuilds exactly the state the next record must save.
    A file made for another entry (other digest) is replaced; a torn last record is cut off.
    """

    def __init__(self, path: str, seq: int, entry_digest: int) -> None:
        self.path = path
        self.last_index = -1
        self.count = 0
        if undo_entry_digest(path, seq) == entry_digest:
            valid_end, self.last_index, self.count = _valid_prefix(path)
            self.f = open(path, "r+b")
            self.f.truncate(valid_end)
            self.f.seek(valid_end)
        else:
            self.f = open(path, "wb")
            self.f.write(_header(seq, entry_digest))
        self.f.flush()
        os.fsync(self.f.fileno())

    def record(self, group: list[tuple[int, Frame]], target_fd: int) -> None:
        """Save the old bytes of a group of frames no two of which overlap, with one fsync for all.

        Without overlaps inside the group, the target before the group is also the target before
        each of its frames, so every record is exact (the caller groups; see Journal.apply_next).
        """
        for index, frame in group:
            # A ZERO frame may span the whole disk: records hold at most MAX_UNDO_RECORD_BYTES each.
            for offset in range(frame.offset, frame.offset + frame.length, MAX_UNDO_RECORD_BYTES):
                length = min(MAX_UNDO_RECORD_BYTES, frame.offset + frame.length - offset)
                old = os.pread(target_fd, length, offset)
                if len(old) != length:
                    raise UndoError(f"short read of the target at {offset}: {len(old)} of {length} bytes")
                zero = old[:1] == b"\0" and old == _ZEROS[:length]  # memcmp: ~15x faster than bytes.count
                head = UNDO_RECORD.pack(index, UNDO_FLAG_ZERO if zero else 0, 0, 0, offset, length)
                payload = b"" if zero else old
                h = xxhash.xxh3_64(head)
                h.update(payload)
                self.f.write(head + payload + UNDO_RECORD_CHECKSUM.pack(h.intdigest()))
                self.count += 1
            self.last_index = index
        self.f.flush()
        os.fsync(self.f.fileno())

    def finish(self) -> None:
        """Seal the file once the entry is applied: a reader then knows no record is missing."""
        head = UNDO_RECORD.pack(0xFFFFFFFF, UNDO_FLAG_END, 0, 0, self.count, 0)
        self.f.write(head + UNDO_RECORD_CHECKSUM.pack(xxhash.xxh3_64_intdigest(head)))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _valid_prefix(path: str) -> tuple[int, int, int]:
    """(end offset of the last intact data record, its frame index or -1, number of data records).

    An END record is dropped too: the entry is being applied again, finish() writes a new one."""
    end, last, count = UNDO_HEADER.size + UNDO_HEADER_CHECKSUM.size, -1, 0
    try:
        for index, flags, _offset, _length, _pos, rec_end in _scan(path):
            if flags & UNDO_FLAG_END:
                break
            end, last, count = rec_end, index, count + 1
    except UndoError:
        pass  # a torn tail: everything before it is intact
    return end, last, count


def undo_entry_digest(path: str, seq: int) -> int | None:
    """The entry digest an undo file was written for, or None if it is missing or not for this seq."""
    try:
        with open(path, "rb") as f:
            head = f.read(UNDO_HEADER.size + UNDO_HEADER_CHECKSUM.size)
    except FileNotFoundError:
        return None
    if len(head) < UNDO_HEADER.size + UNDO_HEADER_CHECKSUM.size:
        return None
    magic, version, _f, _r, file_seq, digest = UNDO_HEADER.unpack_from(head)
    (check,) = UNDO_HEADER_CHECKSUM.unpack_from(head, UNDO_HEADER.size)
    if magic != UNDO_MAGIC or version != UNDO_VERSION or file_seq != seq:
        return None
    return digest if check == xxhash.xxh3_64_intdigest(head[: UNDO_HEADER.size]) else None


def _scan(path: str) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(frame_index, flags, offset, length, payload position, record end) of each record, checked in order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(UNDO_HEADER.size + UNDO_HEADER_CHECKSUM.size)
        pos = f.tell()
        while pos < size:
            rec = f.read(UNDO_RECORD.size)
            if len(rec) < UNDO_RECORD.size:
                raise UndoError(f"{path}: truncated record at offset {pos}")
            index, flags, _a, _b, offset, length = UNDO_RECORD.unpack(rec)
            if length > MAX_UNDO_RECORD_BYTES:
                raise UndoError(f"{path}: record at offset {pos} claims {length} bytes")
            plen = 0 if flags & (UNDO_FLAG_ZERO | UNDO_FLAG_END) else length
            payload = f.read(plen)
            tail = f.read(UNDO_RECORD_CHECKSUM.size)
            h = xxhash.xxh3_64(rec)
            h.update(payload)
            if len(payload) != plen or len(tail) != UNDO_RECORD_CHECKSUM.size or \
                    UNDO_RECORD_CHECKSUM.unpack(tail)[0] != h.intdigest():
                raise UndoError(f"{path}: record at offset {pos} fails its checksum")
            end = pos + UNDO_RECORD.size + plen + UNDO_RECORD_CHECKSUM.size
            yield index, flags, offset, length, pos + UNDO_RECORD.size, end
            pos = end


def _records(path: str, seq: int) -> list[tuple[int, int, int, int, int]]:
    """Every record of a complete undo file (strict: any damage, a missing END or a record count
    that disagrees with it is an error)."""
    digest = undo_entry_digest(path, seq)
    if digest is None:
        raise UndoError(f"{path}: missing, damaged, or not the undo file of entry {seq}")
    records = [r[:5] for r in _scan(path)]
    if not records or records[-1][1] != UNDO_FLAG_END or records[-1][2] != len(records) - 1:
        raise UndoError(f"{path}: incomplete (no END record, or its count of {records[-1][2] if records else '?'} "
                        f"records disagrees with {max(0, len(records) - 1)} found)")
    if any(r[1] & UNDO_FLAG_END for r in records[:-1]):
        raise UndoError(f"{path}: END record before the last record")
    return records[:-1]


def check_undo(path: str, seq: int) -> int:
    """Verify every record; returns how many there are (a rollback starts only if all are intact)."""
    return len(_records(path, seq))


def undo_records_reversed(path: str, seq: int, from_frame: int,
                          void_from: int | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, old bytes or None for zeros, length) of the records with from_frame <= frame_index < void_from,
    newest first. Records at or above void_from were undone by an earlier rollback and are void."""
    records = [r for r in _records(path, seq) if r[0] >= from_frame and (void_from is None or r[0] < void_from)]
    with open(path, "rb") as f:
        for index, flags, offset, length, pos in reversed(records):
            if flags & UNDO_FLAG_ZERO:
                yield offset, None, length
            else:
                f.seek(pos)
                yield offset, f.read(length), length
