"""apply_retention / drop_points_except on a real repository (local directory and Azurite): every kept
point still materialises bit-exact after thinning and compaction, also after a crash between any two steps."""

from __future__ import annotations

import hashlib
import sys
import uuid
from pathlib import Path

import pytest

from lifeboat.core import checkpoint as ckfmt
from lifeboat.core import keys
from lifeboat.core.errors import IntegrityError, PointIncomplete, PointNotFound
from lifeboat.repository.azure import AzureBackend
from lifeboat.repository.checkpoints import list_checkpoints, read_manifest
from lifeboat.repository.local import LocalBackend
from lifeboat.repository.materialize import materialize
from lifeboat.repository.repo import Repository, segment_name
from lifeboat.repository.retention import (
    DAY, HOUR, InjectedCrash, RetentionPolicy, apply_retention, drop_points_except)
from lifeboat.repository.verify import verify_repository

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "demo"))
from synthetic_log import SyntheticDisk  # noqa: E402

NOW = 1_000 * DAY
DISK_BYTES = 1 << 20          # 1 MiB disks in 64 KiB chunks: 16 chunks, many of them zero (sparse)
CHUNK = 64 * 1024
STEPS = ("catalog_pruned", "chunks_published", "manifest_published", "segments_deleted")


async def make_repo(request, tmp_path, kind: str):
    if kind == "azure":
        backend = AzureBackend(f"retention-{uuid.uuid4().hex[:16]}", request.getfixturevalue("azurite"))
    else:
        backend = LocalBackend(str(tmp_path / "repo"))
    return await Repository.init(backend, keys.write_key_file(str(tmp_path / "key")))


@pytest.fixture
async def repo(request, tmp_path):
    """A local-directory repository (the crash and damage cases)."""
    r = await make_repo(request, tmp_path, "local")
    yield r
    await r.backend.close()


@pytest.fixture(params=["local", pytest.param("azure", marks=pytest.mark.azurite)])
async def any_repo(request, tmp_path):
    """The same case on both backends: local directory and Azure Blob Storage (Azurite)."""
    r = await make_repo(request, tmp_path, request.param)
    yield r
    await r.backend.close()


async def history(repo, machine="web01", disks=("sda", "sdb"), hours=12, every_minutes=30):
    """Points every 30 min over 12 h on two disks, with a write-only segment between points. Returns
    {point_id: {disk_id: sha256 of the disk at the point}}."""
    sds = [SyntheticDisk(repo, machine, d, DISK_BYTES, seed=i + 1) for i, d in enumerate(disks)]
    expected: dict[str, dict[str, str]] = {}
    n = hours * 60 // every_minutes
    for i in range(n + 1):
        age = (n - i) * every_minutes * 60.0
        pid = f"{machine}-p{i:03d}"
        for sd in sds:
            await sd.segment(sd.random_writes(3))                       # a batch without a point
            zeros = [(sd.rng.randrange(16) * CHUNK, CHUNK)] if i % 5 == 4 else []
            sha = await sd.segment(sd.random_writes(2), pid, NOW - age, "app" if i % 8 == 0 else "crash", zeros)
            expected.setdefault(pid, {})[sd.disk_id] = sha
    return sds, expected


async def failover_all(repo, tmp_path, expected, machine="web01"):
    """Materialise every point of `machine` still in the catalog; compare with the source's SHA-256."""
    entries = [e for e in await repo.list_points() if e.machine == machine]
    assert entries
    for e in entries:
        out = tmp_path / f"out-{e.point_id}-{e.disk_id}.img"
        await materialize(repo, e, str(out))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == expected[e.point_id][e.disk_id], e
        out.unlink()
    return {e.point_id for e in entries}


async def repo_bytes(repo) -> int:
    return sum([await repo.backend.size(n) for n in await repo.backend.list("")])


