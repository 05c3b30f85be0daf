"""Agent → process-server batch format: a header, then checksummed write/zero/bookmark frames.

Specified in FORMATS.md ("Batch"). The parser is incremental so that the process server can
verify a body while streaming it to its cache without holding it in memory.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Iterator

import xxhash

from . import compression
from .errors import FrameError

BATCH_MAGIC = b"LBWB"
BATCH_VERSION = 2            # written by a compressing agent; version 1 is still read (and written uncompressed)
BATCH_VERSIONS = (1, 2)
# Batch header flag (version 2): the agent compressed every write frame zstd made smaller, so a
# raw write frame is incompressible and the process server does not try again.
BATCH_FLAG_AGENT_COMPRESSED = 1
# magic, version, flags, disk_id_len, seq, disk_size, frame_count, reserved
BATCH_HEADER = struct.Struct("<4sBBHQQII")
BATCH_HEADER_CHECKSUM = struct.Struct("<Q")
# type, flags, reserved, payload_len, offset, length
FRAME_HEADER = struct.Struct("<BBHIQQ")
FRAME_CHECKSUM = struct.Struct("<Q")
# Frame flag (version 2, write frames only): the payload is ZSTD_PLAIN_HASH (xxh3_64 of the
# extent's plaintext) followed by one zstd frame of `length` plaintext bytes.
FRAME_FLAG_ZSTD = 1
ZSTD_PLAIN_HASH = struct.Struct("<Q")

FRAME_WRITE = 1
FRAME_ZERO = 2
FRAME_BOOKMARK = 3
FRAME_TYPES = {FRAME_WRITE: "write", FRAME_ZERO: "zero", FRAME_BOOKMARK: "bookmark"}

SECTOR_BYTES = 512
MAX_DISK_ID_BYTES = 64
MAX_FRAME_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_BOOKMARK_BYTES = 64 * 1024
MAX_FRAMES_PER_BATCH = 65536
# A kept payload piece shorter than this is copied (coalesced) rather than kept as a view.
KEEP_VIEW_MIN_BYTES = 4096

DISK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
POINT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Bookmark JSON fields and their types; all are required (see FORMATS.md, "Bookmark").
BOOKMARK_FIELDS = {"point_id": str, "machine": str, "created": (int, float), "consistency": str,
                   "cycle": int, "block_size": int, "image_digest": str}


def validate_disk_id(disk_id: str) -> str:
    if not DISK_ID_RE.fullmatch(disk_id):  # fullmatch: '$' alone accepts a trailing newline
        raise FrameError(
            "header", f"disk id {disk_id!r} must match {DISK_ID_RE.pattern} (lower-case letters, digits, '.', '_', '-')"
        )
    return disk_id


def validate_bookmark(point: object) -> dict:
    if not isinstance(point, dict):
        raise ValueError("not a JSON object")
    for name, typ in BOOKMARK_FIELDS.items():
        if not isinstance(point.get(name), typ) or isinstance(point.get(name), bool):
            raise ValueError(f"field {name!r} is missing or not {getattr(typ, '__name__', 'a number')}")
    if not POINT_ID_RE.fullmatch(point["point_id"]):
        raise ValueError(f"point_id {point['point_id']!r} must match {POINT_ID_RE.pattern}")
    if point["consistency"] not in ("app", "crash", "none"):
        raise ValueError(f"consistency {point['consistency']!r} is not app, crash or none")
    # Optional: the consistency group this point belongs to (see FORMATS.md, group protocol).
    if not isinstance(point.get("group", ""), str) or not isinstance(point.get("group_tag", ""), str):
        raise ValueError("fields 'group' and 'group_tag' must be strings")
    members = point.get("group_members", [])
    if not isinstance(members, list) or len(members) > 16 or not all(isinstance(m, str) for m in members):
        raise ValueError("field 'group_members' must be a list of at most 16 machine names")
    return point


def frame_checksum(header: bytes, payload: bytes | memoryview, index: int) -> int:
    # Seeding with the frame index makes a frame moved to another position fail its check.
    h = xxhash.xxh3_64(seed=index)
    h.update(header)
    h.update(payload)
    return h.intdigest()


@dataclass(frozen=True)
class BatchHeader:
    disk_id: str
    seq: int
    disk_size: int
    frame_count: int
    version: int = 1
    flags: int = 0

    def encode(self) -> bytes:
        did = self.disk_id.encode()
        head = BATCH_HEADER.pack(BATCH_MAGIC, self.version, self.flags, len(did), self.seq, self.disk_size,
                                 self.frame_count, 0)
        body = head + did
        return body + BATCH_HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


@dataclass(frozen=True)
class Frame:
    kind: int
    offset: int
    length: int
    payload: bytes | memoryview = b""   # a compressed write frame: the zstd frame (without the hash)
    compressed: bool = False            # FRAME_FLAG_ZSTD: payload decompresses to `length` bytes
    plain_hash: int | None = None       # compressed: the agent's xxh3_64 of the plaintext

    def bookmark(self) -> dict:
        return json.loads(bytes(self.payload))


def encode_frame(index: int, kind: int, offset: int, length: int, payload: bytes | memoryview = b"") -> list:
    """Return the frame as buffers (header, payload, checksum) to avoid copying the payload."""
    header = FRAME_HEADER.pack(kind, 0, 0, len(payload), offset, length)
    return [header, payload, FRAME_CHECKSUM.pack(frame_checksum(header, payload, index))]


def frame_plaintext(frame: Frame, index: int) -> bytes | memoryview:
    """A write frame's bytes as they go on the disk: a compressed frame is decompressed and checked."""
    if not frame.compressed:
        return frame.payload
    try:
        plain = compression.decompress(frame.payload, frame.length)
    except Exception as exc:  # zstd's own error types; a wrong length is a ValueError
        raise FrameError(index, f"compressed write frame does not decompress: {exc}") from None
    if xxhash.xxh3_64_intdigest(plain) != frame.plain_hash:
        raise FrameError(index, "compressed write frame does not match its plaintext hash")
    return plain


