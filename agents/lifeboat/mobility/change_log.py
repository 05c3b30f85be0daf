"""Per-disk change log (`<state_dir>/<disk id>.hrl`): what the agent must still send.

Specified in FORMATS.md ("Change log"). The log degrades in tiers when its budgets run out,
always keeping a *superset* of the dirty blocks (over-reporting is safe, under-reporting loses
data):

  DATA     dirty extents with their bytes: memory pool (``pool_bytes``), then spilled to the file
           (``spill_bytes``)
  EXTENTS  only (first_block, count) per epoch, at most ``extent_budget`` merged extents
  BITMAP   one dirty bitmap for all pending epochs, ``granularity`` blocks per bit, chosen so that
           it fits ``bitmap_budget`` bytes
  RESYNC   nothing trustworthy: a digest resync must read the whole disk

Every tier change is logged with its reason and reported through ``on_tier_change(old, new,
reason)``. A reason is ``<code>`` or ``<code>: <detail>``; metrics label by ``reason_code()``.

The file is append-only with a checksum per record; it is rewritten (temp file, fsync, rename)
on a tier change and when it grows past twice its live content. A clean-shutdown marker (CLEAN)
must be its last record: anything else on open means the previous agent stopped uncleanly, and
the disk is resynced.

Epochs are the cycle engine's epoch numbers: non-negative and increasing, also across restarts
(start at ``last_epoch + 1``). ``acknowledge(E)`` must only be called for closed epochs (no more
``add_*`` for them will come); an add for an already acknowledged epoch is kept, never dropped.
Data given to ``add_data`` for an epoch is that epoch's final content of those blocks (freeze-copy
copies at the epoch switch); a later epoch's extents make it stale (then ``read_ranges`` has them).
Thread-safe: the tracker may add while the sender reads ``pending()`` and acknowledges.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import xxhash

from ..core import logging as log
from ..core.errors import FormatError, LifeboatError

logger = log.get("lifeboat.mobility.change_log")

HRL_MAGIC = b"LBHL"
HRL_VERSION = 1
# magic, version, flags, disk_id_len, disk_size, block_size, reserved; then disk id, then checksum
HRL_HEADER = struct.Struct("<4sBBHQII")
HRL_HEADER_CHECKSUM = struct.Struct("<Q")
# body_len, type, flags, reserved; then body, then checksum
RECORD_HEADER = struct.Struct("<IBBH")
RECORD_CHECKSUM = struct.Struct("<Q")

RECORD_EXTENTS = 1
RECORD_DATA = 2
RECORD_BITMAP = 3
RECORD_ACK = 4
RECORD_RESYNC = 5
RECORD_CLEAN = 6
RECORD_OPEN = 7
RECORD_TIER = 8
RECORD_TYPES = {RECORD_EXTENTS: "extents", RECORD_DATA: "data", RECORD_BITMAP: "bitmap", RECORD_ACK: "ack",
                RECORD_RESYNC: "resync", RECORD_CLEAN: "clean", RECORD_OPEN: "open", RECORD_TIER: "tier"}

EXTENTS_BODY = struct.Struct("<QI")     # epoch, count; then count x EXTENT_ENTRY
EXTENT_ENTRY = struct.Struct("<QQ")     # first block, block count
DATA_BODY = struct.Struct("<QQ")        # epoch, byte offset; then the bytes
BITMAP_BODY = struct.Struct("<QQQI")    # first epoch, last epoch, nbits, granularity; then the bits
ACK_BODY = struct.Struct("<Q")          # epoch acknowledged (all epochs <= it)
RESYNC_BODY = struct.Struct("<Q")       # through epoch; then UTF-8 reason
OPEN_BODY = struct.Struct("<Q")         # unix time in ns of the agent start
TIER_BODY = struct.Struct("<B")         # tier; then UTF-8 reason

MAX_DISK_ID_BYTES = 64
MAX_DATA_RECORD_BYTES = 4 * 1024 * 1024
MAX_EXTENTS_PER_RECORD = 65536
MAX_BITMAP_BYTES = 16 * 1024 * 1024
MAX_REASON_BYTES = 256
MAX_RECORD_BODY_BYTES = MAX_BITMAP_BYTES + BITMAP_BODY.size
COMPACT_MIN_BYTES = 1024 * 1024  # never rewrite a file smaller than this just because of dead records


class Tier(enum.IntEnum):
    DATA = 0
    EXTENTS = 1
    BITMAP = 2
    RESYNC = 3


class ChangeLogChanged(LifeboatError):
    """The change log changed while its pending data was being read ({}); call pending() again."""


def reason_code(reason: str | None) -> str | None:
    """The bounded part of a reason (for metric labels): "corrupt_record: at offset 77" -> "corrupt_record"."""
    return None if reason is None else reason.split(":", 1)[0]


Range = tuple[int, int]


def merge_ranges(ranges) -> list[Range]:
    """Sorted, non-overlapping, non-adjacent (first, count) ranges covering exactly the input's blocks."""
    out: list[list[int]] = []
    for first, count in sorted(r for r in ranges if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], first + count - out[-1][0])
        else:
            out.append([first, count])
    return [(f, c) for f, c in out]


def subtract_ranges(a: list[Range], b: list[Range]) -> list[Range]:
    """Blocks of merged ranges ``a`` that are not in merged ranges ``b``."""
    out: list[Range] = []
    j = 0
    for first, count in a:
        start, end = first, first + count
        while j < len(b) and b[j][0] + b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end and start < end:
            if b[k][0] > start:
                out.append((start, b[k][0] - start))
            start = max(start, b[k][0] + b[k][1])
            k += 1
        if start < end:
            out.append((start, end - start))
    return out


