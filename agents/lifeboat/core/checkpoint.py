"""Checkpoint objects: a sealed, compressed, sparse snapshot of a disk image at a log position.

Specified in FORMATS.md ("8. Checkpoint"). A checkpoint of disk D at seq C is the image after
applying segments 1 … C entirely; it is a manifest plus one object per non-zero chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from . import compression, crypto
from .errors import IntegrityError

CHUNK_MAGIC = b"LBCC"
MANIFEST_MAGIC = b"LBCM"
CHECKPOINT_VERSION = 1
# magic, version, compression, reserved, chunk index, plain_len, disk offset, build id, plain xxh3_64
CHUNK_HEADER = struct.Struct("<4sBBHIIQ16sQ")
# magic, version, reserved, reserved, seq, disk_size, chunk_bytes, chunk_count, present count, build id
MANIFEST_HEADER = struct.Struct("<4sBBHQQIII16s")
CHUNK_BYTES = 4 * 1024 * 1024          # default chunk size; the manifest records the one used
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024     # bounds the memory a reader allocates per chunk
MAX_CHECKPOINT_CHUNKS = 1 << 22        # 16 TiB at 4 MiB chunks; the bitmap is then 512 KiB
SEQ_DIGITS = 20
CHUNK_DIGITS = 10


def checkpoint_prefix(disk_id: str, seq: int) -> str:
    return f"checkpoints/{disk_id}/{seq:0{SEQ_DIGITS}d}/"


def manifest_name(disk_id: str, seq: int) -> str:
    return checkpoint_prefix(disk_id, seq) + "manifest"


def chunk_name(disk_id: str, seq: int, index: int) -> str:
    return checkpoint_prefix(disk_id, seq) + f"{index:0{CHUNK_DIGITS}d}"


def parse_object_name(name: str) -> tuple[str, int, str] | None:
    """(disk id, seq, 'manifest' or the chunk index digits) of a checkpoint object name, else None."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "checkpoints" or not parts[2].isdigit():
        return None
    if parts[3] != "manifest" and not parts[3].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


