"""Known plaintext planted in a disk image, to search the repository's stored objects for it."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

BLOCK = 4096


def plant_markers(path: Path, count: int = 8, seed: int = 3) -> list[bytes]:
    """Write `count` unique markers, each inside a block of random bytes (which zstd leaves as is, so an
    unencrypted store would hold them verbatim), at distinct block-aligned offsets. Returns the markers."""
    rng = random.Random(seed)
    size = path.stat().st_size
    offsets = rng.sample(range(size // BLOCK), count)
    markers = [f"LIFEBOAT-PLAINTEXT-MARKER-{uuid.uuid4().hex}".encode() for _ in range(count)]
    with open(path, "r+b") as f:
        for block, marker in zip(offsets, markers):
            data = bytearray(rng.randbytes(BLOCK))
            at = rng.randrange(BLOCK - len(marker))
            data[at: at + len(marker)] = marker
            f.seek(block * BLOCK)
            f.write(data)
    return markers


def objects_with_markers(objects: dict[str, bytes], markers: list[bytes]) -> list[tuple[str, int]]:
    """(object name, marker index) for every marker found in any object."""
    return [(name, i) for name, data in objects.items() for i, m in enumerate(markers) if m in data]
