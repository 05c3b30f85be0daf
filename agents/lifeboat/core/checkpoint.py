"""Checkpoint objects: a sealed, compressed, sparse snapshot of a disk image at a log position.

Specified in FORMATS.md ("8. Checkpoint"). A checkpoint of disk D at seq C is the image after
applying segments 1 … C entirely: a manifest listing chunk objects, which are named by a keyed hash
of their position and content so that consecutive checkpoints share every chunk that did not change.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import xxhash

from . import compression, crypto
from .errors import IntegrityError

CHUNK_MAGIC = b"LBCC"
MANIFEST_MAGIC = b"LBCM"
CHECKPOINT_VERSION = 1
# magic, version, compression, reserved, chunk index, plain_len, disk offset, plain xxh3_64
CHUNK_HEADER = struct.Struct("<4sBBHIIQQ")
# magic, version, reserved, reserved, seq, disk_size, chunk_bytes, chunk_count, stored chunk count
MANIFEST_HEADER = struct.Struct("<4sBBHQQIII")
# chunk index, chunk id: one per stored chunk in the sealed manifest body, indexes increasing
CHUNK_REF = struct.Struct("<I32s")
CHUNK_ID_BYTES = 32
CHUNK_BYTES = 4 * 1024 * 1024          # default chunk size; the manifest records the one used
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024     # bounds the memory a reader allocates per chunk
MAX_CHECKPOINT_CHUNKS = 1 << 20        # 4 TiB at 4 MiB chunks (a 36 MiB manifest body at most)
SEQ_DIGITS = 20
CHUNK_ID_PERSON = b"lifeboat-chunkid"

_MANIFEST_RE = re.compile(r"checkpoints/([a-z0-9][a-z0-9._-]{0,63})/(\d{20})/manifest")
_CHUNK_RE = re.compile(r"checkpoints/([a-z0-9][a-z0-9._-]{0,63})/chunks/([0-9a-f]{64})")


def manifest_name(disk_id: str, seq: int) -> str:
    return f"checkpoints/{disk_id}/{seq:0{SEQ_DIGITS}d}/manifest"


def chunk_name(disk_id: str, chunk_id: bytes) -> str:
    return f"checkpoints/{disk_id}/chunks/{chunk_id.hex()}"


def parse_object_name(name: str) -> tuple[str, str, int | bytes] | None:
    """("manifest", disk id, seq) or ("chunk", disk id, chunk id) for a checkpoint object name, else None."""
    m = _MANIFEST_RE.fullmatch(name)
    if m:
        return "manifest", m.group(1), int(m.group(2))
    m = _CHUNK_RE.fullmatch(name)
    if m:
        return "chunk", m.group(1), bytes.fromhex(m.group(2))
    return None


def chunk_id_key(checkpoint_key: bytes) -> bytes:
    return crypto.derive_subkey(checkpoint_key, CHUNK_ID_PERSON)


def chunk_id(id_key: bytes, offset: int, plain: bytes | memoryview) -> bytes:
    """Keyed BLAKE2b-256 of (offset, content): equal chunks at the same place share one object; the key
    keeps the store from learning which chunks hold known content."""
    h = hashlib.blake2b(key=id_key, digest_size=CHUNK_ID_BYTES)
    h.update(struct.pack("<Q", offset))
    h.update(plain)
    return h.digest()


@dataclass(frozen=True)
class Manifest:
    disk_id: str
    seq: int
    disk_size: int
    chunk_bytes: int
    refs: tuple[tuple[int, bytes], ...]   # (index, chunk id) of the stored (non-zero) chunks, increasing

    @property
    def chunk_count(self) -> int:
        return -(-self.disk_size // self.chunk_bytes)

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.disk_size - index * self.chunk_bytes)


def _check_geometry(name: str, disk_size: int, chunk_bytes: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 512:
        raise IntegrityError(name, f"chunk size {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} "
                                   "or not a multiple of 512")
    if -(-disk_size // chunk_bytes) > MAX_CHECKPOINT_CHUNKS:
        raise IntegrityError(name, f"disk of {disk_size} bytes needs more than {MAX_CHECKPOINT_CHUNKS} chunks of "
                                   f"{chunk_bytes} bytes")


def seal_chunk(key: bytes, name: str, index: int, offset: int, plain: bytes) -> bytes:
    """Compress (when it helps) and seal one chunk; thread-safe (run in an executor)."""
    packed = compression.compress(plain)
    comp, body = (compression.COMPRESSION_ZSTD, packed) if len(packed) < len(plain) else (compression.COMPRESSION_NONE, plain)
    header = CHUNK_HEADER.pack(CHUNK_MAGIC, CHECKPOINT_VERSION, comp, 0, index, len(plain), offset,
                               xxhash.xxh3_64_intdigest(plain))
    # The name (disk and chunk id) and the header (index, offset) are authenticated: a chunk cannot be
    # presented under another id, disk or position.
    return header + crypto.seal(key, body, header + name.encode())


def open_chunk(key: bytes, name: str, manifest: Manifest, index: int, data: bytes) -> bytes:
    """Check and open one chunk object against its manifest entry; returns the plaintext."""
    if len(data) < CHUNK_HEADER.size:
        raise IntegrityError(name, f"object of {len(data)} bytes is shorter than a chunk header")
    magic, version, comp, _r, idx, plain_len, offset, plain_hash = CHUNK_HEADER.unpack_from(data)
    if magic != CHUNK_MAGIC:
        raise IntegrityError(name, f"magic {magic!r} is not {CHUNK_MAGIC!r}")
    if version != CHECKPOINT_VERSION:
        raise IntegrityError(name, f"checkpoint version {version} is not supported (this build reads {CHECKPOINT_VERSION})")
    expected_len = manifest.chunk_len(index)
    if idx != index or offset != index * manifest.chunk_bytes or plain_len != expected_len:
        raise IntegrityError(name, f"header says chunk {idx} at {offset} of {plain_len} bytes, the manifest expects "
                                   f"chunk {index} at {index * manifest.chunk_bytes} of {expected_len}")
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
                                  manifest.chunk_bytes, manifest.chunk_count, len(manifest.refs))
    body = b"".join(CHUNK_REF.pack(i, cid) for i, cid in manifest.refs)
    return header + crypto.seal(key, body, header + name.encode())


def open_manifest(key: bytes, name: str, data: bytes) -> Manifest:
    """Validate in order: size, magic, version, declared geometry within bounds, then authenticate."""
    parsed = parse_object_name(name)
    if parsed is None or parsed[0] != "manifest":
        raise IntegrityError(name, "not a checkpoint manifest name")
    _, disk_id, seq = parsed
    if len(data) < MANIFEST_HEADER.size:
        raise IntegrityError(name, f"object of {len(data)} bytes is shorter than a manifest header")
    magic, version, _a, _b, s, disk_size, chunk_bytes, chunk_count, stored = MANIFEST_HEADER.unpack_from(data)
    if magic != MANIFEST_MAGIC:
        raise IntegrityError(name, f"magic {magic!r} is not {MANIFEST_MAGIC!r}")
    if version != CHECKPOINT_VERSION:
        raise IntegrityError(name, f"checkpoint version {version} is not supported (this build reads {CHECKPOINT_VERSION})")
    _check_geometry(name, disk_size, chunk_bytes)
    if chunk_count != -(-disk_size // chunk_bytes) or stored > chunk_count:
        raise IntegrityError(name, f"{chunk_count} chunks ({stored} stored) do not fit a disk of {disk_size} "
                                   f"bytes in {chunk_bytes}-byte chunks")
    if s != seq:
        raise IntegrityError(name, f"manifest carries sequence {s}, its name says {seq}")
    if len(data) != MANIFEST_HEADER.size + crypto.sealed_size(stored * CHUNK_REF.size):
        raise IntegrityError(name, f"object of {len(data)} bytes does not hold {stored} chunk references")
    header = data[: MANIFEST_HEADER.size]
    try:
        body = crypto.open_sealed(key, memoryview(data)[MANIFEST_HEADER.size:], header + name.encode())
    except crypto.AuthenticationFailed as exc:
        raise IntegrityError(name, str(exc)) from None
    refs = tuple(CHUNK_REF.iter_unpack(body))
    if any(i >= chunk_count for i, _ in refs) or any(a[0] >= b[0] for a, b in zip(refs, refs[1:])):
        raise IntegrityError(name, "chunk references are not increasing indexes inside the disk")
    return Manifest(disk_id, seq, disk_size, chunk_bytes, refs)
