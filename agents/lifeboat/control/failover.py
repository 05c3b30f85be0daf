"""Failover choices (latest, latest-processed, latest-app, latest-group, <id>) and the failover/cleanup/commit work."""

from __future__ import annotations

import asyncio
import json
import os
import time

from ..cli.points import MachinePoint, group_points
from ..core import logging as log
from ..core.catalog import PointEntry
from ..repository import retention
from ..repository.materialize import materialize
from .inventory import InventoryError
from .status import points_by_machine
from .store import transaction

logger = log.get("lifeboat.control.failover")
CHOICES = ("latest", "latest-processed", "latest-app", "latest-group")
LATEST_WAIT_SECONDS = 300.0      # `latest` waits this long for the newest known point to be uploaded
LATEST_POLL_SECONDS = 0.5


def refuse(status: int, code: str, message: str) -> InventoryError:
    return InventoryError(status, code, message)


def complete_points(entries: list[PointEntry], machine: dict) -> list[MachinePoint]:
    return [p for p in points_by_machine(entries, {machine["name"]: machine}).get(machine["name"], []) if p.complete]


def choose(entries: list[PointEntry], machine: dict, policy: dict, choice: str, now: float) -> MachinePoint:
    """The point a failover of one machine uses; refusals say what to choose instead."""
    name = machine["name"]
    if machine["group"] and choice != "latest-group" and not choice.startswith("group:"):
        raise refuse(409, "group_member", f"machine {name} is in consistency group {machine['group']}: failing it over "
                     f"alone would not match the other members' instant; fail over the whole group with "
                     f"'lifeboat failover --group {machine['group']} --point latest-group ...'")
    points = complete_points(entries, machine)
    if not points:
        raise refuse(409, "no_point", f"machine {name} has no complete recovery point yet: wait for the first cycle "
                     "to be uploaded ('lifeboat status')")
    if choice in ("latest", "latest-processed"):
        return points[-1]
    if choice == "latest-app":
        for p in reversed(points):
            if p.consistency == "app":
                return p
        raise refuse(409, "no_point", f"machine {name} has no app-consistent point: its policy takes one every "
                     f"{policy['app_interval_seconds']:.0f} s when the agent has a pre/post script; use latest-processed")
    if choice == "latest-group":
        raise refuse(409, "not_in_group", f"machine {name} is in no consistency group: use latest or latest-app")
    for p in points:
        if p.point_id == choice:
            if p.created < now - policy["retention_seconds"] and p is not points[-1]:
                raise refuse(409, "outside_retention", f"point {choice} was taken {(now - p.created) / 86400:.2f} days "
                             f"ago, outside policy {policy['name']}'s retention of "
                             f"{policy['retention_seconds'] / 86400:.2f} days (it is thinned away at the next pass): "
                             "choose a newer point ('lifeboat points --machine " + name + "')")
            return p
    raise refuse(404, "not_found", f"machine {name} has no complete point {choice!r}: 'lifeboat points --machine "
                 f"{name}' lists them, or use {', '.join(CHOICES[:3])}")


def target_paths(to: str, disks: list[str], test: bool, job_id: str) -> dict[str, str]:
    """Where each disk goes: a test failover's images are clearly named and per job (isolated)."""
    suffix = f".test-failover-{job_id}.img" if test else ".img"
    return {d: os.path.join(to, d + suffix) for d in sorted(disks)}


async def wait_for_known(list_entries, machine: dict, known_point: str | None, deadline: float) -> list[PointEntry]:
    """`latest`: the newest point the agent reported may still be on its way from the cache; wait for it."""
    while True:
        entries = await list_entries()
        if known_point is None or any(p.point_id == known_point for p in complete_points(entries, machine)):
            return entries
        if time.monotonic() > deadline:
            logger.warning("latest known point not uploaded in time; using the latest processed", MACHINE=machine["name"],
                           POINT=known_point)
            return entries
        await asyncio.sleep(LATEST_POLL_SECONDS)


async def materialize_point(repo, point: MachinePoint, targets: dict[str, str], overwrite: bool, progress) -> list[dict]:
    out = []
    for i, (disk_id, path) in enumerate(targets.items()):
        def step(done: int, total: int, disk_id=disk_id) -> None:
            progress(f"{disk_id} segments ({i + 1}/{len(targets)} disks)", done, total)

        res = await materialize(repo, point.disks[disk_id], path, overwrite, step)
        out.append({"disk_id": res.disk_id, "path": res.path, "segments": res.segments,
                    "image_digest": res.image_digest, "verified": True})
    return out


def record_failover(conn, machine: str, job_id: str, test: bool, point_id: str, targets: dict[str, str]) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO failovers VALUES (?, ?, ?, ?, ?, 'active', ?)",
                     (machine, job_id, int(test), point_id, json.dumps(targets), time.time()))
        if not test:
            conn.execute("UPDATE machines SET state = 'failed-over' WHERE name = ?", (machine,))


def active_failovers(conn, machine: str, test: bool) -> list[dict]:
    rows = conn.execute("SELECT * FROM failovers WHERE machine = ? AND test = ? AND state = 'active' ORDER BY created",
                        (machine, int(test)))
    return [{"job_id": r["job_id"], "point_id": r["point_id"], "targets": json.loads(r["targets"]),
             "created": r["created"]} for r in rows]


def set_failover_state(conn, machine: str, job_id: str, state: str) -> None:
    with transaction(conn):
        conn.execute("UPDATE failovers SET state = ? WHERE machine = ? AND job_id = ?", (state, machine, job_id))


def remove_targets(targets: dict[str, str]) -> list[str]:
    removed = []
    for path in targets.values():
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


async def commit(repo, machine: str, point_id: str) -> dict:
    """Failover commit: the other points of the machine go (repository/retention.py does the dropping)."""
    report = await retention.drop_points_except(repo, machine, point_id)
    return {"kept_points": report.kept_points, "dropped_points": report.dropped_points,
            "deleted_objects": len(report.deleted_objects), "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after}


def group_choice(entries: list[PointEntry], group: str, choice: str):
    from ..cli.points import resolve_group

    return resolve_group(group_points(entries, group), group, "latest-group" if choice == "latest" else choice)
