"""Jobs run by the primary process server (failovers, cleanup, commit), recorded in SQLite with their outcome."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Awaitable, Callable

from ..core import logging as log
from ..core.errors import LifeboatError
from .store import Store, transaction

logger = log.get("lifeboat.control.jobs")
JOB_STOP_SECONDS = 5.0    # a stop cancels running jobs; each is recorded as interrupted


def _job(row) -> dict:
    return {"id": row["id"], "kind": row["kind"], "machine": row["machine"], "state": row["state"],
            "principal": row["principal"], "params": json.loads(row["params"]),
            "result": json.loads(row["result"]) if row["result"] else None, "error": row["error"],
            "created": row["created"], "finished": row["finished"]}


def get_job(conn, job_id: str) -> dict | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return _job(row) if row else None


def list_jobs(conn, machine: str | None = None, limit: int = 100) -> list[dict]:
    if machine:
        rows = conn.execute("SELECT * FROM jobs WHERE machine = ? ORDER BY created DESC LIMIT ?", (machine, limit))
    else:
        rows = conn.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
    return [_job(r) for r in rows]


def _insert(conn, job_id: str, kind: str, machine: str | None, principal: str, params: dict) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO jobs (id, kind, machine, state, principal, params, created) VALUES "
                     "(?, ?, ?, 'running', ?, ?, ?)", (job_id, kind, machine, principal, json.dumps(params), time.time()))


def _finish(conn, job_id: str, result: dict | None, error: str | None) -> None:
    with transaction(conn):
        conn.execute("UPDATE jobs SET state = ?, result = ?, error = ?, finished = ? WHERE id = ?",
                     ("failed" if error else "succeeded", json.dumps(result) if result is not None else None,
                      error, time.time(), job_id))


def interrupt_leftovers(conn) -> int:
    """Jobs still 'running' in the database died with a previous process: say so."""
    with transaction(conn):
        return conn.execute("UPDATE jobs SET state = 'failed', finished = ?, error = 'interrupted: the process "
                            "server stopped while the job ran; run it again' WHERE state = 'running'",
                            (time.time(),)).rowcount


class JobRunner:
    """Starts jobs as tasks; progress (done, total) is kept in memory for the API."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tasks: dict[str, asyncio.Task] = {}
        self.progress: dict[str, dict] = {}

    async def start(self, kind: str, machine: str | None, principal: str, params: dict,
                    work: Callable[[str, Callable[[str, int, int], None]], Awaitable[dict]]) -> dict:
        job_id = f"j-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
        await self.store.call(_insert, job_id, kind, machine, principal, params)
        logger.info("job started", JOB=job_id, kind=kind, MACHINE=machine, by=principal)

        def progress(what: str, done: int, total: int) -> None:
            self.progress[job_id] = {"step": what, "done": done, "total": total}

        async def run() -> None:
            result, error = None, None
            try:
                result = await work(job_id, progress)
            except asyncio.CancelledError:
                error = "interrupted: the process server stopped while the job ran; run it again"
                raise
            except LifeboatError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a job failure is recorded, never crashes the daemon
                logger.exception("job crashed", JOB=job_id)
                error = f"{type(exc).__name__}: {exc}"
            finally:
                await asyncio.shield(self.store.call(_finish, job_id, result, error))
                self.tasks.pop(job_id, None)
                if error:
                    logger.error("job failed", JOB=job_id, kind=kind, MACHINE=machine, error=error)
                else:
                    logger.info("job succeeded", JOB=job_id, kind=kind, MACHINE=machine)

        self.tasks[job_id] = asyncio.create_task(run(), name=f"job {job_id}")
        return await self.store.call(get_job, job_id)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=JOB_STOP_SECONDS)
