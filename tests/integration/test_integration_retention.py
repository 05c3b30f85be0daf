"""Retention end to end with real daemons: thinning with a compressed clock, compaction into checkpoints,
an injected crash between checkpoint publish and segment deletion, failover commit; every retained
point fails over with the SHA-256 the source image had at that point."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

from disk_images import make_image, scribble
from lab import bin_path, sha256_file

from lifeboat.core.config import RepositoryConfig
from lifeboat.repository.open import open_repository
from lifeboat.repository.retention import InjectedCrash, RetentionPolicy, apply_retention

SPREAD_SECONDS = 90 * 60   # the compressed clock: consecutive points are made 90 minutes apart


def repo_bytes(lab) -> int:
    root = lab.init["repository"].removeprefix("local:")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def retention(lab, *args: str) -> dict:
    proc = lab._run([bin_path("lifeboat"), "retention", *args[:1], *lab.repo_args(), *args[1:], "--json"])
    return json.loads(proc.stdout)


def assert_every_point_fails_over(lab, tmp_path, expected: dict[str, str]) -> list[str]:
    points = [p["point_id"] for p in lab.points()]
    for pid in points:
        out = tmp_path / "out.img"
        res = lab.failover(pid, out, "--overwrite")
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == expected[pid], pid
        out.unlink()
    return points


async def with_repo(lab, fn):
    repo = await open_repository(RepositoryConfig(url=lab.init["repository"], key_file=lab.init["key_file"]))
    try:
        return await fn(repo)
    finally:
        await repo.backend.close()


def spread_point_times(lab, base: float) -> dict[str, float]:
    """Test-only knob, stated plainly: rewrite the catalog entries' `created` (re-sealed with the repository
    key) so the points lie SPREAD_SECONDS apart; the bookmark frames in the segments keep the real times."""
    async def rewrite(repo):
        entries = await repo.list_points()
        order = sorted({(e.created, e.point_id) for e in entries})
        times = {pid: base + i * SPREAD_SECONDS for i, (_, pid) in enumerate(order)}
        for e in entries:
            await repo.put_point(dataclasses.replace(e, created=times[e.point_id]))
        return times
    return asyncio.run(with_repo(lab, rewrite))


def test_retention_thins_compacts_and_every_retained_point_fails_over_bit_exact(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 8)
    lab.start_ps()
    expected: dict[str, str] = {}
    for cycle in range(6):
        if cycle:
            scribble(disk, 40, seed=cycle)
        assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
        expected[lab.wait_points(cycle + 1)[-1]["point_id"]] = sha256_file(disk)
    times = spread_point_times(lab, base=time.time() - 8 * 3600)   # the newest lies 30 min in the past
    newest = max(times.values())
    before = repo_bytes(lab)

    # Ages at --now: 10, 100, 190, 280, 370, 460 min. Window 6 h, keep-all 2 h: the first two go.
    report = retention(lab, "apply", "--machine", "web01", "--retention-hours", "6", "--keep-all-hours", "2",
                       "--now", str(newest + 600))
    order = sorted(times, key=times.get)
    assert report["dropped_points"] == sorted(order[:2]) and report["kept_points"] == sorted(order[2:])
    assert len(report["checkpoints_written"]) == 1 and report["segments_deleted"] >= 2
    assert sorted(assert_every_point_fails_over(lab, tmp_path, expected)) == sorted(order[2:])
    after = repo_bytes(lab)
    assert after < before and report["bytes_after"] < report["bytes_before"]

    # Replication continues after compaction: the uploader numbers on from the newest segment.
    scribble(disk, 40, seed=100)
    assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
    [latest] = [p["point_id"] for p in lab.wait_points(5) if p["point_id"] not in times]
    expected[latest] = sha256_file(disk)
    times[latest] = newest + SPREAD_SECONDS   # on the same compressed clock, 90 min after the others

    async def set_latest_time(repo):
        for e in await repo.list_points():
            if e.point_id == latest:
                await repo.put_point(dataclasses.replace(e, created=times[latest]))
    asyncio.run(with_repo(lab, set_latest_time))

    # A pass 3 h later that dies between publishing its checkpoint and deleting the segments behind it.
    # Ages then: latest 91 min (keep-all), order[5] 181, order[4] 271 (one per hour), order[3] 361 (gone).
    policy = RetentionPolicy(6 * 3600, 2 * 3600)
    async def crash(repo):
        try:
            await apply_retention(repo, "web01", policy, newest + 3 * 3600 + 60, fail_at="manifest_published")
        except InjectedCrash:
            return True
        return False
    assert asyncio.run(with_repo(lab, crash))
    survivors = assert_every_point_fails_over(lab, tmp_path, expected)
    report = retention(lab, "apply", "--machine", "web01", "--retention-hours", "6", "--now", str(newest + 3 * 3600 + 60))
    assert sorted(report["kept_points"]) == sorted(survivors) and report["segments_deleted"] >= 1
    assert sorted(survivors) == sorted([order[4], order[5], latest])
    assert assert_every_point_fails_over(lab, tmp_path, expected) == survivors
    assert lab.cli("verify", "-q").returncode == 0

    # Failover commit: only the chosen point (and what it needs) stays.
    before_commit = repo_bytes(lab)
    report = retention(lab, "commit", "--machine", "web01", "--point", latest)
    assert report["kept_points"] == [latest] and set(report["dropped_points"]) == set(survivors) - {latest}
    assert assert_every_point_fails_over(lab, tmp_path, expected) == [latest]
    assert repo_bytes(lab) < before_commit
    assert lab.cli("verify", "-q").returncode == 0