async def test_thinning_and_compaction_keep_every_retained_point_bit_exact(any_repo, tmp_path):
    repo = any_repo
    sds, expected = await history(repo)
    before = await repo_bytes(repo)
    policy = RetentionPolicy(6 * HOUR, 2 * HOUR)
    report = await apply_retention(repo, "web01", policy, NOW, chunk_bytes=CHUNK, work_dir=str(tmp_path))
    # 12 h of half-hourly points: 5 in the last 2 h (0..120 min), then one per hour back to 6 h (4)
    assert len(report.kept_points) == 9 and len(report.dropped_points) == 25 - 9
    assert await failover_all(repo, tmp_path, expected) == set(report.kept_points)
    assert report.bytes_after < report.bytes_before and await repo_bytes(repo) < before
    for sd in sds:
        [ck] = await list_checkpoints(repo, sd.disk_id)
        oldest = min(e.seq for e in await repo.list_points(sd.disk_id))
        assert ck == oldest - 1
        segs = await repo.list_segments(sd.disk_id)
        assert segs[0] == oldest and segs[-1] == sd.seq   # compacted behind the oldest point; the newest stays
    assert not (await verify_repository(repo)).problems
    # A second pass a day later, with the replication still appending: a new checkpoint replaces the old one.
    for sd in sds:
        expected.setdefault("web01-late", {})[sd.disk_id] = await sd.segment(sd.random_writes(4), "web01-late",
                                                                            NOW + DAY)
    report2 = await apply_retention(repo, "web01", policy, NOW + DAY, chunk_bytes=CHUNK, work_dir=str(tmp_path))
    assert report2.kept_points == ["web01-late"] and len(report2.checkpoints_written) == 2
    assert await failover_all(repo, tmp_path, expected) == {"web01-late"}
    for sd in sds:
        assert await list_checkpoints(repo, sd.disk_id) == [sd.seq - 1]
        assert await repo.list_segments(sd.disk_id) == [sd.seq]
    assert not (await verify_repository(repo)).problems


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_between_any_two_steps_never_breaks_a_kept_point(repo, tmp_path, step):
    _sds, expected = await history(repo, hours=6)
    policy = RetentionPolicy(3 * HOUR, 1 * HOUR)
    with pytest.raises(InjectedCrash, match=step):
        await apply_retention(repo, "web01", policy, NOW, chunk_bytes=CHUNK, fail_at=step)
    kept_after_crash = await failover_all(repo, tmp_path, expected)   # every point still listed recovers
    assert not (await verify_repository(repo)).problems
    report = await apply_retention(repo, "web01", policy, NOW, chunk_bytes=CHUNK)   # the next pass finishes
    assert set(report.kept_points) <= kept_after_crash
    assert await failover_all(repo, tmp_path, expected) == set(report.kept_points)
    names = await repo.backend.list("checkpoints/")
    for disk in ("web01.sda", "web01.sdb"):
        [ck] = await list_checkpoints(repo, disk)
        manifest = await read_manifest(repo, disk, ck)
        # nothing left of interrupted builds: exactly the manifest and its chunks
        assert sorted(n for n in names if n.startswith(f"checkpoints/{disk}/")) == sorted(
            [ckfmt.manifest_name(disk, ck)] + [ckfmt.chunk_name(disk, cid) for _, cid in manifest.refs])
    assert not (await verify_repository(repo)).problems


async def test_failover_commit_keeps_only_the_chosen_point(any_repo, tmp_path):
    repo = any_repo
    sds, expected = await history(repo, hours=4)
    other_sd, other_expected = await history(repo, machine="db01", disks=("sda",), hours=2)
    chosen = "web01-p004"
    report = await drop_points_except(repo, "web01", chosen, chunk_bytes=CHUNK)
    assert report.kept_points == [chosen] and len(report.dropped_points) == 8
    assert await failover_all(repo, tmp_path, expected) == {chosen}
    for sd in sds:   # segments after the point stay (never delete what the uploader numbers from)
        point_seq = (await repo.list_points(sd.disk_id))[0].seq
        assert await repo.list_segments(sd.disk_id) == list(range(point_seq, sd.seq + 1))
    assert len(await failover_all(repo, tmp_path, other_expected, "db01")) == 5   # other machines untouched
    with pytest.raises(PointNotFound):
        await drop_points_except(repo, "web01", "web01-p001")


async def test_materialize_names_what_is_missing_when_no_checkpoint_covers_it(repo, tmp_path):
    sds, expected = await history(repo, hours=2)
    await apply_retention(repo, "web01", RetentionPolicy(HOUR, HOUR), NOW, chunk_bytes=CHUNK)
    sd = sds[0]
    [ck] = await list_checkpoints(repo, sd.disk_id)
    await repo.backend.delete(ckfmt.manifest_name(sd.disk_id, ck))   # the store lost the checkpoint
    entry = (await repo.list_points(sd.disk_id))[0]
    with pytest.raises(PointIncomplete, match=f"segment {segment_name(sd.disk_id, 1)} is missing.*no checkpoint"):
        await materialize(repo, entry, str(tmp_path / "x.img"))
    report = await verify_repository(repo)
    assert any("no checkpoint covers" in what for _, what in report.problems), report.problems


async def test_a_damaged_chunk_fails_the_point_and_verify_names_it(repo, tmp_path):
    sds, _ = await history(repo, hours=2)
    await apply_retention(repo, "web01", RetentionPolicy(HOUR, HOUR), NOW, chunk_bytes=CHUNK)
    sd = sds[0]
    [ck] = await list_checkpoints(repo, sd.disk_id)
    manifest = await read_manifest(repo, sd.disk_id, ck)
    name = ckfmt.chunk_name(sd.disk_id, manifest.refs[0][1])
    data = bytearray(await repo.backend.get(name))
    data[-5] ^= 1
    await repo.backend.put(name, bytes(data))
    entry = (await repo.list_points(sd.disk_id))[0]
    with pytest.raises(PointIncomplete, match="damaged"):
        await materialize(repo, entry, str(tmp_path / "x.img"))
    assert not (tmp_path / "x.img").exists()
    assert name in [n for n, _ in (await verify_repository(repo)).problems]