class BatchBuilder:
    """Collects frames for one batch; `parts()` gives the body as a list of buffers.

    With compress=True (the agent) the batch is version 2 and compress_frames() replaces write
    frames by zstd-compressed ones where that makes them smaller: TLS, the process server's
    cache and its CPU then carry the compressed bytes (shared/PERF-LIMITS.md: TLS is the largest
    cost on the data path). compress_frames() on disjoint ranges may run in parallel threads
    (zstandard releases the GIL). Without compress the batch is version 1, byte for byte what
    older agents sent. `payload_bytes` counts the payloads as written (before compression).
    """

    def __init__(self, disk_id: str, seq: int, disk_size: int, compress: bool = False) -> None:
        self.disk_id = validate_disk_id(disk_id)
        self.compress = compress
        self.seq = seq
        self.disk_size = disk_size
        self._frames: list[list] = []   # per frame: [header, payload pieces..., checksum]
        self.frame_count = 0
        self.payload_bytes = 0

    @property
    def body_bytes(self) -> int:
        return sum(len(p) for frame in self._frames for p in frame)

    def _add(self, kind: int, offset: int, length: int, payload: bytes | memoryview = b"") -> None:
        self._frames.append(encode_frame(self.frame_count, kind, offset, length, payload))
        self.frame_count += 1
        self.payload_bytes += len(payload)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._add(FRAME_WRITE, offset, len(data), data)

    def zero(self, offset: int, length: int) -> None:
        self._add(FRAME_ZERO, offset, length)

    def bookmark(self, point: dict) -> None:
        validate_bookmark(point)
        payload = json.dumps(point, sort_keys=True, separators=(",", ":")).encode()
        if len(payload) > MAX_BOOKMARK_BYTES:
            raise FrameError(self.frame_count, f"bookmark of {len(payload)} bytes exceeds {MAX_BOOKMARK_BYTES}")
        self._add(FRAME_BOOKMARK, 0, 0, payload)

    def compress_frames(self, start: int = 0, stop: int | None = None) -> None:
        """zstd each raw write frame in [start, stop) that it makes smaller (compress=True only)."""
        if not self.compress:
            return
        for i in range(start, self.frame_count if stop is None else min(stop, self.frame_count)):
            frame = self._frames[i]
            kind, flags, _res, _plen, offset, length = FRAME_HEADER.unpack(frame[0])
            if kind != FRAME_WRITE or flags:
                continue
            data = frame[1]
            packed = compression.compress(data)
            if len(packed) + ZSTD_PLAIN_HASH.size >= len(data):
                continue  # incompressible: stays raw, and the process server will not try again
            plain_hash = ZSTD_PLAIN_HASH.pack(xxhash.xxh3_64_intdigest(data))
            header = FRAME_HEADER.pack(FRAME_WRITE, FRAME_FLAG_ZSTD, 0, len(plain_hash) + len(packed), offset, length)
            h = xxhash.xxh3_64(seed=i)
            for piece in (header, plain_hash, packed):
                h.update(piece)
            self._frames[i] = [header, plain_hash, packed, FRAME_CHECKSUM.pack(h.intdigest())]

    def parts(self) -> list:
        version, flags = (2, BATCH_FLAG_AGENT_COMPRESSED) if self.compress else (1, 0)
        header = BatchHeader(self.disk_id, self.seq, self.disk_size, self.frame_count, version, flags).encode()
        return [header, *(p for frame in self._frames for p in frame)]

    def to_bytes(self) -> bytes:
        return b"".join(bytes(p) if isinstance(p, memoryview) else p for p in self.parts())


