"""Recovery-point retention: thinning of the catalog, checkpoints and compaction of the log."""

# INTERFACE CONTRACT: the configuration-server role (lifeboat.control) calls these; the signatures are
# fixed (only optional parameters and fields with defaults are added).
#
# Thinning (the reference design's): a machine's points form streams, its own points and one stream per
# consistency group; in each stream every point younger than keep_all_seconds is kept, older points inside
# the retention window keep the newest point of each bucket (THINNING_TABLE: the bucket width grows with
# the window; buckets are aligned to the epoch so a kept point stays kept on the next pass), and the
# newest point and the newest app-consistent point inside the window are always kept. A group point is
# judged in its group's stream by the group's time (the earliest member's `created`), so every member
# decides the same for the same tag; a tag some member lacks (aborted, never failover-able) is kept only
# while it is younger than keep_all_seconds (it may still be uploading).
#
# Enforcement order (each step leaves every kept point recoverable if the process dies after it):
# 1. delete the catalog entries of dropped points; 2. per disk, build the checkpoint at seq C = (oldest
# kept point's seq - 1): new chunks first, then its manifest; 3. delete segments 1..C; 4. delete older
# manifests, then the chunks no manifest refers to; 5. when checkpoint_interval_segments segments lie
# between the newest checkpoint and the newest kept point, a checkpoint just before that point (and
# the ones between C and it go: a speed-up only, every segment after C is still there). Segments after
# C are never touched, so the newest segment (which the uploader and ProcessServer._adopt number from)
# always stays. A disk without any kept point (a disk still in its initial copy) is left alone.
# One pass per machine at a time (the configuration server serialises its jobs); a failover that runs
# during a pass may find a checkpoint or segment it started from gone and fails (never silently wrong).

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..core.catalog import PointEntry, point_object_name
from ..core.checkpoint import CHUNK_BYTES, manifest_name
from ..core.errors import LifeboatError, PointNotFound
from .checkpoints import build_checkpoint, collect_chunks, delete_quietly, list_checkpoints
from .repo import Repository, segment_name

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class RetentionPolicy:
    """What a replication policy says about keeping points (reference design's thinning)."""

    retention_seconds: float = 1 * DAY   # how far back points are kept (0 = only the latest point)
    keep_all_seconds: float = 2 * HOUR   # every point younger than this is kept
    # A checkpoint just before the newest point once this many segments lie between it and the newest
    # checkpoint, so failover of recent points replays at most this many segments however long the
    # window is (0: only the compaction checkpoint). 288 = one day of 5-minute points.
    checkpoint_interval_segments: int = 288

    def __post_init__(self) -> None:
        for name in ("retention_seconds", "keep_all_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RetentionPolicy.{name} must be a finite number of seconds >= 0, got {value!r}")
        n = self.checkpoint_interval_segments
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"RetentionPolicy.checkpoint_interval_segments must be an integer >= 0, got {n!r}")


@dataclass
class RetentionReport:
    """What one retention pass did, for the job log, metrics and the CLI."""

    machine: str
    kept_points: list[str] = field(default_factory=list)
    dropped_points: list[str] = field(default_factory=list)
    checkpoints_written: list[str] = field(default_factory=list)   # object names
    deleted_objects: list[str] = field(default_factory=list)       # object names
    bytes_before: int = 0
    bytes_after: int = 0
    segments_deleted: int = 0

    def to_json(self) -> dict:
        return {"machine": self.machine, "kept_points": self.kept_points, "dropped_points": self.dropped_points,
                "checkpoints_written": self.checkpoints_written, "deleted_objects": self.deleted_objects,
                "segments_deleted": self.segments_deleted, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after}


# (window up to, bucket width): the reference's "1 per hour / 2 h / 4 h by window".
THINNING_TABLE: tuple[tuple[float, float], ...] = (
    (1 * DAY, 1 * HOUR),
    (7 * DAY, 2 * HOUR),
    (math.inf, 4 * HOUR),
)


def bucket_seconds(retention_seconds: float) -> float:
    """Width of a thinning bucket for a retention window (THINNING_TABLE)."""
    return next(width for limit, width in THINNING_TABLE if retention_seconds <= limit)


class InjectedCrash(LifeboatError):
    """Injected failure at retention step '{}' (test hook)."""


@dataclass
class _Point:
    point_id: str
    created: float
    app: bool
    stream: str        # "" for the machine's own points, else the group name
    complete_group: bool


def _points(entries: list[PointEntry], group_times: dict[tuple[str, str], float] | None) -> list[_Point]:
    by_id: dict[str, list[PointEntry]] = {}
    for e in entries:
        by_id.setdefault(e.point_id, []).append(e)
    out = []
    for pid, es in by_id.items():
        group, tag = es[0].group, es[0].group_tag
        created = min(e.created for e in es)
        complete = True
        if group:
            if group_times is not None:
                complete = (group, tag) in group_times
                created = group_times.get((group, tag), created)
        out.append(_Point(pid, created, all(e.consistency == "app" for e in es), group, complete))
    return out


