"""Group per-disk catalog entries into machine points and resolve --point choices."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.catalog import PointEntry
from ..core.errors import LifeboatError, PointIncomplete, PointNotFound


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
    points = _in_log_order(sorted(by_id.values(), key=lambda p: (p.created, p.point_id)))
    # A machine point is complete once every disk the machine replicates has its entry; the
    # widest point of a machine tells its disks (until the control plane knows them, issue 5).
    widest: dict[str, int] = {}
    for p in points:
        widest[p.machine] = max(widest.get(p.machine, 0), len(p.disks))
    for p in points:
        p.complete = len(p.disks) == widest[p.machine]
    return points


def _in_log_order(points: list[MachinePoint]) -> list[MachinePoint]:
    """Reorder each machine's points by their position in its disks' logs, keeping the slots the
    machines' points take in wall-time order. Wall clocks jump (NTP steps, a wrong RTC); the log
    position is what says which state came later, so "latest" never picks an older one."""
    by_machine: dict[str, list[MachinePoint]] = {}
    for p in points:
        by_machine.setdefault(p.machine, []).append(p)
    ordered: dict[str, list[MachinePoint]] = {}
    for machine, mine in by_machine.items():
        shared = set.intersection(*(set(p.disks) for p in mine))
        if shared:  # one disk every point has: its (segment, frame) positions are totally ordered
            ref = min(shared)
            mine = sorted(mine, key=lambda p: (p.disks[ref].seq, p.disks[ref].frame_index))
        ordered[machine] = mine[::-1]
    return [ordered[p.machine].pop() for p in points]


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


# --- consistency groups ---------------------------------------------------------------------------

CONSISTENCY_RANK = {"none": 0, "crash": 1, "app": 2}   # a group point is as consistent as its weakest member
GROUP_CHOICES = ("latest-group", "latest", "latest-crash", "latest-app")


class GroupFailoverRefused(LifeboatError):
    """{}"""


@dataclass
class GroupPoint:
    group: str
    tag: str
    created: float                      # the earliest member point's
    consistency: str                    # the weakest member point's
    members: dict[str, MachinePoint]    # machine -> its point for the tag


@dataclass
class GroupListing:
    points: list[GroupPoint]            # complete group points, oldest first
    incomplete: dict[str, list[str]]    # tag -> members without a complete point for it (left out)


def entry_group(entry: PointEntry) -> tuple[str, str, tuple[str, ...]]:
    """(group, tag, members) of a catalog entry; entries from before groups have none."""
    return (getattr(entry, "group", "") or "", getattr(entry, "group_tag", "") or "",
            tuple(getattr(entry, "group_members", ()) or ()))


def point_group(point: MachinePoint) -> str:
    """The consistency group a machine point was taken for ("" when none of its disks says one)."""
    return next((g for g, _, _ in map(entry_group, point.disks.values()) if g), "")


def group_points(entries: list[PointEntry], group: str) -> GroupListing:
    """The group points of `group`: a tag is listed when every machine in its group_members has a
    complete machine point (all its disks) whose entries all carry <group, tag>."""
    found: dict[str, dict[str, MachinePoint]] = {}
    members: dict[str, set[str]] = {}
    for mp in machine_points(entries):   # completeness is judged against all of a machine's points
        labels = {entry_group(e)[:2] for e in mp.disks.values()}
        tags = {tag for g, tag in labels if g == group}
        if not tags:
            continue
        for tag in tags:
            found.setdefault(tag, {})
            members.setdefault(tag, set())
            for e in mp.disks.values():
                if entry_group(e)[:2] == (group, tag):
                    members[tag].update(entry_group(e)[2])
        if len(labels) == 1 and mp.complete:
            (tag,) = tags
            best = found[tag].get(mp.machine)
            if best is None or (mp.created, mp.point_id) > (best.created, best.point_id):
                found[tag][mp.machine] = mp
    listing = GroupListing([], {})
    for tag, have in found.items():
        wanted = members[tag]   # no member list: nothing proves the group complete
        missing = sorted(wanted - set(have))
        if missing or not wanted:
            listing.incomplete[tag] = missing
            continue
        pts = {m: have[m] for m in sorted(wanted)}
        listing.points.append(GroupPoint(
            group, tag, min(p.created for p in pts.values()),
            min((p.consistency for p in pts.values()), key=lambda c: CONSISTENCY_RANK.get(c, 0)), pts))
    listing.points.sort(key=lambda g: (g.created, g.tag))
    return listing


def resolve_group(listing: GroupListing, group: str, choice: str) -> GroupPoint:
    """--point for --group: a tag, latest-group (= latest), latest-crash or latest-app."""
    if choice in GROUP_CHOICES:
        wanted = {"latest-group": None, "latest": None, "latest-crash": ("crash", "app"),
                  "latest-app": ("app",)}[choice]
        for gp in reversed(listing.points):
            if wanted is None or gp.consistency in wanted:
                return gp
        raise PointNotFound(f"{choice} of group {group}")
    for gp in listing.points:
        if gp.tag == choice:
            return gp
    if choice in listing.incomplete:
        lacking = ", ".join(listing.incomplete[choice]) or "its members"
        raise PointIncomplete(choice, f"it is not a point of every member of group {group} ({lacking} lack it: "
                              "an aborted attempt, or uploads still catching up)")
    raise PointNotFound(f"{choice} of group {group}")
