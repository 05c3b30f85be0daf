"""Per-block xxh3-128 digests and the whole-image digest built from them."""

from __future__ import annotations

import xxhash

DIGEST_BYTES = 16


def block_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def image_digest(block_digests: bytes | memoryview) -> str:
    """Digest of an image = xxh3-128 of its ordered per-block digests (hex).

    The agent computes it from its digest map when it takes a point; the materializer
    recomputes it from the recovered image, so a failover proves it produced the point's bytes.
    """
    return xxhash.xxh3_128_hexdigest(block_digests)


def zero_block_digest(block_size: int) -> bytes:
    return block_digest(bytes(block_size))
