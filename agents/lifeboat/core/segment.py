"""Repository log segment: authenticated header, sealed zstd records, sealed index footer.

Specified in FORMATS.md ("Segment"). One agent batch becomes one segment with the same
sequence number, so re-uploading a batch after a crash rewrites the same object name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from . import compression, crypto
from .errors import IntegrityError
from .wire import FRAME_BOOKMARK, FRAME_TYPES, FRAME_WRITE, FRAME_ZERO, MAX_DISK_ID_BYTES, MAX_FRAME_PAYLOAD_BYTES, Frame

SEGMENT_MAGIC = b"LBSG"
SEGMENT_VERSION = 1
# magic, version, cipher, compression, flags, seq, disk_size, frame_count, disk_id_len, reserved
SEGMENT_HEADER = struct.Struct("<4sBBBBQQIHH")
# kind, compression, reserved, plain_len, disk_offset, length, record_offset, record_len, plain_xxh3_64
INDEX_ENTRY = struct.Struct("<BBHIQQQIQ")
# index_offset, index_len, magic
SEGMENT_TRAILER = struct.Struct("<QI4s")
TRAILER_MAGIC = b"LBSX"
RECORD_AAD = struct.Struct("<I")
INDEX_AAD_SUFFIX = b"index"
MAX_SEGMENT_FRAMES = 65536


@dataclass(frozen=True)
class SegmentHeader:
    disk_id: str
    seq: int
    disk_size: int
    frame_count: int

    def encode(self) -> bytes:
        did = self.disk_id.encode()
        return SEGMENT_HEADER.pack(
            SEGMENT_MAGIC, SEGMENT_VERSION, crypto.CIPHER_AEGIS256, compression.COMPRESSION_ZSTD, 0,
            self.seq, self.disk_size, self.frame_count, len(did), 0,
        ) + did


@dataclass(frozen=True)
class IndexEntry:
    kind: int
    compression: int
    plain_len: int
    disk_offset: int
    length: int
    record_offset: int
    record_len: int
    plain_hash: int


def encode_record(key: bytes, header_bytes: bytes, index: int, frame: Frame,
                  try_compress: bool = True) -> tuple[tuple, bytes | bytearray]:
    """Compress and seal one frame (thread-safe; run in an executor). Returns (entry fields, record).

    A frame the agent compressed (checked at ingest: it decompresses to the plaintext the agent
    hashed) is sealed as it came. try_compress=False: the agent already found raw write frames
    incompressible, so zstd is not run on them again."""
    if frame.kind == FRAME_ZERO:
        return (frame.kind, compression.COMPRESSION_NONE, 0, frame.offset, frame.length, 0), b""
    aad = header_bytes + RECORD_AAD.pack(index)
    if frame.compressed:
        fields = (frame.kind, compression.COMPRESSION_ZSTD, frame.length, frame.offset, frame.length, frame.plain_hash)
        return fields, crypto.seal_buffer(key, frame.payload, aad)
    plain = frame.payload
    comp = compression.COMPRESSION_NONE
    body = plain
    if frame.kind == FRAME_WRITE and try_compress:
        packed = compression.compress(plain)
        if len(packed) < len(plain):  # incompressible (random, already compressed) data stays raw
            comp, body = compression.COMPRESSION_ZSTD, packed
    record = crypto.seal_buffer(key, body, aad)
    fields = (frame.kind, comp, len(plain), frame.offset, frame.length, xxhash.xxh3_64_intdigest(plain))
    return fields, record


def assemble_segment(key: bytes, header: SegmentHeader, encoded: list[tuple[tuple, bytes]]) -> list[bytes]:
    """Lay out header, records, sealed index and trailer; returns the parts in write order."""
    header_bytes = header.encode()
    parts = [header_bytes]
    pos = len(header_bytes)
    index = bytearray()
    for (kind, comp, plain_len, offset, length, plain_hash), record in encoded:
        index += INDEX_ENTRY.pack(kind, comp, 0, plain_len, offset, length, pos if record else 0, len(record), plain_hash)
        if record:
            parts.append(record)
            pos += len(record)
    sealed_index = crypto.seal(key, bytes(index), header_bytes + INDEX_AAD_SUFFIX)
    parts.append(sealed_index)
    parts.append(SEGMENT_TRAILER.pack(pos, len(sealed_index), TRAILER_MAGIC))
    return parts


class SegmentReader:
    """Validates and opens a whole segment held in memory (size bounded by the batch cap)."""

    def __init__(self, name: str, data: bytes, key: bytes, disk_id: str | None = None, seq: int | None = None):
        self.name = name
        self.data = data
        self.key = key
        self.header, self.header_bytes = self._parse_header(disk_id, seq)
        self.entries = self._open_index()

    def _bad(self, msg: str) -> IntegrityError:
        return IntegrityError(self.name, msg)

    def _parse_header(self, disk_id: str | None, seq: int | None) -> tuple[SegmentHeader, bytes]:
        d = self.data
        if len(d) < SEGMENT_HEADER.size + SEGMENT_TRAILER.size:
            raise self._bad(f"object of {len(d)} bytes is smaller than a segment header and trailer")
        magic, version, cipher, comp, _flags, s, disk_size, frames, id_len, _r = SEGMENT_HEADER.unpack_from(d)
        if magic != SEGMENT_MAGIC:
            raise self._bad(f"magic {magic!r} is not {SEGMENT_MAGIC!r}")
        if version != SEGMENT_VERSION:
            raise self._bad(f"segment version {version} is not supported (this build reads {SEGMENT_VERSION})")
        if cipher != crypto.CIPHER_AEGIS256:
            raise self._bad(f"unknown cipher id {cipher}")
        if not 0 < id_len <= MAX_DISK_ID_BYTES or frames > MAX_SEGMENT_FRAMES:
            raise self._bad(f"header declares disk id length {id_len} and {frames} frames, out of bounds")
        end = SEGMENT_HEADER.size + id_len
        if end + SEGMENT_TRAILER.size > len(d):
            raise self._bad("header runs into the trailer")
        did = d[SEGMENT_HEADER.size:end].decode(errors="replace")
        header = SegmentHeader(did, s, disk_size, frames)
        if disk_id is not None and did != disk_id:
            raise self._bad(f"segment belongs to disk {did!r}, expected {disk_id!r}")
        if seq is not None and s != seq:
            raise self._bad(f"segment carries sequence {s}, its name says {seq}")
        return header, d[:end]

    def _open_index(self) -> list[IndexEntry]:
        d = self.data
        idx_off, idx_len, magic = SEGMENT_TRAILER.unpack_from(d, len(d) - SEGMENT_TRAILER.size)
        if magic != TRAILER_MAGIC:
            raise self._bad(f"trailer magic {magic!r} is not {TRAILER_MAGIC!r} (truncated object?)")
        if idx_off < len(self.header_bytes) or idx_off + idx_len != len(d) - SEGMENT_TRAILER.size:
            raise self._bad(f"index at {idx_off}+{idx_len} does not end at the trailer")
        try:
            raw = crypto.open_sealed(self.key, memoryview(d)[idx_off: idx_off + idx_len],
                                     self.header_bytes + INDEX_AAD_SUFFIX)
        except crypto.AuthenticationFailed as exc:
            raise self._bad(f"index: {exc}") from None
        if len(raw) != INDEX_ENTRY.size * self.header.frame_count:
            raise self._bad(f"index holds {len(raw)} bytes for {self.header.frame_count} frames")
        entries = [IndexEntry(*(f for i, f in enumerate(t) if i != 2)) for t in INDEX_ENTRY.iter_unpack(raw)]
        for i, e in enumerate(entries):
            # plain_len bounds decompression: without its own cap a small zstd frame could expand to 4 GiB.
            if (e.kind not in FRAME_TYPES or e.record_offset + e.record_len > idx_off
                    or e.plain_len > MAX_FRAME_PAYLOAD_BYTES):
                raise self._bad(f"index entry {i} is invalid")
        return entries

    def payload(self, i: int) -> bytes:
        """Decrypt, decompress and check frame i's payload (b'' for zero frames)."""
        e = self.entries[i]
        if e.kind == FRAME_ZERO:
            return b""
        rec = memoryview(self.data)[e.record_offset: e.record_offset + e.record_len]
        try:
            body = crypto.open_sealed(self.key, rec, self.header_bytes + RECORD_AAD.pack(i))
        except crypto.AuthenticationFailed as exc:
            raise self._bad(f"record {i} at offset {e.record_offset}: {exc}") from None
        try:
            plain = compression.decompress(body, e.plain_len) if e.compression else body
        except Exception as exc:  # zstd raises its own error types
            raise self._bad(f"record {i}: cannot decompress: {exc}") from None
        if len(plain) != e.plain_len or xxhash.xxh3_64_intdigest(plain) != e.plain_hash:
            raise self._bad(f"record {i}: plaintext does not match its index checksum")
        return plain

    def decode(self, i: int, scratch: bytearray | None = None) -> bytes | bytearray:
        """payload() without its copies, for the failover hot path (thread-safe: one `scratch` per thread).

        The record is decrypted straight from the segment into `scratch` (reused across frames; grown
        as needed) when compressed, so only zstd allocates; an uncompressed record is decrypted into
        its own new buffer, which is the plaintext. Checks are payload()'s.
        """
        e = self.entries[i]
        if e.kind == FRAME_ZERO:
            return b""
        rec = memoryview(self.data)[e.record_offset: e.record_offset + e.record_len]
        body_len = max(0, e.record_len - crypto.NONCE_BYTES - crypto.TAG_BYTES)
        if e.compression:
            if scratch is None or len(scratch) < body_len:
                scratch = bytearray(body_len)
            out = scratch
        else:
            out = bytearray(body_len)
        try:
            n = crypto.open_sealed_into(self.key, rec, self.header_bytes + RECORD_AAD.pack(i), out)
        except crypto.AuthenticationFailed as exc:
            raise self._bad(f"record {i} at offset {e.record_offset}: {exc}") from None
        if e.compression:
            try:
                plain = compression.decompress(memoryview(out)[:n], e.plain_len)
            except Exception as exc:  # zstd raises its own error types
                raise self._bad(f"record {i}: cannot decompress: {exc}") from None
        else:
            plain = out
        if len(plain) != e.plain_len or xxhash.xxh3_64_intdigest(plain) != e.plain_hash:
            raise self._bad(f"record {i}: plaintext does not match its index checksum")
        return plain

    def bookmark_indexes(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.kind == FRAME_BOOKMARK]

    def verify_all(self) -> None:
        for i in range(len(self.entries)):
            self.payload(i)