async def test_a_damaged_catalog_entry_stops_retention_before_anything_is_deleted(repo, tmp_path):
    await history(repo, hours=2)
    names = await repo.backend.list("")
    victim = (await repo.backend.list("points/web01.sda/"))[0]
    await repo.backend.put(victim, b"LBOB garbage")
    with pytest.raises(IntegrityError):
        await apply_retention(repo, "web01", RetentionPolicy(HOUR, HOUR), NOW, chunk_bytes=CHUNK)
    assert await repo.backend.list("") == names


async def test_a_recent_checkpoint_keeps_failover_of_new_points_short_however_long_the_window(repo, tmp_path):
    sds, expected = await history(repo, disks=("sda",), hours=6)   # 13 points, 26 segments, nothing to drop
    policy = RetentionPolicy(15 * DAY, 2 * HOUR, checkpoint_interval_segments=8)
    report = await apply_retention(repo, "web01", policy, NOW, chunk_bytes=CHUNK)
    sd = sds[0]
    # ages 0..6 h at 30 min, a 15-day window with 4 h buckets: the keep-all points, then (2,4], (4,8] h
    assert len(report.kept_points) == 5 + 2 and report.segments_deleted > 0
    newest = max(await repo.list_points(sd.disk_id), key=lambda e: e.seq)
    oldest = min(await repo.list_points(sd.disk_id), key=lambda e: e.seq)
    assert await list_checkpoints(repo, sd.disk_id) == [oldest.seq - 1, newest.seq - 1]
    result = await materialize(repo, newest, str(tmp_path / "new.img"))
    assert result.checkpoint_seq == newest.seq - 1 and result.segments == 1
    assert await failover_all(repo, tmp_path, expected) == set(report.kept_points)
    # Fewer than 8 new segments: no new checkpoint; 8 or more: it replaces the previous recent one.
    for i in range(3):
        expected[f"n{i}"] = {sd.disk_id: await sd.segment(sd.random_writes(2), f"n{i}", NOW + i)}
    await apply_retention(repo, "web01", policy, NOW + 10, chunk_bytes=CHUNK)
    assert await list_checkpoints(repo, sd.disk_id) == [oldest.seq - 1, newest.seq - 1]
    for i in range(3, 8):
        expected[f"n{i}"] = {sd.disk_id: await sd.segment(sd.random_writes(2), f"n{i}", NOW + i)}
    report = await apply_retention(repo, "web01", policy, NOW + 10, chunk_bytes=CHUNK)
    assert await list_checkpoints(repo, sd.disk_id) == [oldest.seq - 1, sd.seq - 1]
    # 10 s later the point 2 h old left the keep-all window and thinned the one at 2.5 h
    assert await failover_all(repo, tmp_path, expected) == set(report.kept_points)
    assert {f"n{i}" for i in range(8)} <= set(report.kept_points) and len(report.kept_points) == 6 + 8
    assert not (await verify_repository(repo)).problems


async def test_group_points_survive_on_every_member_or_on_none(repo, tmp_path):
    """Two members with clocks 40 s apart, a group point every 30 min and solo points on one member only:
    after each member's own pass, every group tag left is complete and fails over bit-exact on both."""
    from lifeboat.cli.points import group_points
    members = ("db01", "web01")
    disks = {m: SyntheticDisk(repo, m, "sda", DISK_BYTES, seed=i + 5) for i, m in enumerate(members)}
    expected: dict[str, dict[str, str]] = {}
    for i in range(25):
        age = (24 - i) * 30 * 60.0
        for m, sd in disks.items():
            skew = 40.0 if m == "db01" else 0.0
            pid = f"{m}-g{i:02d}"
            expected[pid] = {sd.disk_id: await sd.segment(sd.random_writes(2), pid, NOW - age + skew, "crash",
                                                          group="g1", group_tag=f"t{i:02d}", group_members=members)}
            if m == "db01" and i % 6 == 3:
                spid = f"db01-s{i:02d}"
                expected[spid] = {sd.disk_id: await sd.segment(sd.random_writes(2), spid, NOW - age + 600)}
    policy = RetentionPolicy(6 * HOUR, 2 * HOUR)
    tags_before = {g.tag for g in group_points(await repo.list_points(), "g1").points}
    for m in members:
        await apply_retention(repo, m, policy, NOW, chunk_bytes=CHUNK)
    listing = group_points(await repo.list_points(), "g1")
    assert not listing.incomplete, listing.incomplete
    kept_tags = {g.tag for g in listing.points}
    assert 5 + 4 <= len(kept_tags) < len(tags_before)
    for m in members:
        assert await failover_all(repo, tmp_path, expected, m)
        tags = {e.group_tag for e in await repo.list_points() if e.machine == m and e.group_tag}
        assert tags == kept_tags