def points_to_keep(points: list[PointEntry], policy: RetentionPolicy, now: float,
                   group_times: dict[tuple[str, str], float] | None = None) -> set[str]:
    """Point ids (of one machine) that the policy keeps at `now`; pure, no I/O.

    `group_times` maps each complete group point (group, tag) to the group's time (the earliest member's
    `created`); when given, group points not in it are incomplete and kept only inside the keep-all
    window. Without it every group point counts as complete, timed by this machine's entries.
    """
    window_start = now - policy.retention_seconds
    keep_all_start = max(now - policy.keep_all_seconds, window_start)
    width = bucket_seconds(policy.retention_seconds)
    keep: set[str] = set()
    streams: dict[str, list[_Point]] = {}
    for p in _points(points, group_times):
        if not p.complete_group:
            if p.created >= keep_all_start:
                keep.add(p.point_id)
            continue
        streams.setdefault(p.stream, []).append(p)
    for stream in streams.values():
        stream.sort(key=lambda p: (p.created, p.point_id))
        keep.add(stream[-1].point_id)              # never leave a stream (a machine) without a point
        apps = [p for p in stream if p.app and p.created >= window_start]
        if apps:
            keep.add(apps[-1].point_id)
        newest_in_bucket: dict[int, _Point] = {}
        for p in stream:
            if p.created >= keep_all_start:
                keep.add(p.point_id)
            elif p.created >= window_start:
                newest_in_bucket[math.floor(p.created / width)] = p   # sorted: the last one is the newest
        keep.update(p.point_id for p in newest_in_bucket.values())
    return keep


def complete_group_times(entries: list[PointEntry]) -> dict[tuple[str, str], float]:
    """(group, tag) -> group time for every tag each member has on all its disks (FORMATS.md section 3)."""
    disks_of: dict[str, set[str]] = {}
    for e in entries:
        disks_of.setdefault(e.machine, set()).add(e.disk_id)
    widest: dict[str, int] = {}
    per_point: dict[tuple[str, str], set[str]] = {}
    for e in entries:
        per_point.setdefault((e.machine, e.point_id), set()).add(e.disk_id)
    for (machine, _), disks in per_point.items():
        widest[machine] = max(widest.get(machine, 0), len(disks))
    tags: dict[tuple[str, str], dict] = {}
    for e in entries:
        if not e.group:
            continue
        t = tags.setdefault((e.group, e.group_tag), {"members": set(), "have": {}, "created": math.inf})
        t["members"].update(e.group_members)
        t["have"].setdefault(e.machine, set()).add(e.disk_id)
        t["created"] = min(t["created"], e.created)
    out = {}
    for key, t in tags.items():
        if t["members"] and all(len(t["have"].get(m, ())) == widest.get(m, -1) for m in t["members"]):
            out[key] = t["created"]
    return out


async def _machine_bytes(repo: Repository, machine: str) -> int:
    """Bytes of the machine's segments, checkpoints and catalog entries (machine names have no '.')."""
    total = 0
    for prefix in (f"disks/{machine}.", f"checkpoints/{machine}.", f"points/{machine}."):
        total += sum((await repo.backend.list_sizes(prefix)).values())
    return total


async def _machine_entries(repo: Repository, machine: str) -> tuple[list[PointEntry], list[PointEntry]]:
    # A damaged catalog entry raises here: its seq is unknown, so nothing may be deleted on its account.
    everything = await repo.list_points()
    return everything, [e for e in everything if e.machine == machine]


async def _enforce(repo: Repository, machine: str, mine: list[PointEntry], keep: set[str],
                   report: RetentionReport, work_dir: str | None, chunk_bytes: int,
                   fail_at: str | None, interval: int = 0) -> None:
    async def step(name: str) -> None:
        if fail_at == name:
            raise InjectedCrash(name)

    report.kept_points = sorted({e.point_id for e in mine if e.point_id in keep})
    report.dropped_points = sorted({e.point_id for e in mine if e.point_id not in keep})
    # 1. The catalog first: once an entry is gone nothing promises its log position any more.
    for e in mine:
        if e.point_id not in keep:
            name = point_object_name(e.disk_id, e.point_id)
            if await delete_quietly(repo, name):
                report.deleted_objects.append(name)
    await step("catalog_pruned")
    kept_by_disk: dict[str, list[PointEntry]] = {}
    for e in mine:
        if e.point_id in keep:
            kept_by_disk.setdefault(e.disk_id, []).append(e)
    for disk_id, kept in sorted(kept_by_disk.items()):
        cut = min(e.seq for e in kept) - 1   # the checkpoint seq: the image just before the oldest kept point
        if cut >= 1:
            await _compact(repo, disk_id, cut, report, work_dir, chunk_bytes, step)
        if interval:
            await _recent_checkpoint(repo, disk_id, max(cut, 0), max(e.seq for e in kept) - 1, interval, report,
                                     work_dir, chunk_bytes)