def _set_bits(bm: bytearray, a: int, b: int) -> None:
    """Set bits [a, b) (bit i is bit i % 8, LSB first, of byte i // 8)."""
    while a < b and a & 7:
        bm[a >> 3] |= 1 << (a & 7)
        a += 1
    n = (b - a) >> 3
    if n > 0:
        bm[a >> 3:(a >> 3) + n] = b"\xff" * n
        a += n << 3
    while a < b:
        bm[a >> 3] |= 1 << (a & 7)
        a += 1


def _bit_runs(bm: bytes | bytearray) -> list[Range]:
    """(first bit, count) runs of set bits."""
    runs: list[list[int]] = []

    def add(a: int, n: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1][1] += n
        else:
            runs.append([a, n])

    mv = bytes(bm)
    i = 0
    size = len(mv)
    while i < size:
        if mv[i] == 0:
            i += 1
            continue
        if mv[i] == 0xFF:
            j = i
            while j < size and mv[j] == 0xFF:
                j += 1
            add(i * 8, (j - i) * 8)
            i = j
            continue
        byte = mv[i]
        for bit in range(8):
            if byte >> bit & 1:
                add(i * 8 + bit, 1)
        i += 1
    return [(a, n) for a, n in runs]


def _checksum(pos: int, head: bytes, body: bytes | memoryview) -> int:
    # Seeding with the record's file offset makes a record copied to another position fail.
    h = xxhash.xxh3_64(seed=pos)
    h.update(head)
    h.update(body)
    return h.intdigest()


def encode_record(pos: int, rtype: int, body: bytes) -> bytes:
    head = RECORD_HEADER.pack(len(body), rtype, 0, 0)
    return head + body + RECORD_CHECKSUM.pack(_checksum(pos, head, body))


def encode_header(disk_id: str, disk_size: int, block_size: int) -> bytes:
    did = disk_id.encode()
    head = HRL_HEADER.pack(HRL_MAGIC, HRL_VERSION, 0, len(did), disk_size, block_size, 0) + did
    return head + HRL_HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))


def _reason_bytes(reason: str) -> bytes:
    return reason.encode()[:MAX_REASON_BYTES]


@dataclass
class Record:
    offset: int        # of the record header in the file
    end: int           # offset after its checksum
    type: int
    epoch: int | None = None
    ranges: list[Range] = field(default_factory=list)
    data_offset: int = 0
    data_length: int = 0
    reason: str | None = None
    tier: int | None = None
    bitmap: tuple | None = None   # (first_epoch, last_epoch, nbits, granularity, bits)


@dataclass
class Scan:
    """What a pass over a .hrl file found (``scan_file``)."""

    header_error: str | None = None
    disk_id: str | None = None
    disk_size: int = 0
    block_size: int = 0
    records: list[Record] = field(default_factory=list)
    end: int = 0                        # end of the last good record
    torn_at: int | None = None          # a partial / bad-checksum last record starts here
    corrupt: str | None = None          # "<what> at offset N": a damaged record with data after it
    file_size: int = 0


class _Corrupt(Exception):
    pass


