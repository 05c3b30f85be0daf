"""Recovery plans: the definition and its validation, the run's steps, the job log, and the SQL behind them."""

from __future__ import annotations

import json
import os
import time

from .inventory import InventoryError, get_machine, list_groups
from .store import transaction

PLAN_FORMAT_VERSION = 1               # the stored definition's "version"
MAX_GROUPS = 7                        # the reference design's limit
MAX_MACHINES_PER_GROUP = 64
MAX_MANUAL_TEXT_CHARS = 2000
MAX_SCRIPT_PATH_CHARS = 1024
DEFAULT_SCRIPT_TIMEOUT_SECONDS = 300.0
MAX_SCRIPT_TIMEOUT_SECONDS = 3600.0
MAX_LOG_LINE_CHARS = 2000             # a script's long line is cut, the job log stays small
MAX_LOG_LINES_PER_READ = 1000
PLAN_CHOICES = ("latest", "latest-processed", "latest-app")
PLAN_KEYS = ("version", "groups", "script_timeout_seconds", "commit")
GROUP_KEYS = ("machines", "pre_script", "post_script", "manual_before", "manual_after")
ACTIVE_STATES = ("running", "waiting")
RESTARTED = "process server restarted"
COMMIT_STEP = {"kind": "commit", "what": "commit of the failed-over machines"}   # after the last step


class PlanError(InventoryError):
    """A plan the API refuses: (status, code, message naming the field and the way out)."""


def _bad(where: str, message: str, status: int = 400, code: str = "bad_request") -> PlanError:
    return PlanError(status, code, f"plan {where}: {message}")


