"""`lifeboat status`: one row per protected machine from the inventory, its heartbeat and the repository catalog."""

from __future__ import annotations

import time

from ..cli.points import MachinePoint, machine_points
from ..core.catalog import PointEntry

TIERS = ("data", "extents", "bitmap", "resync")         # change log tiers, best first
NO_HEARTBEAT_CRITICAL_SECONDS = 15 * 60                  # the operations list's "no heartbeat 15 min" alert


def points_by_machine(entries: list[PointEntry], inventory: dict[str, dict]) -> dict[str, list[MachinePoint]]:
    """Machine points, complete when every disk the inventory lists for the machine has its entry."""
    out: dict[str, list[MachinePoint]] = {}
    for p in machine_points(entries):
        m = inventory.get(p.machine)
        if m is not None and m["disks"]:
            p.complete = {f"{p.machine}.{d}" for d in m["disks"]} <= set(p.disks)
        out.setdefault(p.machine, []).append(p)
    return out


def machine_status(machine: dict, policy: dict, heartbeat: tuple[float, dict] | None, points: list[MachinePoint],
                   cache_backlog: dict[str, int], now: float | None = None) -> dict:
    now = time.time() if now is None else now
    complete = [p for p in points if p.complete]
    latest = complete[-1] if complete else None
    app = next((p for p in reversed(complete) if p.consistency == "app"), None)
    received, report = heartbeat if heartbeat else (None, {})
    disks_report = report.get("disks", {}) if isinstance(report.get("disks"), dict) else {}
    disks = {}
    for d in machine["disks"]:
        disk_id = f"{machine['name']}.{d}"
        r = disks_report.get(disk_id, {})
        disks[disk_id] = {"tracker": r.get("tracker"), "tier": r.get("tier"), "tier_reason": r.get("tier_reason"),
                          "backlog_bytes": int(r.get("backlog_bytes", 0)) + cache_backlog.get(disk_id, 0),
                          "churn_bytes_per_second": float(r.get("churn_bytes_per_second", 0.0)),
                          "last_resync_reason": r.get("last_resync_reason"), "last_resync_at": r.get("last_resync_at")}
    tiers = [x["tier"] for x in disks.values() if x["tier"] in TIERS]
    resyncs = sorted((x["last_resync_at"], x["last_resync_reason"], d) for d, x in disks.items()
                     if x["last_resync_reason"] and isinstance(x["last_resync_at"], (int, float)))
    rpo = now - latest.created if latest else None
    reasons, health = [], "healthy"
    if received is None:
        reasons.append("no heartbeat from the agent yet")
        health = "critical"
    elif now - received > NO_HEARTBEAT_CRITICAL_SECONDS:
        reasons.append(f"no heartbeat for {now - received:.0f} s")
        health = "critical"
    if latest is None:
        reasons.append("no complete recovery point yet")
        health = "critical" if received is None else ("warning" if health == "healthy" else health)
    elif rpo is not None and rpo > policy["rpo_threshold_seconds"]:
        reasons.append(f"RPO {rpo:.0f} s over the policy's threshold {policy['rpo_threshold_seconds']:.0f} s")
        health = "warning" if health == "healthy" else health
    if "resync" in tiers:
        reasons.append("a disk needs a resync")
        health = "warning" if health == "healthy" else health
    return {
        "machine": machine["name"], "state": report.get("state", "unknown") if machine["state"] == "protected"
        else machine["state"], "protection": machine["state"],
        "powered_off": machine["state"] in ("reprotecting", "failing-back"),   # control/failback.py POWERED_OFF_STATES
        "policy": machine["policy"], "group": machine["group"],
        "process_server": machine["process_server"], "move_to": machine["move_to"],
        "rpo_seconds": None if rpo is None else round(rpo, 3),
        "latest_point": latest.point_id if latest else None,
        "last_app_point": {"point_id": app.point_id, "created": app.created} if app else None,
        "backlog_bytes": sum(x["backlog_bytes"] for x in disks.values()),
        "churn_bytes_per_second": round(sum(x["churn_bytes_per_second"] for x in disks.values()), 1),
        "tracking_tier": max(tiers, key=TIERS.index) if tiers else None,
        "last_resync": {"disk": resyncs[-1][2], "reason": resyncs[-1][1], "at": resyncs[-1][0]} if resyncs else None,
        "heartbeat_age_seconds": None if received is None else round(now - received, 3),
        "health": health, "health_reasons": reasons, "disks": disks,
    }
