"""Group per-disk catalog entries into machine points and resolve --point choices."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.catalog import PointEntry
from ..core.errors import LifeboatError, PointNotFound


@dataclass
class MachinePoint:
    point_id: str
    machine: str
    created: float
    consistency: str
    disks: dict[str, PointEntry]
    complete: bool = True


def machine_points(entries: list[PointEntry]) -> list[MachinePoint]:
    by_id: dict[tuple[str, str], MachinePoint] = {}
    for e in entries:
        mp = by_id.get((e.machine, e.point_id))
        if mp is None:
            mp = by_id[(e.machine, e.point_id)] = MachinePoint(e.point_id, e.machine, e.created, e.consistency, {})
        mp.disks[e.disk_id] = e
        if e.consistency != mp.consistency:  # disks disagree: the weaker label wins
            mp.consistency = "none"
    points = sorted(by_id.values(), key=lambda p: (p.created, p.point_id))
    # A machine point is complete once every disk the machine replicates has its entry; the
    # widest point of a machine tells its disks (until the control plane knows them, issue 5).
    widest: dict[str, int] = {}
    for p in points:
        widest[p.machine] = max(widest.get(p.machine, 0), len(p.disks))
    for p in points:
        p.complete = len(p.disks) == widest[p.machine]
    return points


def resolve(points: list[MachinePoint], choice: str, machine: str | None) -> MachinePoint:
    if machine:
        points = [p for p in points if p.machine == machine]
    machines = sorted({p.machine for p in points})
    if choice in ("latest", "latest-crash", "latest-app"):
        if len(machines) > 1:
            raise LifeboatError(f"the repository holds points of {len(machines)} machines ({', '.join(machines)}): pass --machine")
        wanted = {"latest": None, "latest-crash": ("crash", "app"), "latest-app": ("app",)}[choice]
        for p in reversed(points):
            if p.complete and (wanted is None or p.consistency in wanted):
                return p
        raise PointNotFound(choice)
    for p in points:
        if p.point_id == choice:
            if not p.complete:
                raise LifeboatError(f"point {choice} is not complete yet: {len(p.disks)} disks have it; retry once uploads catch up")
            return p
    raise PointNotFound(choice)