async def _delete_manifests(repo: Repository, disk_id: str, seqs: list[int], report: RetentionReport) -> None:
    for c in seqs:
        if await delete_quietly(repo, manifest_name(disk_id, c)):
            report.deleted_objects.append(manifest_name(disk_id, c))


async def _compact(repo: Repository, disk_id: str, cut: int, report: RetentionReport, work_dir: str | None,
                   chunk_bytes: int, step) -> None:
    """Checkpoint at `cut`, then delete segments 1..cut, the checkpoints before it and unreferenced chunks."""
    segments = await repo.list_segments(disk_id)
    seqs = await list_checkpoints(repo, disk_id)
    if cut not in seqs:
        if not any(s <= cut for s in segments):
            return   # nothing behind the cut to compact
        async def between(stage: str) -> None:
            await step(stage)
        _manifest, written = await build_checkpoint(repo, disk_id, cut, work_dir, chunk_bytes, between)
        report.checkpoints_written += [n for n in written if n.endswith("/manifest")]
    await step("manifest_published")
    # Segments the checkpoint now stands for; those after `cut` (and so the newest) stay.
    for s in segments:
        if s <= cut and await delete_quietly(repo, segment_name(disk_id, s)):
            report.deleted_objects.append(segment_name(disk_id, s))
            report.segments_deleted += 1
    await step("segments_deleted")
    # Older checkpoints (a newer one, a faster start for newer points, stays valid), then the chunks no
    # remaining manifest refers to: a listed checkpoint never lacks a chunk.
    await _delete_manifests(repo, disk_id, [c for c in await list_checkpoints(repo, disk_id) if c < cut], report)
    report.deleted_objects += await collect_chunks(repo, disk_id)


async def _recent_checkpoint(repo: Repository, disk_id: str, cut: int, target: int, interval: int,
                             report: RetentionReport, work_dir: str | None, chunk_bytes: int) -> None:
    """Keep failover of the newest points short: a checkpoint at `target` (the newest kept point's seq - 1)
    once `interval` segments separate it from the newest checkpoint; then only the compaction checkpoint
    and this one stay (the ones between are a speed-up only: every segment after `cut` is still there).
    Incremental builds share unchanged chunks, so this costs the bytes changed since the last one."""
    seqs = await list_checkpoints(repo, disk_id)
    if target <= cut or target - max(seqs, default=0) < interval:
        return
    _manifest, written = await build_checkpoint(repo, disk_id, target, work_dir, chunk_bytes)
    report.checkpoints_written += [n for n in written if n.endswith("/manifest")]
    await _delete_manifests(repo, disk_id, [c for c in await list_checkpoints(repo, disk_id) if cut < c < target],
                            report)
    report.deleted_objects += await collect_chunks(repo, disk_id)


async def apply_retention(repo: Repository, machine: str, policy: RetentionPolicy,
                          now: float | None = None, *, work_dir: str | None = None,
                          chunk_bytes: int = CHUNK_BYTES, fail_at: str | None = None) -> RetentionReport:
    """Drop thinned points of `machine` from the catalog, compact the log behind the oldest kept
    point into a checkpoint, delete objects no kept point needs. Never breaks a kept point.

    `now` defaults to the wall clock (tests and `lifeboat retention apply --now` pass a later one to
    compress time); `work_dir` holds the sparse temporary image a checkpoint is built in; `fail_at`
    (tests only) raises InjectedCrash after the named step: catalog_pruned, chunks_published,
    manifest_published, segments_deleted.
    """
    now = time.time() if now is None else now
    everything, mine = await _machine_entries(repo, machine)
    if not mine:
        raise PointNotFound(f"any point of machine {machine}")
    report = RetentionReport(machine, bytes_before=await _machine_bytes(repo, machine))
    keep = points_to_keep(mine, policy, now, complete_group_times(everything))
    await _enforce(repo, machine, mine, keep, report, work_dir, chunk_bytes, fail_at,
                   policy.checkpoint_interval_segments)
    report.bytes_after = await _machine_bytes(repo, machine)
    return report


async def drop_points_except(repo: Repository, machine: str, keep_point_id: str, *,
                             work_dir: str | None = None, chunk_bytes: int = CHUNK_BYTES,
                             fail_at: str | None = None) -> RetentionReport:
    """Failover commit: keep only `keep_point_id` (and what it needs) for `machine`."""
    _everything, mine = await _machine_entries(repo, machine)
    if not any(e.point_id == keep_point_id for e in mine):
        raise PointNotFound(f"{keep_point_id} of machine {machine}")
    report = RetentionReport(machine, bytes_before=await _machine_bytes(repo, machine))
    await _enforce(repo, machine, mine, {keep_point_id}, report, work_dir, chunk_bytes, fail_at)
    report.bytes_after = await _machine_bytes(repo, machine)
    return report
