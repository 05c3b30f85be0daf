"""Block ranges (first_block, count): merging and counting."""

from __future__ import annotations

from typing import Iterable


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, adjacent runs joined; empty ranges dropped."""
    out: list[tuple[int, int]] = []
    for first, count in sorted(r for r in ranges if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out


def block_count(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(count for _, count in ranges)