@dataclass(frozen=True)
class Manifest:
    disk_id: str
    seq: int
    disk_size: int
    chunk_bytes: int
    build_id: bytes
    present: tuple[int, ...]   # indexes of the stored (non-zero) chunks, increasing

    @property
    def chunk_count(self) -> int:
        return -(-self.disk_size // self.chunk_bytes)


def _check_geometry(name: str, disk_size: int, chunk_bytes: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 512:
        raise IntegrityError(name, f"chunk size {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} "
                                   "or not a multiple of 512")
    if -(-disk_size // chunk_bytes) > MAX_CHECKPOINT_CHUNKS:
        raise IntegrityError(name, f"disk of {disk_size} bytes needs more than {MAX_CHECKPOINT_CHUNKS} chunks")


def seal_chunk(key: bytes, name: str, index: int, offset: int, build_id: bytes, plain: bytes) -> bytes:
    """Compress (when it helps) and seal one chunk; thread-safe (run in an executor)."""
    packed = compression.compress(plain)
    comp, body = (compression.COMPRESSION_ZSTD, packed) if len(packed) < len(plain) else (compression.COMPRESSION_NONE, plain)
    header = CHUNK_HEADER.pack(CHUNK_MAGIC, CHECKPOINT_VERSION, comp, 0, index, len(plain), offset, build_id,
                               xxhash.xxh3_64_intdigest(plain))
    # The object name (disk, seq, index) and the build id are authenticated: a chunk cannot be moved to
    # another position, disk or checkpoint, nor mixed in from an earlier build of the same checkpoint.
    return header + crypto.seal(key, body, header + name.encode())


def open_chunk(key: bytes, name: str, manifest: Manifest, index: int, data: bytes) -> bytes:
    """Check and open one chunk object against its manifest; returns the plaintext."""
    if len(data) < CHUNK_HEADER.size:
        raise IntegrityError(name, f"object of {len(data)} bytes is shorter than a chunk header")
    magic, version, comp, _r, idx, plain_len, offset, build_id, plain_hash = CHUNK_HEADER.unpack_from(data)
    if magic != CHUNK_MAGIC:
        raise IntegrityError(name, f"magic {magic!r} is not {CHUNK_MAGIC!r}")
    if version != CHECKPOINT_VERSION:
        raise IntegrityError(name, f"checkpoint version {version} is not supported (this build reads {CHECKPOINT_VERSION})")
    expected_len = min(manifest.chunk_bytes, manifest.disk_size - index * manifest.chunk_bytes)
    if idx != index or offset != index * manifest.chunk_bytes or plain_len != expected_len:
        raise IntegrityError(name, f"header says chunk {idx} at {offset} of {plain_len} bytes, the manifest expects "
                                   f"chunk {index} at {index * manifest.chunk_bytes} of {expected_len}")
    if build_id != manifest.build_id:
        raise IntegrityError(name, "chunk belongs to another build of this checkpoint")
    header = data[: CHUNK_HEADER.size]
    try:
        body = crypto.open_sealed(key, memoryview(data)[CHUNK_HEADER.size:], header + name.encode())
    except crypto.AuthenticationFailed as exc:
        raise IntegrityError(name, str(exc)) from None
    try:
        plain = compression.decompress(body, plain_len) if comp == compression.COMPRESSION_ZSTD else body
    except Exception as exc:  # zstd raises its own error types
        raise IntegrityError(name, f"cannot decompress: {exc}") from None
    if len(plain) != plain_len or xxhash.xxh3_64_intdigest(plain) != plain_hash:
        raise IntegrityError(name, "plaintext does not match its checksum")
    return plain


def seal_manifest(key: bytes, manifest: Manifest) -> bytes:
    name = manifest_name(manifest.disk_id, manifest.seq)
    _check_geometry(name, manifest.disk_size, manifest.chunk_bytes)
    header = MANIFEST_HEADER.pack(MANIFEST_MAGIC, CHECKPOINT_VERSION, 0, 0, manifest.seq, manifest.disk_size,
                                  manifest.chunk_bytes, manifest.chunk_count, len(manifest.present), manifest.build_id)
    bitmap = bytearray(-(-manifest.chunk_count // 8))
    for i in manifest.present:
        bitmap[i // 8] |= 1 << (i % 8)
    return header + crypto.seal(key, bytes(bitmap), header + name.encode())


def open_manifest(key: bytes, name: str, data: bytes) -> Manifest:
    """Validate in order: size, magic, version, declared geometry within bounds, then authenticate."""
    parsed = parse_object_name(name)
    if parsed is None or parsed[2] != "manifest":
        raise IntegrityError(name, "not a checkpoint manifest name")
    disk_id, seq, _ = parsed
    if len(data) < MANIFEST_HEADER.size:
        raise IntegrityError(name, f"object of {len(data)} bytes is shorter than a manifest header")
    magic, version, _a, _b, s, disk_size, chunk_bytes, chunk_count, present_count, build_id = \
        MANIFEST_HEADER.unpack_from(data)
    if magic != MANIFEST_MAGIC:
        raise IntegrityError(name, f"magic {magic!r} is not {MANIFEST_MAGIC!r}")
    if version != CHECKPOINT_VERSION:
        raise IntegrityError(name, f"checkpoint version {version} is not supported (this build reads {CHECKPOINT_VERSION})")
    _check_geometry(name, disk_size, chunk_bytes)
    if chunk_count != -(-disk_size // chunk_bytes) or present_count > chunk_count:
        raise IntegrityError(name, f"{chunk_count} chunks ({present_count} stored) do not fit a disk of {disk_size} "
                                   f"bytes in {chunk_bytes}-byte chunks")
    if s != seq:
        raise IntegrityError(name, f"manifest carries sequence {s}, its name says {seq}")
    bitmap_len = -(-chunk_count // 8)
    if len(data) != MANIFEST_HEADER.size + crypto.sealed_size(bitmap_len):
        raise IntegrityError(name, f"object of {len(data)} bytes does not hold a {bitmap_len}-byte chunk bitmap")
    header = data[: MANIFEST_HEADER.size]
    try:
        bitmap = crypto.open_sealed(key, memoryview(data)[MANIFEST_HEADER.size:], header + name.encode())
    except crypto.AuthenticationFailed as exc:
        raise IntegrityError(name, str(exc)) from None
    present = tuple(i for i in range(chunk_count) if bitmap[i // 8] >> (i % 8) & 1)
    if len(present) != present_count:
        raise IntegrityError(name, f"bitmap marks {len(present)} chunks, the header says {present_count}")
    return Manifest(disk_id, seq, disk_size, chunk_bytes, build_id, present)