def _script(where: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SCRIPT_PATH_CHARS or not os.path.isabs(value):
        raise _bad(where, "must be an absolute path of a script on the primary process server's host")
    if not os.path.isfile(value):
        raise _bad(where, f"{value} does not exist on the primary process server's host (or is not a file): "
                   "install the script there first")
    if not os.access(value, os.X_OK):
        raise _bad(where, f"{value} is not executable: chmod +x it")
    return value


def _manual(where: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MANUAL_TEXT_CHARS:
        raise _bad(where, f"must be the operator's instruction, 1 to {MAX_MANUAL_TEXT_CHARS} characters")
    return value.strip()


def validate(conn, definition) -> dict:
    """The definition in canonical form, or PlanError naming what is wrong.

    Consistency groups: a member may only be in a plan together with every other member, in the same
    plan group; the plan then fails them over at one group point (never a member alone).
    """
    if not isinstance(definition, dict):
        raise _bad("definition", "must be a JSON object with 'groups'")
    unknown = sorted(set(definition) - set(PLAN_KEYS))
    if unknown:
        raise _bad(repr(unknown[0]), f"unknown field (fields: {', '.join(PLAN_KEYS)})")
    if definition.get("version", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
        raise _bad("version", f"{definition['version']!r} is not supported (this release writes "
                   f"{PLAN_FORMAT_VERSION})")
    groups = definition.get("groups")
    if not isinstance(groups, list) or not 1 <= len(groups) <= MAX_GROUPS:
        n = len(groups) if isinstance(groups, list) else "no"
        raise _bad("groups", f"has {n} groups: a plan has 1 to {MAX_GROUPS} ordered groups of machines")
    timeout = definition.get("script_timeout_seconds", DEFAULT_SCRIPT_TIMEOUT_SECONDS)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_SCRIPT_TIMEOUT_SECONDS):
        raise _bad("script_timeout_seconds", f"must be a number of seconds in (0, {MAX_SCRIPT_TIMEOUT_SECONDS:.0f}]")
    commit = definition.get("commit", False)
    if not isinstance(commit, bool):
        raise _bad("commit", "must be true (commit every machine after a real run) or false")
    seen: dict[str, int] = {}
    out_groups = []
    for i, g in enumerate(groups, start=1):
        where = f"group {i}"
        if not isinstance(g, dict):
            raise _bad(where, "must be an object with 'machines'")
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise _bad(f"{where} field {unknown[0]!r}", f"unknown (fields: {', '.join(GROUP_KEYS)})")
        machines = g.get("machines")
        if (not isinstance(machines, list) or not 1 <= len(machines) <= MAX_MACHINES_PER_GROUP
                or not all(isinstance(m, str) for m in machines)):
            raise _bad(f"{where} machines", f"must list 1 to {MAX_MACHINES_PER_GROUP} machine names")
        for m in machines:
            if m in seen:
                where_else = "also" if seen[m] == i else f"already in group {seen[m]}"
                raise _bad(f"{where}", f"machine {m} is {where_else}: a machine is in at most one group of a plan")
            seen[m] = i
        out_groups.append({"machines": list(machines),
                           "pre_script": _script(f"{where} pre_script", g.get("pre_script")),
                           "post_script": _script(f"{where} post_script", g.get("post_script")),
                           "manual_before": _manual(f"{where} manual_before", g.get("manual_before")),
                           "manual_after": _manual(f"{where} manual_after", g.get("manual_after"))})
    members = {cg["name"]: cg["members"] for cg in list_groups(conn)}
    for name, i in seen.items():
        machine = get_machine(conn, name)   # 404 for a machine the control plane does not know
        cg = machine["group"]
        if cg:
            apart = [f"{o} ({f'group {seen[o]}' if o in seen else 'not in the plan'})"
                     for o in members.get(cg, []) if seen.get(o) != i]
            if apart:
                raise _bad(f"group {i}", f"machine {name} is in consistency group {cg}, but its members "
                           f"{', '.join(apart)} are not in plan group {i}: put every member of {cg} into the same "
                           "plan group (they fail over together at one group point)", 409, "group_split")
    return {"version": PLAN_FORMAT_VERSION, "groups": out_groups, "script_timeout_seconds": float(timeout),
            "commit": commit}


def steps(definition: dict) -> list[dict]:
    """The run's steps in order; a run's position is an index into this list (stored as next_step)."""
    out = []
    for i, g in enumerate(definition["groups"], start=1):
        if g["manual_before"]:
            out.append({"kind": "manual", "group": i, "text": g["manual_before"],
                        "what": f"manual action before group {i}"})
        if g["pre_script"]:
            out.append({"kind": "script", "group": i, "stage": "pre", "path": g["pre_script"],
                        "what": f"group {i} pre script {g['pre_script']}"})
        out.append({"kind": "failover", "group": i, "machines": g["machines"],
                    "what": f"group {i} failover of {', '.join(g['machines'])}"})
        if g["post_script"]:
            out.append({"kind": "script", "group": i, "stage": "post", "path": g["post_script"],
                        "what": f"group {i} post script {g['post_script']}"})
        if g["manual_after"]:
            out.append({"kind": "manual", "group": i, "text": g["manual_after"],
                        "what": f"manual action after group {i}"})
    return out


# --- plans ---------------------------------------------------------------------------------------

def put_plan(conn, name: str, definition: dict) -> tuple[dict, bool]:
    now = time.time()
    with transaction(conn):
        existed = conn.execute("SELECT 1 FROM plans WHERE name = ?", (name,)).fetchone() is not None
        conn.execute("INSERT INTO plans VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                     "definition = excluded.definition, updated = excluded.updated",
                     (name, json.dumps(definition), now, now))
    return get_plan(conn, name), not existed


def get_plan(conn, name: str) -> dict:
    row = conn.execute("SELECT * FROM plans WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise PlanError(404, "not_found", f"no recovery plan {name!r}: 'lifeboat plan list' shows them, "
                        "'lifeboat plan create NAME --file plan.json' creates one")
    return {"name": row["name"], **json.loads(row["definition"]), "created": row["created"],
            "updated": row["updated"]}


def list_plans(conn) -> list[dict]:
    return [get_plan(conn, r[0]) for r in conn.execute("SELECT name FROM plans ORDER BY name")]


def delete_plan(conn, name: str) -> dict:
    plan = get_plan(conn, name)
    with transaction(conn):
        conn.execute("DELETE FROM plans WHERE name = ?", (name,))
    return plan


# --- runs and their log --------------------------------------------------------------------------

def active_run(conn, plan: str) -> str | None:
    row = conn.execute("SELECT r.job_id FROM plan_runs r JOIN jobs j ON j.id = r.job_id WHERE r.plan = ? AND "
                       "j.state IN ('running', 'waiting')", (plan,)).fetchone()
    return row[0] if row else None


def create_run(conn, job_id: str, kind: str, principal: str, plan: str, definition: dict, options: dict) -> None:
    """The job and its run in one transaction: a run never exists without its job, nor the reverse."""
    now = time.time()
    with transaction(conn):
        conn.execute("INSERT INTO jobs (id, kind, machine, state, principal, params, created) VALUES "
                     "(?, ?, NULL, 'running', ?, ?, ?)", (job_id, kind, principal,
                                                          json.dumps({"plan": plan, **options}), now))
        conn.execute("INSERT INTO plan_runs (job_id, plan, definition, options, next_step) VALUES (?, ?, ?, ?, 0)",
                     (job_id, plan, json.dumps(definition), json.dumps(options)))


def get_run(conn, job_id: str) -> dict | None:
    row = conn.execute("SELECT r.*, j.state, j.error FROM plan_runs r JOIN jobs j ON j.id = r.job_id "
                       "WHERE r.job_id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    return {"job_id": row["job_id"], "plan": row["plan"], "definition": json.loads(row["definition"]),
            "options": json.loads(row["options"]), "next_step": row["next_step"],
            "step_running": bool(row["step_running"]), "waiting_for": row["waiting_for"], "state": row["state"],
            "error": row["error"], "failovers": json.loads(row["failovers"])}


def append_log(conn, job_id: str, *lines: str) -> int:
    """Lines in one transaction (a script's output is one fsync, not one per line); the last seq."""
    now = time.time()
    with transaction(conn):
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM job_log WHERE job_id = ?", (job_id,)).fetchone()[0]
        for line in lines:
            seq += 1
            line = line if len(line) <= MAX_LOG_LINE_CHARS else line[:MAX_LOG_LINE_CHARS] + " [cut]"
            conn.execute("INSERT INTO job_log VALUES (?, ?, ?, ?)", (job_id, seq, now, line))
    return seq


def read_log(conn, job_id: str, after: int = 0, limit: int = MAX_LOG_LINES_PER_READ) -> list[dict]:
    rows = conn.execute("SELECT seq, at, line FROM job_log WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                        (job_id, after, min(limit, MAX_LOG_LINES_PER_READ)))
    return [{"seq": r["seq"], "at": r["at"], "line": r["line"]} for r in rows]


def set_step(conn, job_id: str, next_step: int, running: bool) -> None:
    with transaction(conn):
        conn.execute("UPDATE plan_runs SET next_step = ?, step_running = ? WHERE job_id = ?",
                     (next_step, int(running), job_id))


def add_failovers(conn, job_id: str, done: list[dict]) -> None:
    with transaction(conn):
        row = conn.execute("SELECT failovers FROM plan_runs WHERE job_id = ?", (job_id,)).fetchone()
        conn.execute("UPDATE plan_runs SET failovers = ? WHERE job_id = ?",
                     (json.dumps(json.loads(row[0]) + done), job_id))


def set_waiting(conn, job_id: str, text: str) -> None:
    with transaction(conn):
        conn.execute("UPDATE plan_runs SET waiting_for = ?, step_running = 0 WHERE job_id = ?", (text, job_id))
        conn.execute("UPDATE jobs SET state = 'waiting' WHERE id = ?", (job_id,))


def take_waiting(conn, job_id: str, to_state: str, error: str | None = None) -> bool:
    """Move a waiting job on (resume: 'running' past the manual step; cancel: 'cancelled'); False if not waiting."""
    with transaction(conn):
        if conn.execute("UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ? AND state = 'waiting'",
                        (to_state, error, None if to_state == "running" else time.time(), job_id)).rowcount != 1:
            return False
        step = "next_step + 1" if to_state == "running" else "next_step"
        conn.execute(f"UPDATE plan_runs SET waiting_for = NULL, next_step = {step} WHERE job_id = ?", (job_id,))
    return True


def finish_run(conn, job_id: str, result: dict | None, error: str | None) -> None:
    with transaction(conn):
        conn.execute("UPDATE plan_runs SET step_running = 0 WHERE job_id = ?", (job_id,))
        conn.execute("UPDATE jobs SET state = ?, result = ?, error = ?, finished = ? WHERE id = ?",
                     ("failed" if error else "succeeded", json.dumps(result) if result is not None else None,
                      error, time.time(), job_id))


def restart_message(step: dict) -> str:
    return (f"{RESTARTED} while step {step['what']} ran: its outcome is unknown; check its targets "
            "('lifeboat plan log JOB'), then run the plan again")


def fail_interrupted_runs(conn) -> list[str]:
    """At start: a run whose step was running when the process died is failed, with the step named.

    (A waiting run has no running step: it keeps waiting for 'lifeboat plan resume'.)
    """
    out = []
    rows = conn.execute("SELECT r.job_id, r.definition, r.next_step FROM plan_runs r JOIN jobs j ON j.id = r.job_id "
                        "WHERE r.step_running = 1 OR j.state = 'running'").fetchall()
    for r in rows:
        run_steps = steps(json.loads(r["definition"]))
        step = run_steps[r["next_step"]] if r["next_step"] < len(run_steps) else COMMIT_STEP
        message = restart_message(step)
        append_log(conn, r["job_id"], f"step {step['what']} failed: {message}")
        finish_run(conn, r["job_id"], None, message)
        out.append(r["job_id"])
    return out
