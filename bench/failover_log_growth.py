"""Failover time as the log grows: materialise the latest point after L, 2L, 4L delta segments, replaying
the whole log and starting from a checkpoint just before the point. Prints figures; asserts no timing.

    .venv/bin/python -m bench.failover_log_growth [--size 64M] [--segments 50] [--reps 3]

The log is written in-process the way the uploader writes it (demo/synthetic_log.py: real segments,
sealed catalog entries, a local-directory repository): an initial copy in 16 MiB segments, then
delta segments of 16 random 64 KiB writes (1 MiB each) with a point each. Every recovered image is
compared with the source's SHA-256; a difference exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import time

from lifeboat.core.checkpoint import MIN_CHUNK_BYTES

from .common import MiB, Row, median
from .initial_replication import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "demo"))
from synthetic_log import SyntheticDisk  # noqa: E402

INITIAL_SEGMENT_BYTES = 16 * MiB   # the agent's batch size: one batch, one segment
DELTA_WRITES, DELTA_WRITE_BYTES = 16, 64 * 1024
FLAT_GOAL = 1.25   # "flat": at 4L at most 25% slower than at L


async def _materialize_seconds(repo, entry, target: str, want_sha: str) -> float:
    from lifeboat.repository.materialize import materialize
    # Start from clean writeback: the previous step's dirty pages (a checkpoint build, the last image)
    # would otherwise land in this failover's fsync and swing sub-second figures by 3x.
    os.sync()
    t = time.perf_counter()
    await materialize(repo, entry, target, overwrite=True)
    seconds = time.perf_counter() - t
    with open(target, "rb") as f:
        got = hashlib.file_digest(f, "sha256").hexdigest()
    os.unlink(target)
    if got != want_sha:
        raise RuntimeError(f"failover of {entry.point_id} differs from the source ({got} != {want_sha})")
    return seconds


async def measure(work: str, size: int, segments: int, reps: int) -> dict[int, tuple[float, float]]:
    """{log length in delta segments: (median s replaying the whole log, median s from a checkpoint)}."""
    from lifeboat.core import keys
    from lifeboat.repository.checkpoints import build_checkpoint
    from lifeboat.repository.local import LocalBackend
    from lifeboat.repository.repo import Repository

    backend = LocalBackend(os.path.join(work, "repo"))
    repo = await Repository.init(backend, keys.write_key_file(os.path.join(work, "key")))
    disk = SyntheticDisk(repo, "bench", "sda", size, seed=3)
    from .initial_replication import generate_image
    image = os.path.join(work, "source.img")
    generate_image(image, size, 1)
    with open(image, "rb") as f:
        for off in range(0, size, INITIAL_SEGMENT_BYTES):
            data = f.read(INITIAL_SEGMENT_BYTES)
            await disk.segment([(off + i, data[i:i + MiB]) for i in range(0, len(data), MiB)])
    os.unlink(image)
    results: dict[int, tuple[float, float]] = {}
    target = os.path.join(work, "out.img")
    done = 0
    try:
        for length in (segments, 2 * segments, 4 * segments):
            while done < length:
                done += 1
                sha = await disk.segment(disk.random_writes(DELTA_WRITES, DELTA_WRITE_BYTES), f"p{done}", float(done))
            entry = [e for e in await repo.list_points(disk.disk_id) if e.point_id == f"p{done}"][0]
            full = [await _materialize_seconds(repo, entry, target, sha) for _ in range(reps)]
            await build_checkpoint(repo, disk.disk_id, entry.seq - 1, work_dir=work)
            ck = [await _materialize_seconds(repo, entry, target, sha) for _ in range(reps)]
            for name in await backend.list(f"checkpoints/{disk.disk_id}/"):
                await backend.delete(name)   # the next length is measured without it again
            results[length] = (median(full), median(ck))
            print(f"-- log of {length} delta segments (+{-(-size // INITIAL_SEGMENT_BYTES)} initial): failover "
                  f"{results[length][0]:.2f} s replaying the log, {results[length][1]:.2f} s from a checkpoint",
                  flush=True)
        # Build cost in 64 KiB chunks: a checkpoint from the log start against an incremental one a
        # segment (16 writes) later, which loads and rewrites only the chunks that segment touched.
        small = MIN_CHUNK_BYTES
        t = time.perf_counter()
        _m, full_written = await build_checkpoint(repo, disk.disk_id, disk.seq - 2, work_dir=work, chunk_bytes=small)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        _m, inc_written = await build_checkpoint(repo, disk.disk_id, disk.seq - 1, work_dir=work, chunk_bytes=small)
        inc_s = time.perf_counter() - t
        print(f"-- checkpoint build ({small // 1024} KiB chunks): from the log start ({disk.seq - 2} segments) "
              f"{full_s:.2f} s, {len(full_written) - 1} chunks written; incremental over 1 more segment "
              f"{inc_s:.2f} s, {len(inc_written) - 1} chunks written", flush=True)
    finally:
        await backend.close()
    return results


def row(work: str, size: int, segments: int, reps: int) -> Row:
    """The suite's row: from-checkpoint time at 4L over L (flat), against the whole-log replay."""
    os.makedirs(work, exist_ok=True)
    r = asyncio.run(measure(work, size, segments, reps))
    lengths = sorted(r)
    ck = "/".join(f"{r[n][1]:.2f}" for n in lengths)
    full = "/".join(f"{r[n][0]:.2f}" for n in lengths)
    growth = r[lengths[-1]][1] / r[lengths[0]][1]
    return Row(f"failover time as the log grows (L/2L/4L = {'/'.join(map(str, lengths))} segments)",
               f"{ck} s from checkpoint", f"{full} s whole log", growth, f"≤ {FLAT_GOAL} (4L / L, flat)",
               growth <= FLAT_GOAL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.failover_log_growth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=64 * MiB, help="disk size (default 64M)")
    ap.add_argument("--segments", type=int, default=50, help="L, delta segments (default 50)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "log-growth"))
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        result = row(args.work, args.size, args.segments, args.reps)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(" | ".join(result.cells()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