def _block_count(disk_size: int, block_size: int) -> int:
    return -(-disk_size // block_size)


def _parse_body(rec: Record, body: bytes, disk_size: int, block_size: int) -> None:
    nblocks = _block_count(disk_size, block_size)
    t = rec.type
    if t == RECORD_EXTENTS:
        if len(body) < EXTENTS_BODY.size:
            raise _Corrupt("short extents record")
        rec.epoch, count = EXTENTS_BODY.unpack_from(body)
        if count > MAX_EXTENTS_PER_RECORD or len(body) != EXTENTS_BODY.size + count * EXTENT_ENTRY.size:
            raise _Corrupt(f"extents record declares {count} extents in {len(body)} bytes")
        for i in range(count):
            first, n = EXTENT_ENTRY.unpack_from(body, EXTENTS_BODY.size + i * EXTENT_ENTRY.size)
            if n == 0 or first + n > nblocks:
                raise _Corrupt(f"extent ({first}, {n}) outside the disk's {nblocks} blocks")
            rec.ranges.append((first, n))
    elif t == RECORD_DATA:
        if len(body) <= DATA_BODY.size:
            raise _Corrupt("short data record")
        rec.epoch, rec.data_offset = DATA_BODY.unpack_from(body)
        rec.data_length = len(body) - DATA_BODY.size
        end = rec.data_offset + rec.data_length
        if rec.data_offset % block_size or end > disk_size or (end % block_size and end != disk_size):
            raise _Corrupt(f"data extent ({rec.data_offset}, {rec.data_length}) unaligned or outside the disk")
    elif t == RECORD_BITMAP:
        if len(body) < BITMAP_BODY.size:
            raise _Corrupt("short bitmap record")
        lo, hi, nbits, gran = BITMAP_BODY.unpack_from(body)
        bits = body[BITMAP_BODY.size:]
        if gran < 1 or lo > hi or nbits != -(-nblocks // gran) or len(bits) != -(-nbits // 8):
            raise _Corrupt(f"bitmap of {nbits} bits x {gran} blocks does not fit the disk's {nblocks} blocks")
        rec.bitmap = (lo, hi, nbits, gran, bytearray(bits))
    elif t == RECORD_ACK:
        if len(body) != ACK_BODY.size:
            raise _Corrupt("bad ack record length")
        (rec.epoch,) = ACK_BODY.unpack(body)
    elif t == RECORD_RESYNC:
        if len(body) < RESYNC_BODY.size or len(body) > RESYNC_BODY.size + MAX_REASON_BYTES:
            raise _Corrupt("bad resync record length")
        (rec.epoch,) = RESYNC_BODY.unpack_from(body)
        rec.reason = body[RESYNC_BODY.size:].decode(errors="replace") or "unknown"
    elif t == RECORD_CLEAN:
        if body:
            raise _Corrupt("clean record with a body")
    elif t == RECORD_OPEN:
        if len(body) != OPEN_BODY.size:
            raise _Corrupt("bad open record length")
    elif t == RECORD_TIER:
        if len(body) < TIER_BODY.size or len(body) > TIER_BODY.size + MAX_REASON_BYTES:
            raise _Corrupt("bad tier record length")
        (rec.tier,) = TIER_BODY.unpack_from(body)
        if rec.tier not in (Tier.DATA, Tier.EXTENTS, Tier.BITMAP):
            raise _Corrupt(f"unknown tier {rec.tier}")
        rec.reason = body[TIER_BODY.size:].decode(errors="replace") or None


def _pread_exact(fd: int, n: int, pos: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), pos + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _scan_fd(fd: int, geometry: tuple[int, int] | None = None) -> Scan:
    """Parse header and records. ``geometry`` (disk_size, block_size) overrides the header's for validation."""
    scan = Scan()
    size = scan.file_size = os.fstat(fd).st_size
    head = _pread_exact(fd, HRL_HEADER.size, 0)
    if len(head) < HRL_HEADER.size:
        scan.header_error = f"file of {size} bytes is shorter than the header"
        return scan
    magic, version, _flags, id_len, disk_size, block_size, _r = HRL_HEADER.unpack(head)
    if magic != HRL_MAGIC:
        scan.header_error = f"bad magic {magic!r}"
        return scan
    if version != HRL_VERSION:
        scan.header_error = f"unsupported version {version}"
        return scan
    if id_len > MAX_DISK_ID_BYTES or block_size == 0:
        scan.header_error = f"disk id length {id_len} or block size {block_size} out of bounds"
        return scan
    rest = _pread_exact(fd, id_len + HRL_HEADER_CHECKSUM.size, HRL_HEADER.size)
    if len(rest) < id_len + HRL_HEADER_CHECKSUM.size:
        scan.header_error = "truncated header"
        return scan
    (check,) = HRL_HEADER_CHECKSUM.unpack_from(rest, id_len)
    if check != xxhash.xxh3_64_intdigest(head + rest[:id_len]):
        scan.header_error = "bad header checksum"
        return scan
    scan.disk_id = rest[:id_len].decode(errors="replace")
    scan.disk_size, scan.block_size = disk_size, block_size
    vsize, vbs = geometry or (disk_size, block_size)
    pos = scan.end = HRL_HEADER.size + id_len + HRL_HEADER_CHECKSUM.size
    while pos < size:
        if size - pos < RECORD_HEADER.size:
            scan.torn_at = pos
            break
        body_len, rtype, _f, _r = RECORD_HEADER.unpack(_pread_exact(fd, RECORD_HEADER.size, pos))
        # Bound the length before reading anything: a damaged length must not allocate gigabytes.
        if body_len > MAX_RECORD_BODY_BYTES or rtype not in RECORD_TYPES:
            scan.corrupt = f"record header (length {body_len}, type {rtype}) out of bounds at offset {pos}"
            break
        end = pos + RECORD_HEADER.size + body_len + RECORD_CHECKSUM.size
        if end > size:
            scan.torn_at = pos
            break
        raw = _pread_exact(fd, body_len + RECORD_CHECKSUM.size, pos + RECORD_HEADER.size)
        body = raw[:body_len]
        (check,) = RECORD_CHECKSUM.unpack_from(raw, body_len)
        if check != _checksum(pos, RECORD_HEADER.pack(body_len, rtype, _f, _r), body):
            if end == size:
                scan.torn_at = pos
            else:
                scan.corrupt = f"bad checksum at offset {pos}"
            break
        rec = Record(offset=pos, end=end, type=rtype)
        try:
            _parse_body(rec, body, vsize, vbs)
        except _Corrupt as e:
            scan.corrupt = f"invalid {RECORD_TYPES[rtype]} record at offset {pos}: {e}"
            break
        scan.records.append(rec)
        pos = scan.end = end
    return scan


def scan_file(path: str) -> Scan:
    """Read-only pass over a .hrl file (for tools and tests); the file is not changed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _scan_fd(fd)
    finally:
        os.close(fd)


class _Data:
    __slots__ = ("epoch", "offset", "length", "mem", "pos")

    def __init__(self, epoch: int, offset: int, length: int, mem: bytes | None, pos: int | None) -> None:
        self.epoch, self.offset, self.length, self.mem, self.pos = epoch, offset, length, mem, pos


class _Epoch:
    __slots__ = ("ranges", "data")

    def __init__(self) -> None:
        self.ranges: list[Range] = []
        self.data: list[_Data] = []


class Pending:
    """What must be sent: ``ranges`` (merged, a superset of the dirty blocks of ``epochs``),
    ``read_ranges`` (the part of ``ranges`` whose newest content is not in ``data`` and must be
    read from the snapshot or device), ``data`` (a new iterator of (byte offset, bytes) per access,
    oldest epoch first: apply it first, then the reads), ``resync`` (read the whole disk).
    ``epochs`` is the range of epochs covered; acknowledge ``epochs[-1]`` once all is sent.
    """

    def __init__(self, log_: "ChangeLog", tier: Tier, resync: bool, ranges: list[Range], read_ranges: list[Range],
                 items: list[_Data], epochs: range, generation: int) -> None:
        self._log, self._items, self._generation = log_, items, generation
        self.tier, self.resync, self.ranges, self.read_ranges, self.epochs = tier, resync, ranges, read_ranges, epochs

    @property
    def data(self) -> Iterator[tuple[int, bytes]]:
        return self._log._iter_data(self._items, self._generation)

    @property
    def data_bytes(self) -> int:
        return sum(d.length for d in self._items)

    @property
    def empty(self) -> bool:
        return not (self.resync or self.ranges)

    def __repr__(self) -> str:
        return (f"Pending(tier={self.tier.name}, resync={self.resync}, epochs={self.epochs}, ranges={len(self.ranges)}, "
                f"read_ranges={len(self.read_ranges)}, data_items={len(self._items)})")


TierCallback = Callable[[Tier, Tier, str], None]


class ChangeLog:
    def __init__(self, path: str, disk_id: str, disk_size: int, block_size: int, pool_bytes: int, spill_bytes: int,
                 extent_budget: int, bitmap_budget: int, on_tier_change: TierCallback | None) -> None:
        if len(disk_id.encode()) > MAX_DISK_ID_BYTES or not disk_id:
            raise ValueError(f"disk id {disk_id!r} must be 1..{MAX_DISK_ID_BYTES} bytes")
        if block_size <= 0 or block_size % 512 or block_size >= 2**32:
            raise ValueError(f"block size {block_size} must be a positive multiple of 512")
        if disk_size < 0:
            raise ValueError("disk size must not be negative")
        if min(pool_bytes, spill_bytes, extent_budget, bitmap_budget) < 0:
            raise ValueError("budgets must not be negative")
        if bitmap_budget > MAX_BITMAP_BYTES:
            raise ValueError(f"bitmap budget {bitmap_budget} exceeds {MAX_BITMAP_BYTES} bytes")
        self.path, self.disk_id, self.disk_size, self.block_size = path, disk_id, disk_size, block_size
        self.nblocks = _block_count(disk_size, block_size)
        self.pool_bytes, self.spill_bytes = pool_bytes, spill_bytes
        self.extent_budget, self.bitmap_budget = extent_budget, bitmap_budget
        self.on_tier_change = on_tier_change
        self.fresh = False
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._size = 0
        self._closed = False
        self._epochs: dict[int, _Epoch] = {}
        self._base_tier = Tier.DATA
        self._base_reason: str | None = None
        self._bitmap: bytearray | None = None
        self._granularity = 1
        self._bm_lo = self._bm_hi = 0
        self._resync_through: int | None = None
        self._resync_reason: str | None = None
        self._acked: int | None = None
        self._max_epoch = -1
        self._pool_used = 0
        self._spill_used = 0
        self._generation = 0
        self._io_failed = False  # after a failed write the file never gets a CLEAN marker again

    # ------------------------------------------------------------------ public API

    @classmethod
    def open(cls, path: str, disk_id: str, disk_size: int, block_size: int, *, pool_bytes: int, spill_bytes: int,
             extent_budget: int, bitmap_budget: int, on_tier_change: TierCallback | None = None) -> "ChangeLog":
        self = cls(path, disk_id, disk_size, block_size, pool_bytes, spill_bytes, extent_budget, bitmap_budget,
                   on_tier_change)
        with self._lock:
            self._load()
        return self

    @property
    def tier(self) -> Tier:
        return Tier.RESYNC if self._resync_through is not None else self._base_tier

    @property
    def tier_reason(self) -> str | None:
        return self._resync_reason if self._resync_through is not None else self._base_reason

    @property
    def last_epoch(self) -> int:
        """Highest epoch this log has seen (-1 if none): the engine's next epoch is ``last_epoch + 1``."""
        return self._max_epoch

    @property
    def stats(self) -> dict:
        with self._lock:
            return {"tier": self.tier.name, "reason": self.tier_reason, "pool_bytes": self._pool_used,
                    "spill_bytes": self._spill_used, "extents": self._extent_count(), "file_bytes": self._size,
                    "granularity": self._granularity if self._bitmap is not None else None,
                    "epochs": len(self._epochs), "last_epoch": self._max_epoch, "acked_epoch": self._acked}

    def add_extents(self, epoch: int, ranges: list[tuple[int, int]]) -> None:
        """Blocks [first, first + count) of ``epoch`` are dirty. Persisted (fsync) before returning."""
        with self._lock:
            self._check_open()
            ranges = merge_ranges(self._valid_ranges(ranges))
            self._check_epoch(epoch)
            self._note_epoch(epoch)
            if not ranges or self._covered(epoch):
                return
            self._persist_extents(epoch, ranges)
            self._apply_extents(epoch, ranges)
            self._enforce_budgets()
            self._maybe_compact()

    def add_data(self, epoch: int, offset: int, data: bytes) -> None:
        """The bytes of epoch ``epoch`` at byte ``offset`` (block aligned; the end may be the disk end)."""
        with self._lock:
            self._check_open()
            self._check_epoch(epoch)
            length = len(data)
            end = offset + length
            if offset < 0 or length == 0 or offset % self.block_size or end > self.disk_size or (
                    end % self.block_size and end != self.disk_size):
                raise ValueError(f"data ({offset}, {length}) must be non-empty, block aligned and inside the disk")
            self._note_epoch(epoch)
            if self._covered(epoch):
                return
            if self._base_tier == Tier.DATA and self._pool_used + length <= self.pool_bytes:
                self._apply_data(_Data(epoch, offset, length, bytes(data), None))
            elif self._base_tier == Tier.DATA and self._spill_used + length <= self.spill_bytes:
                mv = memoryview(data)
                for i in range(0, length, MAX_DATA_RECORD_BYTES):
                    chunk = mv[i:i + MAX_DATA_RECORD_BYTES]
                    pos = self._append(RECORD_DATA, DATA_BODY.pack(epoch, offset + i) + bytes(chunk), sync=False)
                    if pos is None:
                        return  # an I/O error made the log RESYNC
                    self._apply_data(_Data(epoch, offset + i, len(chunk), None, pos))
            else:
                if self._base_tier == Tier.DATA:
                    self._degrade(Tier.EXTENTS, "spill_full")
                    self._rewrite()
                first = offset // self.block_size
                ranges = [(first, -(-end // self.block_size) - first)]
                self._persist_extents(epoch, ranges)
                self._apply_extents(epoch, ranges)
            self._enforce_budgets()
            self._maybe_compact()

    def require_resync(self, reason: str, through_epoch: int | None = None) -> None:
        """Nothing before the end of ``through_epoch`` (default: the epoch after the highest seen, i.e.
        the one being tracked now) can be trusted: a resync must read a point at least that new."""
        with self._lock:
            self._check_open()
            through = self._max_epoch + 1 if through_epoch is None else through_epoch
            if self._acked is not None:
                through = max(through, self._acked + 1)
            old = self.tier
            self._note_epoch(through)
            self._apply_resync(through, reason)
            self._rewrite()
            self._report(old, reason)

    def pending(self, through_epoch: int | None = None) -> Pending:
        """What must be sent for the epochs up to ``through_epoch`` (default all). A bitmap cannot be
        split by epoch: it is always included whole."""
        with self._lock:
            eps = sorted(e for e in self._epochs if through_epoch is None or e <= through_epoch)
            ranges: list[Range] = []
            need: list[Range] = []
            items: list[_Data] = []
            for e in eps:
                ep = self._epochs[e]
                ranges.extend(ep.ranges)
                covered = merge_ranges(self._data_blocks(d) for d in ep.data)
                need = subtract_ranges(merge_ranges(need + ep.ranges), covered)
                items.extend(ep.data)
            lo_hi = [e for e in eps]
            if self._bitmap is not None:
                bm = self._bitmap_ranges()
                ranges.extend(bm)
                need = merge_ranges(need + bm)
                lo_hi += [self._bm_lo, self._bm_hi]
            resync = self._resync_through is not None
            if resync:
                lo_hi += [self._acked + 1 if self._acked is not None else 0, self._resync_through]
            epochs = range(min(lo_hi), max(lo_hi) + 1) if lo_hi else range(0)
            return Pending(self, self.tier, resync, merge_ranges(ranges), need, items, epochs, self._generation)

    def acknowledge(self, through_epoch: int) -> None:
        """Epochs up to ``through_epoch`` are durably replicated: drop them."""
        with self._lock:
            self._check_open()
            self._check_epoch(through_epoch)
            old = self.tier
            self._note_epoch(through_epoch)
            self._append(RECORD_ACK, ACK_BODY.pack(through_epoch), sync=True)
            reason = self._apply_ack(through_epoch)
            if reason:
                self._report(old, reason)
            self._maybe_compact()

    def compact(self) -> None:
        """Rewrite the file with only its live content (temp file, fsync, rename)."""
        with self._lock:
            self._check_open()
            self._rewrite()

    def close(self, clean: bool = True) -> None:
        """Flush and fsync; with ``clean``, keep the memory pool's data (as spilled data while the
        spill budget allows, else as extents) and write the clean-shutdown marker last."""
        with self._lock:
            if self._closed:
                return
            try:
                if clean and self._fd is not None and not self._io_failed:
                    for e in sorted(self._epochs):
                        for d in self._epochs[e].data:
                            if d.mem is None:
                                continue
                            if self._spill_used + d.length <= self.spill_bytes:
                                for i in range(0, d.length, MAX_DATA_RECORD_BYTES):
                                    body = DATA_BODY.pack(d.epoch, d.offset + i) + d.mem[i:i + MAX_DATA_RECORD_BYTES]
                                    self._append(RECORD_DATA, body, sync=False)
                                self._spill_used += d.length
                            else:
                                self._persist_extents(d.epoch, [self._data_blocks(d)], sync=False)
                    if not self._io_failed:
                        self._append(RECORD_CLEAN, b"", sync=True)
                elif self._fd is not None:
                    os.fsync(self._fd)
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._closed = True
                self._epochs.clear()
                self._bitmap = None
                logger.info("change log closed", DISK=self.disk_id, clean=clean, tier=self.tier.name)

    def __enter__(self) -> "ChangeLog":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(clean=exc_type is None)

    # ------------------------------------------------------------------ state machine (live and replay)

    def _covered(self, epoch: int) -> bool:
        return self._resync_through is not None and epoch <= self._resync_through

    def _note_epoch(self, epoch: int) -> None:
        self._max_epoch = max(self._max_epoch, epoch)

    def _epoch(self, e: int) -> _Epoch:
        ep = self._epochs.get(e)
        if ep is None:
            ep = self._epochs[e] = _Epoch()
        return ep

    def _data_blocks(self, d: _Data) -> Range:
        first = d.offset // self.block_size
        return (first, -(-(d.offset + d.length) // self.block_size) - first)

    def _extent_count(self) -> int:
        return sum(len(ep.ranges) for ep in self._epochs.values())

    def _apply_extents(self, epoch: int, ranges: list[Range]) -> None:
        self._note_epoch(epoch)
        if self._covered(epoch):
            return
        if self._bitmap is not None:
            self._bitmap_set(ranges)
            self._bm_lo, self._bm_hi = min(self._bm_lo, epoch), max(self._bm_hi, epoch)
            return
        ep = self._epoch(epoch)
        ep.ranges = merge_ranges(ep.ranges + ranges)

    def _apply_data(self, d: _Data) -> None:
        self._note_epoch(d.epoch)
        if self._covered(d.epoch):
            return
        if self._base_tier != Tier.DATA:
            self._apply_extents(d.epoch, [self._data_blocks(d)])
            return
        ep = self._epoch(d.epoch)
        ep.data.append(d)
        ep.ranges = merge_ranges(ep.ranges + [self._data_blocks(d)])
        if d.mem is not None:
            self._pool_used += d.length
        else:
            self._spill_used += d.length

    def _drop_data(self) -> None:
        for ep in self._epochs.values():
            ep.data = []
        self._pool_used = self._spill_used = 0

    def _drop_through(self, epoch: int) -> None:
        for e in [e for e in self._epochs if e <= epoch]:
            for d in self._epochs.pop(e).data:
                if d.mem is not None:
                    self._pool_used -= d.length
                else:
                    self._spill_used -= d.length
        if self._bitmap is not None:
            if self._bm_hi <= epoch:
                self._bitmap = None
            else:
                self._bm_lo = max(self._bm_lo, epoch + 1)  # bits stay: over-reporting is safe

    def _nothing_tracked(self) -> bool:
        return not self._epochs and self._bitmap is None

    def _apply_ack(self, epoch: int) -> str | None:
        """Returns the reason if that changed the tier: "caught_up" or "resync_done"."""
        self._generation += 1
        was_resync = self._resync_through is not None
        self._acked = epoch if self._acked is None else max(self._acked, epoch)
        self._drop_through(epoch)
        if self._resync_through is not None and self._resync_through <= epoch:
            self._resync_through = None
            self._resync_reason = None
        if self._resync_through is None and self._nothing_tracked():
            if self._base_tier != Tier.DATA or was_resync or self._base_reason not in (None, "caught_up"):
                self._base_tier, self._base_reason, self._granularity = Tier.DATA, "caught_up", 1
                self._bitmap = None
                return "caught_up"
            return None
        if was_resync and self._resync_through is None:
            self._base_reason = "resync_done"
            return "resync_done"
        return None

    def _apply_resync(self, through: int, reason: str) -> None:
        self._generation += 1
        self._resync_through = through if self._resync_through is None else max(self._resync_through, through)
        self._resync_reason = reason
        self._drop_through(through)
        if self._nothing_tracked():
            self._base_tier, self._base_reason, self._granularity = Tier.DATA, None, 1
            self._pool_used = self._spill_used = 0

    def _apply_tier(self, tier: Tier, reason: str | None) -> None:
        self._generation += 1
        if tier >= Tier.EXTENTS:
            self._drop_data()
        if tier == Tier.BITMAP and self._bitmap is None:
            budget = max(self.bitmap_budget, 1)
            self._new_bitmap(max(1, -(-self.nblocks // (budget * 8))))
        self._base_tier, self._base_reason = tier, reason

    def _new_bitmap(self, granularity: int, lo: int | None = None, hi: int | None = None,
                    bits: bytearray | None = None) -> None:
        """Replace the per-epoch state (and any older bitmap) by one bitmap holding all of it."""
        old = [r for ep in self._epochs.values() for r in ep.ranges]
        epochs = list(self._epochs)
        if self._bitmap is not None:
            old_bits = self._bitmap_ranges()
            if old_bits:  # an empty bitmap (a placeholder) holds no epochs
                old += old_bits
                epochs += [self._bm_lo, self._bm_hi]
        nbits = -(-self.nblocks // granularity)
        self._granularity = granularity
        self._bitmap = bits if bits is not None else bytearray(-(-nbits // 8))
        if lo is not None:
            epochs += [lo, hi]
        self._bm_lo = min(epochs) if epochs else max(self._max_epoch, 0)
        self._bm_hi = max(epochs) if epochs else max(self._max_epoch, 0)
        self._epochs.clear()
        self._pool_used = self._spill_used = 0
        self._bitmap_set(old)

    def _bitmap_set(self, ranges) -> None:
        g = self._granularity
        for first, count in ranges:
            _set_bits(self._bitmap, first // g, (first + count - 1) // g + 1)

    def _bitmap_ranges(self) -> list[Range]:
        g = self._granularity
        out = []
        for a, n in _bit_runs(self._bitmap):
            first = a * g
            out.append((first, min((a + n) * g, self.nblocks) - first))
        return merge_ranges(out)

    def _apply_record(self, rec: Record) -> None:
        t = rec.type
        if t == RECORD_EXTENTS:
            self._apply_extents(rec.epoch, rec.ranges)
        elif t == RECORD_DATA:
            self._apply_data(_Data(rec.epoch, rec.data_offset, rec.data_length, None, rec.offset))
        elif t == RECORD_BITMAP:
            lo, hi, _nbits, gran, bits = rec.bitmap
            self._note_epoch(hi)
            self._drop_data()
            self._new_bitmap(gran, lo, hi, bits)
            self._base_tier = Tier.BITMAP
        elif t == RECORD_ACK:
            self._note_epoch(rec.epoch)
            self._apply_ack(rec.epoch)
        elif t == RECORD_RESYNC:
            self._note_epoch(rec.epoch)
            self._apply_resync(rec.epoch, rec.reason)
        elif t == RECORD_TIER:
            self._apply_tier(Tier(rec.tier), rec.reason)

    # ------------------------------------------------------------------ budgets and tiers

    def _degrade(self, tier: Tier, reason: str) -> None:
        old = self.tier
        if tier == Tier.RESYNC:
            self._apply_resync(self._max_epoch, reason)
        else:
            self._apply_tier(tier, reason)
        self._report(old, reason)

    def _enforce_budgets(self) -> None:
        changed = False
        while True:
            if self._base_tier == Tier.DATA and self._spill_used > self.spill_bytes:
                self._degrade(Tier.EXTENTS, "spill_full")
            elif self._base_tier in (Tier.DATA, Tier.EXTENTS) and self._extent_count() > self.extent_budget:
                if self._base_tier == Tier.DATA:
                    self._degrade(Tier.EXTENTS, "extent_budget")
                elif self.bitmap_budget < 1:
                    self._degrade(Tier.RESYNC, "bitmap_budget")
                else:
                    self._degrade(Tier.BITMAP, "extent_budget")
            else:
                break
            changed = True
        if changed:
            self._rewrite()

    def _report(self, old: Tier, reason: str) -> None:
        new = self.tier
        if new == old:
            if reason != self.tier_reason:
                logger.info("change log tracking changed under the current tier", DISK=self.disk_id,
                            tier=new.name, base_tier=self._base_tier.name, reason=reason)
            return
        level = logger.info if new < old else logger.warning
        level("change log tier changed", DISK=self.disk_id, old=old.name, new=new.name, reason=reason,
              granularity=self._granularity if new == Tier.BITMAP else None)
        if self.on_tier_change is not None:
            try:
                self.on_tier_change(old, new, reason)
            except Exception:  # a metrics callback must not break the log
                logger.exception("change log tier callback failed", DISK=self.disk_id)

    # ------------------------------------------------------------------ file

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"change log {self.path} is closed")

    @staticmethod
    def _check_epoch(epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0 or epoch >= 2**63:
            raise ValueError(f"epoch {epoch!r} must be a non-negative integer")

    def _valid_ranges(self, ranges) -> list[Range]:
        out = []
        for first, count in ranges:
            if first < 0 or count < 0 or first + count > self.nblocks:
                raise ValueError(f"extent ({first}, {count}) outside the disk's {self.nblocks} blocks")
            if count:
                out.append((int(first), int(count)))
        return out

    def _write_all(self, fd: int, data: bytes, pos: int) -> None:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(fd, mv, pos)
            mv, pos = mv[n:], pos + n

    def _append(self, rtype: int, body: bytes, sync: bool) -> int | None:
        """Append one record; returns its offset, or None if an I/O error made the log RESYNC."""
        pos = self._size
        try:
            self._write_all(self._fd, encode_record(pos, rtype, body), pos)
            self._size = pos + RECORD_HEADER.size + len(body) + RECORD_CHECKSUM.size
            if sync:
                os.fsync(self._fd)
            return pos
        except OSError as e:
            self._io_failure(e)
            return None

    def _io_failure(self, e: OSError) -> None:
        # The in-memory state stays right for this run; the file cannot be trusted any more, and a
        # restart without the CLEAN marker resyncs anyway. Keep this run safe too: resync now.
        logger.error("change log write failed", DISK=self.disk_id, path=self.path, error=str(e))
        self._io_failed = True
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            pass
        if self.tier != Tier.RESYNC:
            old = self.tier
            self._apply_resync(self._max_epoch + 1, f"io_error: {e.strerror or e}")
            self._note_epoch(self._resync_through)
            self._report(old, self._resync_reason)

    def _persist_extents(self, epoch: int, ranges: list[Range], sync: bool = True) -> None:
        for i in range(0, len(ranges), MAX_EXTENTS_PER_RECORD):
            chunk = ranges[i:i + MAX_EXTENTS_PER_RECORD]
            body = EXTENTS_BODY.pack(epoch, len(chunk)) + b"".join(EXTENT_ENTRY.pack(f, c) for f, c in chunk)
            if self._append(RECORD_EXTENTS, body, sync=False) is None:
                return
        if sync:
            try:
                os.fsync(self._fd)
            except OSError as e:
                self._io_failure(e)

    def _read_spilled(self, d: _Data) -> bytes:
        pos = d.pos
        raw = _pread_exact(self._fd, RECORD_HEADER.size + DATA_BODY.size + d.length + RECORD_CHECKSUM.size, pos)
        try:
            body_len, rtype, f, r = RECORD_HEADER.unpack_from(raw)
            ok = rtype == RECORD_DATA and body_len == DATA_BODY.size + d.length and len(raw) == (
                RECORD_HEADER.size + body_len + RECORD_CHECKSUM.size)
            if ok:
                body = raw[RECORD_HEADER.size:RECORD_HEADER.size + body_len]
                (check,) = RECORD_CHECKSUM.unpack_from(raw, RECORD_HEADER.size + body_len)
                ok = check == _checksum(pos, raw[:RECORD_HEADER.size], body) and \
                    DATA_BODY.unpack_from(body) == (d.epoch, d.offset)
        except struct.error:
            ok = False
        if not ok:
            raise FormatError(f"change log '{self.path}'", f"spilled data record at offset {pos} is damaged")
        return body[DATA_BODY.size:]

    def _iter_data(self, items: list[_Data], generation: int) -> Iterator[tuple[int, bytes]]:
        for d in items:
            with self._lock:
                if self._generation != generation or self._closed:
                    raise ChangeLogChanged("acknowledged, degraded or closed")
                chunk = d.mem if d.mem is not None else self._read_spilled(d)
            yield d.offset, chunk

    def _fsync_dir(self) -> None:
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _live_bytes(self) -> int:
        rec = RECORD_HEADER.size + RECORD_CHECKSUM.size
        n = len(encode_header(self.disk_id, self.disk_size, self.block_size)) + 3 * (rec + 8 + MAX_REASON_BYTES)
        if self._bitmap is not None:
            n += rec + BITMAP_BODY.size + len(self._bitmap)
        for ep in self._epochs.values():
            n += (len(ep.ranges) // MAX_EXTENTS_PER_RECORD + 1) * (rec + EXTENTS_BODY.size)
            n += len(ep.ranges) * EXTENT_ENTRY.size
            n += sum(rec + DATA_BODY.size + d.length for d in ep.data if d.pos is not None)
        return n

    def _maybe_compact(self) -> None:
        if self._fd is not None and self._size > COMPACT_MIN_BYTES and self._size > 2 * self._live_bytes():
            self._rewrite()

    def _rewrite(self, extra: list[tuple[int, bytes]] = ()) -> None:
        """Write the live state to a temp file, fsync, rename over the log, fsync the directory."""
        tmp = self.path + ".tmp"
        moved: list[tuple[_Data, int]] = []
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                pos = 0

                def put(rtype: int, body: bytes) -> int:
                    nonlocal pos
                    start = pos
                    if rtype < 0:  # raw bytes (the header)
                        self._write_all(fd, body, pos)
                        pos += len(body)
                        return start
                    data = encode_record(pos, rtype, body)
                    self._write_all(fd, data, pos)
                    pos += len(data)
                    return start

                put(-1, encode_header(self.disk_id, self.disk_size, self.block_size))
                if self._acked is not None:
                    put(RECORD_ACK, ACK_BODY.pack(self._acked))
                if self._resync_through is not None:
                    put(RECORD_RESYNC, RESYNC_BODY.pack(self._resync_through) + _reason_bytes(self._resync_reason))
                if self._base_tier != Tier.DATA or self._base_reason:
                    put(RECORD_TIER, TIER_BODY.pack(self._base_tier) + _reason_bytes(self._base_reason or ""))
                if self._bitmap is not None:
                    nbits = -(-self.nblocks // self._granularity)
                    put(RECORD_BITMAP, BITMAP_BODY.pack(self._bm_lo, self._bm_hi, nbits, self._granularity)
                        + bytes(self._bitmap))
                for e in sorted(self._epochs):
                    ep = self._epochs[e]
                    for i in range(0, len(ep.ranges), MAX_EXTENTS_PER_RECORD):
                        chunk = ep.ranges[i:i + MAX_EXTENTS_PER_RECORD]
                        put(RECORD_EXTENTS, EXTENTS_BODY.pack(e, len(chunk))
                            + b"".join(EXTENT_ENTRY.pack(f, c) for f, c in chunk))
                    for d in list(ep.data):
                        if d.pos is None:
                            continue
                        try:
                            chunk = self._read_spilled(d)
                        except FormatError as err:
                            # Its blocks stay in ep.ranges: the engine re-reads them instead.
                            logger.warning("change log: dropping damaged spilled data", DISK=self.disk_id,
                                           error=str(err))
                            ep.data.remove(d)
                            self._spill_used -= d.length
                            self._generation += 1
                            continue
                        moved.append((d, put(RECORD_DATA, DATA_BODY.pack(d.epoch, d.offset) + chunk)))
                for rtype, body in extra:
                    put(rtype, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            self._fsync_dir()
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if self._fd is not None:
                self._io_failure(e)
            else:
                raise
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._size = pos
        for d, new_pos in moved:
            d.pos = new_pos
        logger.debug("change log rewritten", DISK=self.disk_id, bytes=pos)

    # ------------------------------------------------------------------ open

    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self.fresh = True
            self._rewrite()
            self._append(RECORD_OPEN, OPEN_BODY.pack(time.time_ns()), sync=True)
            logger.info("change log created", DISK=self.disk_id, path=self.path)
            return
        try:
            scan = _scan_fd(fd, (self.disk_size, self.block_size))
        except BaseException:
            os.close(fd)
            raise
        if scan.header_error:
            os.close(fd)
            return self._replace(f"corrupt_header: {scan.header_error}", keep_as=".corrupt")
        if (scan.disk_id, scan.disk_size, scan.block_size) != (self.disk_id, self.disk_size, self.block_size):
            logger.warning("change log belongs to another disk geometry", DISK=self.disk_id,
                           file_disk=scan.disk_id, file_size=scan.disk_size, file_block_size=scan.block_size,
                           disk_size=self.disk_size, block_size=self.block_size)
            old = _scan_fd(fd)  # the old epochs, read with the file's own geometry
            os.close(fd)
            for rec in old.records:
                if rec.epoch is not None:
                    self._note_epoch(rec.epoch)
                if rec.bitmap is not None:
                    self._note_epoch(rec.bitmap[1])
            return self._replace("geometry_changed")
        self._fd, self._size = fd, scan.file_size
        for rec in scan.records:
            self._apply_record(rec)
        replayed = self.tier
        if scan.corrupt:
            logger.error("change log damaged: resync required", DISK=self.disk_id, path=self.path,
                         problem=scan.corrupt)
            os.close(self._fd)
            self._fd = None
            return self._replace(f"corrupt_record: {scan.corrupt}", keep_as=".corrupt", old=replayed)
        if scan.torn_at is not None:
            logger.warning("change log: discarding a torn last record", DISK=self.disk_id, path=self.path,
                           offset=scan.torn_at, discarded_bytes=scan.file_size - scan.torn_at)
            os.ftruncate(self._fd, scan.torn_at)
            self._size = scan.torn_at
        clean = bool(scan.records) and scan.records[-1].type == RECORD_CLEAN and scan.torn_at is None
        if not clean:
            through = self._max_epoch + 1
            self._note_epoch(through)
            self._append(RECORD_RESYNC, RESYNC_BODY.pack(through) + _reason_bytes("unclean_stop"), sync=False)
            self._apply_resync(through, "unclean_stop")
        self._append(RECORD_OPEN, OPEN_BODY.pack(time.time_ns()), sync=True)
        self._report(replayed, self.tier_reason or "")
        self._enforce_budgets()
        self._maybe_compact()
        logger.info("change log opened", DISK=self.disk_id, path=self.path, tier=self.tier.name,
                    reason=self.tier_reason, last_epoch=self._max_epoch, clean=clean)

    def _replace(self, reason: str, keep_as: str | None = None, old: Tier = Tier.DATA) -> None:
        """Start a new file that says RESYNC(reason); keep a damaged one aside for inspection."""
        if keep_as:
            os.replace(self.path, self.path + keep_as)
            logger.warning("change log kept aside", DISK=self.disk_id, path=self.path + keep_as)
        self._epochs.clear()
        self._bitmap = None
        self._base_tier, self._base_reason = Tier.DATA, None
        through = self._max_epoch + 1
        self._note_epoch(through)
        self._apply_resync(through, reason)
        self._rewrite(extra=[(RECORD_OPEN, OPEN_BODY.pack(time.time_ns()))])
        self._report(old, reason)
