"""Policies, groups, protected machines and disks, heartbeats: the SQL behind the inventory routes."""

from __future__ import annotations

import json
import sqlite3
import time

from .store import transaction

DAY_SECONDS = 86400.0
MAX_RETENTION_SECONDS = 365 * DAY_SECONDS
MAX_GROUP_MEMBERS = 16
POLICY_FIELDS = ("rpo_threshold_seconds", "retention_seconds", "keep_all_seconds", "crash_interval_seconds",
                 "app_interval_seconds")


class InventoryError(Exception):
    """A request the inventory refuses: (status, code, message with the way out)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _policy(row: sqlite3.Row) -> dict:
    return {"name": row["name"], **{f: row[f] for f in POLICY_FIELDS}}


def list_policies(conn) -> list[dict]:
    return [_policy(r) for r in conn.execute("SELECT * FROM policies ORDER BY name")]


def get_policy(conn, name: str) -> dict:
    row = conn.execute("SELECT * FROM policies WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise InventoryError(404, "not_found", f"no replication policy {name!r}: 'lifeboat policy list' shows them, "
                             "'lifeboat policy set NAME ...' creates one")
    return _policy(row)


def check_policy(values: dict) -> dict:
    """Validate a full set of policy fields; the message names the field and the allowed range."""
    for f in POLICY_FIELDS:
        v = values.get(f)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            raise InventoryError(400, "bad_request", f"{f} must be a number of seconds")
    if values["rpo_threshold_seconds"] <= 0 or values["crash_interval_seconds"] <= 0:
        raise InventoryError(400, "bad_request", "rpo_threshold_seconds and crash_interval_seconds must be > 0")
    if not 0 <= values["retention_seconds"] <= MAX_RETENTION_SECONDS:
        raise InventoryError(400, "bad_request", f"retention_seconds {values['retention_seconds']} is outside 0 .. "
                             f"{MAX_RETENTION_SECONDS:.0f} (365 days); the reference allows 0-15 days")
    if values["app_interval_seconds"] < 0 or values["keep_all_seconds"] < 0:
        raise InventoryError(400, "bad_request", "app_interval_seconds and keep_all_seconds must be >= 0")
    if values["keep_all_seconds"] > max(values["retention_seconds"], 0):
        raise InventoryError(400, "bad_request", f"keep_all_seconds ({values['keep_all_seconds']}) exceeds "
                             f"retention_seconds ({values['retention_seconds']}): points are kept at most that long")
    return {f: float(values[f]) for f in POLICY_FIELDS}


def put_policy(conn, name: str, changes: dict) -> tuple[dict, bool]:
    """Create (from the default policy's values) or update a policy; (policy, created)."""
    unknown = set(changes) - set(POLICY_FIELDS) - {"name"}
    if unknown:
        raise InventoryError(400, "bad_request", f"unknown policy field {sorted(unknown)[0]!r} (fields: "
                             f"{', '.join(POLICY_FIELDS)})")
    with transaction(conn):
        row = conn.execute("SELECT * FROM policies WHERE name = ?", (name,)).fetchone()
        base = _policy(row) if row else _policy(conn.execute("SELECT * FROM policies WHERE name = 'default'").fetchone())
        values = check_policy({**base, **{k: v for k, v in changes.items() if k != "name"}})
        conn.execute("INSERT INTO policies (name, " + ", ".join(POLICY_FIELDS) + ", created) VALUES (?, ?, ?, ?, ?, ?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET " + ", ".join(f"{f} = excluded.{f}" for f in POLICY_FIELDS),
                     (name, *[values[f] for f in POLICY_FIELDS], time.time()))
    return get_policy(conn, name), row is None


def list_groups(conn) -> list[dict]:
    out = []
    for g in conn.execute("SELECT name FROM groups ORDER BY name"):
        members = [r[0] for r in conn.execute("SELECT name FROM machines WHERE group_name = ? ORDER BY name", (g[0],))]
        out.append({"name": g[0], "members": members})
    return out


def create_group(conn, name: str) -> dict:
    with transaction(conn):
        conn.execute("INSERT INTO groups (name, created) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, time.time()))
    return next(g for g in list_groups(conn) if g["name"] == name)


def list_process_servers(conn) -> list[dict]:
    rows = conn.execute("SELECT p.name, p.url, p.is_primary, p.registered, "
                        "(SELECT COUNT(*) FROM machines m WHERE m.process_server = p.name) AS machines "
                        "FROM process_servers p ORDER BY p.is_primary DESC, p.name")
    return [{"name": r["name"], "url": r["url"], "primary": bool(r["is_primary"]), "machines": r["machines"]}
            for r in rows]


def _process_server(conn, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM process_servers WHERE name = ?", (name,)).fetchone()
    if row is None:
        known = ", ".join(r[0] for r in conn.execute("SELECT name FROM process_servers ORDER BY name"))
        raise InventoryError(404, "not_found", f"no process server {name!r} (registered: {known}); a scale-out "
                             "registers with 'lifeboat register --process-server NAME --url ...'")
    return row


def get_machine(conn, name: str) -> dict:
    row = conn.execute("SELECT * FROM machines WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise InventoryError(404, "not_found", f"machine {name!r} is not protected: 'lifeboat protect {name} "
                             "--disk sda' protects it ('lifeboat status' lists the protected machines)")
    disks = [r[0] for r in conn.execute("SELECT disk FROM disks WHERE machine = ? ORDER BY disk", (name,))]
    return {"name": row["name"], "policy": row["policy"], "group": row["group_name"],
            "process_server": row["process_server"], "move_to": row["move_to"], "state": row["state"],
            "protected": row["protected"], "disks": disks}


def list_machines(conn) -> list[dict]:
    return [get_machine(conn, r[0]) for r in conn.execute("SELECT name FROM machines ORDER BY name")]


def protect(conn, name: str, disks: list[str], policy: str, group: str | None, process_server: str | None) -> tuple[dict, bool]:
    """Protect a machine (or change an existing protection's disks, policy or group); (machine, created)."""
    with transaction(conn):
        get_policy(conn, policy)
        if group is not None:
            if conn.execute("SELECT 1 FROM groups WHERE name = ?", (group,)).fetchone() is None:
                raise InventoryError(404, "not_found", f"no consistency group {group!r}: create it first with "
                                     f"'lifeboat group create {group}'")
            members = conn.execute("SELECT COUNT(*) FROM machines WHERE group_name = ? AND name != ?",
                                   (group, name)).fetchone()[0]
            if members >= MAX_GROUP_MEMBERS:
                raise InventoryError(409, "group_full", f"group {group} already has {members} machines, the most a "
                                     f"group holds ({MAX_GROUP_MEMBERS}): split the workload into two groups")
        existing = conn.execute("SELECT * FROM machines WHERE name = ?", (name,)).fetchone()
        if process_server is None:
            process_server = existing["process_server"] if existing else conn.execute(
                "SELECT name FROM process_servers WHERE is_primary = 1").fetchone()[0]
        _process_server(conn, process_server)
        if existing:
            if existing["process_server"] != process_server:
                raise InventoryError(409, "conflict", f"machine {name} replicates to {existing['process_server']}: "
                                     f"use 'lifeboat move {name} --to {process_server}' to change that")
            conn.execute("UPDATE machines SET policy = ?, group_name = ? WHERE name = ?", (policy, group, name))
        else:
            conn.execute("INSERT INTO machines (name, policy, group_name, process_server, protected) "
                         "VALUES (?, ?, ?, ?, ?)", (name, policy, group, process_server, time.time()))
        conn.execute("DELETE FROM disks WHERE machine = ?", (name,))
        conn.executemany("INSERT INTO disks (machine, disk) VALUES (?, ?)", [(name, d) for d in disks])
    return get_machine(conn, name), existing is None


def unprotect(conn, name: str) -> dict:
    with transaction(conn):
        m = get_machine(conn, name)
        conn.execute("DELETE FROM machines WHERE name = ?", (name,))
    return m


def request_move(conn, name: str, to: str) -> dict:
    with transaction(conn):
        m = get_machine(conn, name)
        _process_server(conn, to)
        if m["group"]:
            raise InventoryError(409, "conflict", f"machine {name} is in consistency group {m['group']}: moving a "
                                 "group member is not supported yet; take it out of the group first by "
                                 f"protecting it again without --group ('lifeboat protect {name} --disk ...')")
        if m["process_server"] == to:
            conn.execute("UPDATE machines SET move_to = NULL WHERE name = ?", (name,))
        else:
            conn.execute("UPDATE machines SET move_to = ? WHERE name = ?", (to, name))
    return get_machine(conn, name)


def store_heartbeat(conn, name: str, body: dict) -> float:
    """Store the report; returns when it was received (Unix time)."""
    received = time.time()
    with transaction(conn):
        conn.execute("INSERT INTO heartbeats (machine, received, body) VALUES (?, ?, ?) ON CONFLICT(machine) DO "
                     "UPDATE SET received = excluded.received, body = excluded.body", (name, received, json.dumps(body)))
    return received


def heartbeats(conn) -> dict[str, tuple[float, dict]]:
    return {r[0]: (r[1], json.loads(r[2])) for r in conn.execute("SELECT machine, received, body FROM heartbeats")}


def finish_move(conn, name: str) -> dict:
    """The machine's disks are drained at its old process server: it now belongs to move_to."""
    with transaction(conn):
        conn.execute("UPDATE machines SET process_server = move_to, move_to = NULL WHERE name = ? AND move_to IS NOT "
                     "NULL", (name,))
    return get_machine(conn, name)


def process_server_url(conn, name: str) -> str:
    return _process_server(conn, name)["url"]
