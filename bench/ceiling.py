"""Same-run ceilings: one Python process, one thread, doing only the data path's essential work.

- replicate: read the image in 1 MiB chunks (the agent's write-frame size) → zstd at the process
  server's level → AEGIS-256 (nacl.bindings, random 32-byte nonce, as lifeboat.core.crypto.seal) →
  write, one file per 16 MiB of source (the agent's batch = one repository segment), each fsynced.
  All-zero chunks are skipped, as Lifeboat sends them as zero frames: that makes the ceiling higher
  (stricter), not lower. Incompressible chunks stay raw when zstd does not shrink them (as Lifeboat).
- restore: read those files back → decrypt → decompress → pwrite at the chunk's offset into a fresh
  sparse image → fsync. No digest check (Lifeboat's materializer also recomputes and checks the point's image digest).
"""

from __future__ import annotations

import os
import struct
import time

import nacl.bindings as sodium
import zstandard
from lifeboat.core.compression import ZSTD_LEVEL

from .common import BATCH_BYTES, CHUNK_BYTES

NONCE = sodium.crypto_aead_aegis256_NPUBBYTES
# disk offset, plain length, compressed?, sealed length
RECORD = struct.Struct("<QIBI")
AAD = b"bench-ceiling"


def replicate(image: str, out_dir: str, key: bytes) -> float:
    """Returns seconds from the first read to the last segment fsynced."""
    os.makedirs(out_dir, exist_ok=True)
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    buf = bytearray(CHUNK_BYTES)
    zeros = bytes(CHUNK_BYTES)
    t0 = time.monotonic()
    seg, offset, seg_bytes, parts = 0, 0, 0, []

    def flush() -> None:
        nonlocal seg, seg_bytes, parts
        fd = os.open(os.path.join(out_dir, f"{seg:08d}.seg"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for p in parts:
                view = memoryview(p)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        seg, seg_bytes, parts = seg + 1, 0, []

    with open(image, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            chunk = buf if n == CHUNK_BYTES else buf[:n]
            if chunk != zeros[:n]:
                plain = bytes(chunk)
                packed = comp.compress(plain)
                compressed = len(packed) < n
                body = packed if compressed else plain
                nonce = os.urandom(NONCE)
                sealed = nonce + sodium.crypto_aead_aegis256_encrypt(body, AAD, nonce, key)
                parts.append(RECORD.pack(offset, n, compressed, len(sealed)))
                parts.append(sealed)
            offset += n
            seg_bytes += n
            if seg_bytes >= BATCH_BYTES:
                flush()
    if parts or seg_bytes:
        flush()
    return time.monotonic() - t0


def restore(seg_dir: str, target: str, size: int, key: bytes) -> float:
    """Returns seconds from the first segment read to the image fsynced."""
    dec = zstandard.ZstdDecompressor()
    t0 = time.monotonic()
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for name in sorted(os.listdir(seg_dir)):
            with open(os.path.join(seg_dir, name), "rb", buffering=0) as f:
                data = f.read()
            view, pos = memoryview(data), 0
            while pos < len(data):
                offset, plain_len, compressed, sealed_len = RECORD.unpack_from(data, pos)
                pos += RECORD.size
                nonce = bytes(view[pos: pos + NONCE])
                body = sodium.crypto_aead_aegis256_decrypt(bytes(view[pos + NONCE: pos + sealed_len]), AAD, nonce, key)
                pos += sealed_len
                plain = dec.decompress(body, max_output_size=plain_len) if compressed else body
                os.pwrite(fd, plain, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0
