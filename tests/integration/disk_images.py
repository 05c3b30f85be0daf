"""Deterministic disk images for integration tests (a module, not conftest: test files import it)."""

from __future__ import annotations

import random
from pathlib import Path


def make_image(path: Path, size_mib: int, seed: int = 7) -> Path:
    """Mixed content, like a used disk: random, text-like and zero 64 KiB blocks (deterministic)."""
    rng = random.Random(seed)
    block = 64 * 1024
    text = b"the quick brown fox jumps over the lazy dog 0123456789 " * (block // 55 + 1)
    with open(path, "wb") as f:
        for _ in range(size_mib * 1024 * 1024 // block):
            kind = rng.random()
            if kind < 0.4:
                f.write(rng.randbytes(block))
            elif kind < 0.7:
                start = rng.randrange(55)
                f.write(text[start:start + block])
            else:
                f.seek(block, 1)
        f.truncate(size_mib * 1024 * 1024)
    return path


def scribble(path: Path, count: int, seed: int, size: int = 4096) -> None:
    """Overwrite `count` random aligned regions with random bytes (a burst of guest writes)."""
    rng = random.Random(seed)
    total = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(0, total - size) // 4096 * 4096)
            f.write(rng.randbytes(size))
