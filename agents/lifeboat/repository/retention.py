"""Recovery-point retention: thinning of the catalog, checkpoints and compaction of the log."""

# INTERFACE CONTRACT (fixed; the implementation is filled in on the `retention` branch).
# The configuration-server role (lifeboat.control) calls these; keep the signatures.

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.catalog import PointEntry
from .repo import Repository

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class RetentionPolicy:
    """What a replication policy says about keeping points (reference design's thinning)."""

    retention_seconds: float = 1 * DAY   # how far back points are kept (0 = only the latest point)
    keep_all_seconds: float = 2 * HOUR   # every point younger than this is kept


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


def points_to_keep(points: list[PointEntry], policy: RetentionPolicy, now: float) -> set[str]:
    """Point ids (of one machine) that the policy keeps at `now`; pure, no I/O."""
    raise NotImplementedError


async def apply_retention(repo: Repository, machine: str, policy: RetentionPolicy,
                          now: float | None = None) -> RetentionReport:
    """Drop thinned points of `machine` from the catalog, compact the log behind the oldest kept
    point into a checkpoint, delete objects no kept point needs. Never breaks a kept point."""
    raise NotImplementedError


async def drop_points_except(repo: Repository, machine: str, keep_point_id: str) -> RetentionReport:
    """Failover commit: keep only `keep_point_id` (and what it needs) for `machine`."""
    raise NotImplementedError
