"""Failback states of a machine after a committed failover: which step may follow which, recorded in the store."""

from __future__ import annotations

import time

from .inventory import InventoryError, get_machine
from .store import transaction

# While the failed-over copy is replicated back, the on-prem machine must stay off: its agent would
# otherwise write forward batches over the disk the master target is rewriting.
POWERED_OFF_STATES = ("reprotecting", "failing-back")
# step -> (the machine states it may start from, the state it leaves, the last step it must follow or None)
STEPS = {
    "reprotect": (("failed-over", "reprotecting"), "reprotecting", None),
    "prepare": (("reprotecting", "failing-back"), "failing-back", None),
    "switch": (("failing-back",), "failing-back", None),
    "cancel": (("failing-back",), "reprotecting", None),
    "reenable": (("failing-back",), "protected", "switch"),
}
NEXT_COMMAND = {
    "failed-over": "'lifeboat failover commit {m}' (if not yet), then 'lifeboat reprotect {m} ...'",
    "reprotecting": "'lifeboat failback {m} --stage prepare ...' (or 'lifeboat reprotect {m} ...' again)",
    "failing-back": "'lifeboat failback {m} --stage switch ...' (or --stage cancel), then 'lifeboat reenable {m}'",
    "protected": "nothing: the machine replicates forward; a failback starts with a failover and its commit",
}


def _committed(conn, machine: str) -> bool:
    row = conn.execute("SELECT state FROM failovers WHERE machine = ? AND test = 0 ORDER BY created DESC LIMIT 1",
                       (machine,)).fetchone()
    return row is not None and row["state"] == "committed"


def last_step(conn, machine: str) -> str | None:
    row = conn.execute("SELECT step FROM failback_steps WHERE machine = ? ORDER BY at DESC, rowid DESC LIMIT 1",
                       (machine,)).fetchone()
    return row["step"] if row else None


def record_step(conn, machine: str, step: str, principal: str) -> dict:
    """Move the machine to the step's state, or refuse naming the state it is in and what to run instead."""
    if step not in STEPS:
        raise InventoryError(400, "bad_request", f"step must be one of {', '.join(STEPS)}")
    allowed, to_state, after = STEPS[step]
    with transaction(conn):
        m = get_machine(conn, machine)
        state = m["state"]
        hint = NEXT_COMMAND.get(state, "'lifeboat status {m}'").format(m=machine)
        if state not in allowed:
            raise InventoryError(409, "wrong_state", f"machine {machine} is {state}; {step} needs it "
                                 f"{' or '.join(allowed)}: run {hint}")
        if step == "reprotect" and not _committed(conn, machine):
            raise InventoryError(409, "not_committed", f"machine {machine}'s failover is not committed: run "
                                 f"'lifeboat failover commit {machine}' first (reprotect replaces the on-prem disk)")
        if after is not None and last_step(conn, machine) != after:
            raise InventoryError(409, "wrong_state", f"machine {machine} has not switched to the failed-back disk: "
                                 f"run 'lifeboat failback {machine} --stage switch ...' first")
        conn.execute("UPDATE machines SET state = ? WHERE name = ?", (to_state, machine))
        conn.execute("INSERT INTO failback_steps VALUES (?, ?, ?, ?, ?, ?)",
                     (machine, step, state, to_state, principal, time.time()))
    return {"machine": machine, "step": step, "from": state, "state": to_state,
            "powered_off": to_state in POWERED_OFF_STATES}


def history(conn, machine: str) -> list[dict]:
    get_machine(conn, machine)
    return [dict(r) for r in conn.execute("SELECT step, from_state, to_state, principal, at FROM failback_steps "
                                          "WHERE machine = ? ORDER BY at, rowid", (machine,))]


def powered_off(conn, machine: str) -> str | None:
    """The state that keeps the machine off, or None (an unknown machine is the ingest's business, not ours)."""
    row = conn.execute("SELECT state FROM machines WHERE name = ?", (machine,)).fetchone()
    return row["state"] if row is not None and row["state"] in POWERED_OFF_STATES else None