class BatchParser:
    """Incremental, bounded parser: feed() chunks, get verified frames back, then finish().

    Validation order per record (STYLE.md 3): size → magic → version → declared lengths within
    bounds → checksum. Only headers and checksums are buffered: a payload is hashed as it streams
    through, and kept (as views of the caller's bytes where it lies within one chunk, else joined
    once) only when `keep_payloads` is true. The process server's ingest verifies with
    keep_payloads=False, so a write frame's payload is never copied there.
    """

    def __init__(self, expected_disk_id: str | None = None, expected_seq: int | None = None,
                 max_payload: int = MAX_FRAME_PAYLOAD_BYTES, keep_payloads: bool = True,
                 check_compressed: bool = True) -> None:
        self.expected_disk_id = expected_disk_id
        self.expected_seq = expected_seq
        self.max_payload = max_payload
        self.keep_payloads = keep_payloads
        # Decompress agent-compressed frames and compare with the agent's plaintext hash: the
        # ingest does, so a bad frame is refused before it is acknowledged; the uploader,
        # re-reading what the ingest checked (frame checksums still verified), does not.
        self.check_compressed = check_compressed
        self.header: BatchHeader | None = None
        self._buf = bytearray()      # the batch header, a frame header or a checksum being assembled
        self._frame: tuple | None = None   # (kind, offset, length, header bytes) whose payload is streaming
        self._need = 0               # payload bytes of _frame still to come
        self._hash = None
        self._pieces: list = []
        self._index = 0
        self.bytes_seen = 0

    def _fill(self, view: memoryview, pos: int, want: int) -> int:
        """Move bytes from view[pos:] into _buf until it holds `want`; returns the new position."""
        take = min(want - len(self._buf), len(view) - pos)
        if take > 0:
            self._buf += view[pos: pos + take]
            pos += take
        return pos

    def feed(self, chunk: bytes | memoryview) -> list[Frame]:
        if not (isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly)):
            chunk = bytes(chunk)  # kept payload views must not change under us
        view = memoryview(chunk)
        self.bytes_seen += len(view)
        frames: list[Frame] = []
        pos, end = 0, len(view)
        while True:
            if self.header is None:
                pos = self._parse_header(view, pos)
                if self.header is None:
                    return frames
                continue
            if self._index >= self.header.frame_count:
                if pos < end:
                    raise FrameError(self._index, f"{end - pos} trailing bytes after the last declared frame")
                return frames
            if self._frame is None:
                pos = self._fill(view, pos, FRAME_HEADER.size)
                if len(self._buf) < FRAME_HEADER.size:
                    return frames
                self._start_frame()
            if self._need:
                take = min(self._need, end - pos)
                if take == 0:
                    return frames
                piece = view[pos: pos + take]
                self._hash.update(piece)
                if self.keep_payloads or self._frame[0] == FRAME_BOOKMARK or (self._frame[3] and self.check_compressed):
                    self._keep(piece)
                self._need -= take
                pos += take
                if self._need:
                    return frames
            pos = self._fill(view, pos, FRAME_CHECKSUM.size)
            if len(self._buf) < FRAME_CHECKSUM.size:
                return frames
            frames.append(self._end_frame())

    def _keep(self, piece: memoryview) -> None:
        # A large piece is kept as a view (no copy); small ones are copied together, because one view
        # object per byte of a slowly dripped body would cost ~200 times the payload in memory.
        if len(piece) >= KEEP_VIEW_MIN_BYTES:
            self._pieces.append(piece)
        elif self._pieces and isinstance(self._pieces[-1], bytearray):
            self._pieces[-1] += piece
        else:
            self._pieces.append(bytearray(piece))

    def _parse_header(self, view: memoryview, pos: int) -> int:
        fixed = BATCH_HEADER.size
        pos = self._fill(view, pos, fixed)
        if len(self._buf) < fixed:
            return pos
        magic, version, flags, id_len, seq, disk_size, frame_count, _res = BATCH_HEADER.unpack_from(self._buf)
        if magic != BATCH_MAGIC:
            raise FrameError("header", f"magic {magic!r} is not {BATCH_MAGIC!r}: not a Lifeboat batch")
        if version not in BATCH_VERSIONS:
            raise FrameError("header", f"batch version {version} is not supported (this server reads versions "
                             f"{', '.join(map(str, BATCH_VERSIONS))}): upgrade the process server")
        if version == 1:
            flags = 0  # version 1 defined no flags; its readers ignored the byte
        elif flags & ~BATCH_FLAG_AGENT_COMPRESSED:
            raise FrameError("header", f"unknown batch flags {flags:#x}")
        if not 0 < id_len <= MAX_DISK_ID_BYTES:
            raise FrameError("header", f"disk id length {id_len} outside 1..{MAX_DISK_ID_BYTES}")
        if frame_count > MAX_FRAMES_PER_BATCH:
            raise FrameError("header", f"frame count {frame_count} exceeds {MAX_FRAMES_PER_BATCH}")
        if disk_size % SECTOR_BYTES:
            raise FrameError("header", f"disk size {disk_size} is not a multiple of {SECTOR_BYTES}")
        total = fixed + id_len + BATCH_HEADER_CHECKSUM.size
        pos = self._fill(view, pos, total)
        if len(self._buf) < total:
            return pos
        (checksum,) = BATCH_HEADER_CHECKSUM.unpack_from(self._buf, fixed + id_len)
        if checksum != xxhash.xxh3_64_intdigest(bytes(self._buf[: fixed + id_len])):
            raise FrameError("header", "header checksum mismatch")
        try:
            disk_id = validate_disk_id(bytes(self._buf[fixed: fixed + id_len]).decode())
        except UnicodeDecodeError:
            raise FrameError("header", "disk id is not UTF-8") from None
        if self.expected_disk_id is not None and disk_id != self.expected_disk_id:
            raise FrameError("header", f"batch is for disk {disk_id!r}, URL says {self.expected_disk_id!r}")
        if self.expected_seq is not None and seq != self.expected_seq:
            raise FrameError("header", f"batch has sequence {seq}, URL says {self.expected_seq}")
        self.header = BatchHeader(disk_id, seq, disk_size, frame_count, version, flags)
        self._buf.clear()
        return pos

    def _start_frame(self) -> None:
        """Validate a complete frame header (before any of its payload is accepted)."""
        kind, flags, _res, payload_len, offset, length = FRAME_HEADER.unpack_from(self._buf)
        idx = self._index
        assert self.header is not None
        if kind not in FRAME_TYPES:
            raise FrameError(idx, f"unknown frame type {kind}")
        if self.header.version == 1:
            flags = 0  # ignored in version 1, as its readers did
        elif flags not in (0, FRAME_FLAG_ZSTD) or (flags and kind != FRAME_WRITE):
            raise FrameError(idx, f"frame flags {flags:#x} are not valid on a {FRAME_TYPES[kind]} frame")
        compressed = bool(flags & FRAME_FLAG_ZSTD)
        limit = MAX_BOOKMARK_BYTES if kind == FRAME_BOOKMARK else self.max_payload
        if payload_len > limit:
            raise FrameError(idx, f"payload of {payload_len} bytes exceeds the limit of {limit}")
        if compressed:
            if payload_len <= ZSTD_PLAIN_HASH.size:
                raise FrameError(idx, f"compressed write frame of {payload_len} bytes is too short for its hash and data")
            if length > self.max_payload:  # the plaintext a reader will allocate is bounded as well
                raise FrameError(idx, f"compressed write frame of {length} plain bytes exceeds the limit of {self.max_payload}")
        elif kind == FRAME_WRITE and payload_len != length:
            raise FrameError(idx, f"write frame length {length} differs from its payload length {payload_len}")
        if kind == FRAME_ZERO and payload_len:
            raise FrameError(idx, "zero frame carries a payload")
        if kind in (FRAME_WRITE, FRAME_ZERO):
            if offset % SECTOR_BYTES or length % SECTOR_BYTES or length == 0:
                raise FrameError(idx, f"extent {offset}+{length} is not a non-empty multiple of {SECTOR_BYTES}-byte sectors")
            if offset + length > self.header.disk_size:
                raise FrameError(idx, f"extent {offset}+{length} ends past the disk size {self.header.disk_size}")
        header = bytes(self._buf)
        self._buf.clear()
        self._frame = (kind, offset, length, compressed)
        self._need = payload_len
        self._hash = xxhash.xxh3_64(seed=idx)  # seeded by the index, as frame_checksum()
        self._hash.update(header)
        self._pieces = []

    def _end_frame(self) -> Frame:
        idx = self._index
        kind, offset, length, compressed = self._frame
        (checksum,) = FRAME_CHECKSUM.unpack_from(self._buf)
        self._buf.clear()
        if checksum != self._hash.intdigest():
            raise FrameError(idx, "checksum mismatch (data corrupted in transit or on disk)")
        pieces = self._pieces
        payload = pieces[0] if len(pieces) == 1 and isinstance(pieces[0], memoryview) else b"".join(pieces)
        if kind == FRAME_BOOKMARK:
            payload = bytes(payload)
            try:
                point = validate_bookmark(json.loads(payload))
            except (ValueError, RecursionError) as exc:  # deeply nested JSON exhausts the parser's stack
                raise FrameError(idx, f"bookmark payload is not valid point JSON: {exc}") from None
            # A disk id is <machine>.<disk>: a point for another machine in this disk's stream would put
            # this disk into that machine's failover (one agent must not speak for another).
            owner = self.header.disk_id.split(".", 1)[0]
            if point["machine"] != owner:
                raise FrameError(idx, f"bookmark names machine {point['machine']!r}, but disk "
                                 f"{self.header.disk_id!r} belongs to machine {owner!r}")
        plain_hash = None
        if compressed and payload:
            (plain_hash,) = ZSTD_PLAIN_HASH.unpack_from(payload)
            payload = memoryview(payload)[ZSTD_PLAIN_HASH.size:]
            if self.check_compressed:
                try:
                    plain = compression.decompress(payload, length)
                except Exception as exc:  # zstd's own error types; a wrong length is a ValueError
                    raise FrameError(idx, f"compressed write frame does not decompress: {exc}") from None
                if xxhash.xxh3_64_intdigest(plain) != plain_hash:
                    raise FrameError(idx, "compressed write frame does not match its plaintext hash")
                del plain
            if not self.keep_payloads:
                payload = b""
        self._frame, self._hash, self._pieces = None, None, []
        self._index += 1
        return Frame(kind, offset, length, payload, compressed, plain_hash)

    def finish(self) -> BatchHeader:
        if self.header is None:
            raise FrameError("header", f"batch truncated: {self.bytes_seen} bytes, header incomplete")
        if self._index != self.header.frame_count or self._buf or self._frame is not None:
            raise FrameError(
                self._index, f"batch truncated: {self._index} of {self.header.frame_count} frames complete"
            )
        return self.header


def parse_batch(data: bytes | memoryview, **kw) -> tuple[BatchHeader, list[Frame]]:
    parser = BatchParser(**kw)
    frames = parser.feed(data)
    return parser.finish(), frames


def iter_batch(data: bytes | memoryview, **kw) -> Iterator[Frame]:
    yield from parse_batch(data, **kw)[1]