async def test_checkpoints_are_sparse_and_incremental_builds_share_unchanged_chunks(repo, tmp_path):
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES)
    expected = {}
    data = lambda n: sd.rng.randbytes(n)   # noqa: E731
    expected["a"] = {sd.disk_id: await sd.segment([(0, data(CHUNK)), (3 * CHUNK, data(4096))], "a", NOW - 9 * HOUR)}
    expected["b"] = {sd.disk_id: await sd.segment([(5 * CHUNK, data(8192))], "b", NOW - 6 * HOUR)}
    expected["c"] = {sd.disk_id: await sd.segment([(5 * CHUNK + 8192, data(512))], "c", NOW - 3 * HOUR)}
    expected["d"] = {sd.disk_id: await sd.segment([(9 * CHUNK, data(CHUNK)), (0, bytes(sd.image[:4096]))], "d", NOW)}
    policy = RetentionPolicy(8 * HOUR, HOUR, checkpoint_interval_segments=0)
    await apply_retention(repo, "web01", policy, NOW, chunk_bytes=CHUNK)   # drops a: checkpoint after seg 1
    first = await read_manifest(repo, sd.disk_id, 1)
    assert [i for i, _ in first.refs] == [0, 3]          # 16 chunks, 14 of them zero: not stored
    chunks_before = set(await repo.backend.list(f"checkpoints/{sd.disk_id}/chunks/"))
    report = await apply_retention(repo, "web01", policy, NOW + 3 * HOUR, chunk_bytes=CHUNK)   # drops b
    second = await read_manifest(repo, sd.disk_id, 2)
    assert [i for i, _ in second.refs] == [0, 3, 5]
    assert dict(second.refs)[0] == dict(first.refs)[0] and dict(second.refs)[3] == dict(first.refs)[3]
    chunks_after = set(await repo.backend.list(f"checkpoints/{sd.disk_id}/chunks/"))
    assert chunks_before < chunks_after and len(chunks_after - chunks_before) == 1   # only chunk 5 was written
    assert await list_checkpoints(repo, sd.disk_id) == [2] and report.segments_deleted == 1
    # Chunk 0 rewritten with its own bytes by segment 4: the same id; chunk 5 changed: a new object, the
    # old one collected once no manifest refers to it.
    await apply_retention(repo, "web01", RetentionPolicy(0, 0, 0), NOW + 3 * HOUR, chunk_bytes=CHUNK)
    third = await read_manifest(repo, sd.disk_id, 3)
    assert [i for i, _ in third.refs] == [0, 3, 5] and dict(third.refs)[0] == dict(first.refs)[0]
    assert dict(third.refs)[5] != dict(second.refs)[5]
    assert sorted(await repo.backend.list(f"checkpoints/{sd.disk_id}/chunks/")) == sorted(
        ckfmt.chunk_name(sd.disk_id, cid) for _, cid in third.refs)
    assert await failover_all(repo, tmp_path, expected) == {"d"}
    assert not (await verify_repository(repo)).problems


def _require_loop_devices() -> None:
    import os
    import shutil
    if os.geteuid() == 0 and shutil.which("losetup") and os.path.exists("/dev/loop-control"):
        return
    if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":
        pytest.fail("this test needs root and loop devices", pytrace=False)
    pytest.skip("needs root and loop devices")


async def test_failover_onto_a_used_block_device_zeroes_what_the_checkpoint_leaves_out(repo, tmp_path):
    """A device holds old data, unlike a fresh sparse image: chunks a checkpoint does not store (zeros)
    must be written as zeros."""
    import subprocess
    _require_loop_devices()
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES)
    await sd.segment([(0, sd.rng.randbytes(CHUNK)), (3 * CHUNK, sd.rng.randbytes(CHUNK))], "a", NOW - 5 * HOUR)
    sha = await sd.segment([(5 * CHUNK, sd.rng.randbytes(4096))], "b", NOW, zeros=[(3 * CHUNK, CHUNK)])
    await drop_points_except(repo, "web01", "b", chunk_bytes=CHUNK)
    assert [i for i, _ in (await read_manifest(repo, sd.disk_id, 1)).refs] == [0, 3]   # 14 chunks not stored
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xff" * DISK_BYTES)   # the old disk's contents
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        [entry] = await repo.list_points(sd.disk_id)
        result = await materialize(repo, entry, dev)
        assert result.checkpoint_seq == 1
        with open(dev, "rb") as f:
            assert hashlib.sha256(f.read(DISK_BYTES)).hexdigest() == sha
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
