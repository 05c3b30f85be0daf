"""Runs a recovery plan as one job: groups in order, a group's machines in parallel, scripts, manual pauses."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time

from ..core import logging as log
from ..core.errors import LifeboatError
from . import failover as fo
from . import inventory as inv
from . import plans
from .failover_api import TargetExists, _check_targets

logger = log.get("lifeboat.control.plans")
SCRIPT_READ_BYTES = 4096
SCRIPT_OUTPUT_MAX_BYTES = 64 * 1024      # per script run; the rest is counted, not logged
SCRIPT_KILL_WAIT_SECONDS = 5.0


class StepFailed(LifeboatError):
    """{}"""


def utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


class PlanEngine:
    """Starts, continues, resumes and cancels plan runs; the run's state lives in SQLite, never only here."""

    def __init__(self, ctx, runner) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.runner = runner          # the control plane's JobRunner: its stop() cancels our tasks too

    async def log(self, job_id: str, line: str) -> None:
        await asyncio.shield(self.store.call(plans.append_log, job_id, line))
        logger.info("plan: " + line, JOB=job_id)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, plan: str, definition: dict, options: dict, principal: str) -> str:
        job_id = f"j-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
        kind = "test-plan" if options["test"] else "plan"
        await self.store.call(plans.create_run, job_id, kind, principal, plan, definition, options)
        await self.log(job_id, f"{'test run' if options['test'] else 'run'} of plan {plan} started by {principal} "
                       f"(point {options['point']}, targets in {options['to']}): "
                       f"{len(definition['groups'])} groups, {len(plans.steps(definition))} steps")
        self._spawn(job_id)
        return job_id

    def _spawn(self, job_id: str) -> None:
        task = asyncio.create_task(self._run(job_id), name=f"plan job {job_id}")
        self.runner.tasks[job_id] = task
        task.add_done_callback(lambda _t: self.runner.tasks.pop(job_id, None))

    async def resume(self, job_id: str, principal: str) -> bool:
        run = await self.store.call(plans.get_run, job_id)
        if run is None or not await self.store.call(plans.take_waiting, job_id, "running"):
            return False
        await self.log(job_id, f"resumed by {principal} after manual action: {run['waiting_for']}")
        self._spawn(job_id)
        return True

    async def cancel(self, job_id: str, principal: str) -> bool:
        run = await self.store.call(plans.get_run, job_id)
        error = f"cancelled by {principal} at the manual action: {run['waiting_for'] if run else ''}"
        if run is None or not await self.store.call(plans.take_waiting, job_id, "cancelled", error):
            return False
        kept = [f["machine"] for f in run["failovers"]]
        hint = (f"; the failovers made so far stay ({', '.join(kept)}): 'lifeboat failover cleanup MACHINE' removes "
                "a test failover" if kept else "")
        await self.log(job_id, f"cancelled by {principal}{hint}")
        return True

    # --- the run ---------------------------------------------------------------------------------

    async def _run(self, job_id: str) -> None:
        run = await self.store.call(plans.get_run, job_id)
        assert run is not None
        run_steps = plans.steps(run["definition"])
        i = run["next_step"]
        step = run_steps[i] if i < len(run_steps) else None
        try:
            while i < len(run_steps):
                step = run_steps[i]
                if step["kind"] == "manual":
                    # The line first: whoever sees 'waiting' also sees why.
                    await self.log(job_id, f"waiting for manual action ({step['what']}): {step['text']} -- when done, "
                                   f"run 'lifeboat plan resume {job_id}' (or 'lifeboat plan cancel {job_id}')")
                    await asyncio.shield(self.store.call(plans.set_waiting, job_id, step["text"]))
                    return
                self.runner.progress[job_id] = {"step": step["what"], "done": i, "total": len(run_steps)}
                await self.store.call(plans.set_step, job_id, i, True)
                if step["kind"] == "script":
                    await self._script(job_id, run, step)
                else:
                    await self._failover_group(job_id, run, step)
                i += 1
                await asyncio.shield(self.store.call(plans.set_step, job_id, i, False))
            step = plans.COMMIT_STEP
            await self.store.call(plans.set_step, job_id, i, True)
            result = await self._finish(job_id, run)
        except asyncio.CancelledError:
            if step and step["kind"] == "manual":   # nothing runs at a manual step: a stop leaves the run waiting
                await asyncio.shield(self.store.call(plans.set_waiting, job_id, step["text"]))
                raise
            message = plans.restart_message(step or {"what": "start"})
            await self.log(job_id, f"step {step['what'] if step else 'start'} failed: {message}")
            await asyncio.shield(self.store.call(plans.finish_run, job_id, None, message))
            raise
        except (LifeboatError, inv.InventoryError, OSError) as exc:
            text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            message = f"step {step['what'] if step else 'start'} failed: {text}"
            await self.log(job_id, message)
            await asyncio.shield(self.store.call(plans.finish_run, job_id, None, message))
            logger.error("plan failed", JOB=job_id, error=message)
            return
        except Exception as exc:  # noqa: BLE001 - a plan failure is recorded, never crashes the daemon
            logger.exception("plan crashed", JOB=job_id)
            message = f"step {step['what'] if step else 'start'} failed: {type(exc).__name__}: {exc}"
            await self.log(job_id, message)
            await asyncio.shield(self.store.call(plans.finish_run, job_id, None, message))
            return
        await self.log(job_id, f"plan {run['plan']} finished: {len(result['failovers'])} machines failed over")
        await asyncio.shield(self.store.call(plans.finish_run, job_id, result, None))
        self.runner.progress.pop(job_id, None)

    async def _finish(self, job_id: str, run: dict) -> dict:
        run = await self.store.call(plans.get_run, job_id)
        committed = []
        if run["definition"]["commit"] and not run["options"]["test"]:
            for f in run["failovers"]:
                report = await fo.commit(self._repo(), f["machine"], f["point_id"])
                await self.store.call(fo.set_failover_state, f["machine"], job_id, "committed")
                committed.append({"machine": f["machine"], **report})
                await self.log(job_id, f"machine {f['machine']} committed to point {f['point_id']}: "
                               f"{len(report['dropped_points'])} other points dropped")
        return {"plan": run["plan"], "test": run["options"]["test"], "failovers": run["failovers"],
                "committed": committed}

    def _repo(self):
        repo = getattr(self.ctx.server, "repo", None)
        if repo is None:
            raise StepFailed("the primary process server has no repository open: start it with its repository, "
                             "then run the plan again")
        return repo

    # --- scripts ---------------------------------------------------------------------------------

    async def _script(self, job_id: str, run: dict, step: dict) -> None:
        timeout = run["definition"]["script_timeout_seconds"]
        group = run["definition"]["groups"][step["group"] - 1]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LIFEBOAT_JOB": job_id, "LIFEBOAT_PLAN": run["plan"],
               "LIFEBOAT_PLAN_GROUP": str(step["group"]), "LIFEBOAT_STAGE": step["stage"],
               "LIFEBOAT_TEST": "1" if run["options"]["test"] else "0",
               "LIFEBOAT_MACHINES": " ".join(group["machines"])}
        await self.log(job_id, f"{step['what']} started (timeout {timeout:g} s)")
        # Its own session: a timeout or a stop kills the script's children too.
        proc = await asyncio.create_subprocess_exec(step["path"], stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                    env=env, cwd="/", start_new_session=True)
        kept, dropped = bytearray(), 0

        async def read_all() -> None:
            nonlocal dropped
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(SCRIPT_READ_BYTES):
                room = SCRIPT_OUTPUT_MAX_BYTES - len(kept)
                kept.extend(chunk[:max(room, 0)])
                dropped += max(len(chunk) - max(room, 0), 0)
            await proc.wait()

        try:
            await asyncio.wait_for(read_all(), timeout)
        except asyncio.TimeoutError:
            self._kill(proc)
            await self._log_output(job_id, step, kept, dropped)
            raise StepFailed(f"script {step['path']} did not finish within {timeout:g} s and was killed: make it "
                             "faster, or raise the plan's script_timeout_seconds") from None
        except asyncio.CancelledError:
            self._kill(proc)
            raise
        await self._log_output(job_id, step, kept, dropped)
        if proc.returncode != 0:
            raise StepFailed(f"script {step['path']} exited with status {proc.returncode}: fix what it reports "
                             "(see the log above), then run the plan again")
        await self.log(job_id, f"{step['what']} finished (exit 0)")

    @staticmethod
    def _kill(proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _log_output(self, job_id: str, step: dict, kept: bytearray, dropped: int) -> None:
        prefix = f"group {step['group']} {step['stage']} script: "
        lines = [prefix + line for line in kept.decode(errors="replace").splitlines()]
        if dropped:
            lines.append(f"{prefix}[{dropped} more bytes of output not logged]")
        # Into the job log only: a chatty script does not flood the daemon's journal.
        await asyncio.shield(self.store.call(plans.append_log, job_id, *lines))

    # --- failover of a group ---------------------------------------------------------------------

    async def _failover_group(self, job_id: str, run: dict, step: dict) -> None:
        await self.log(job_id, f"group {step['group']} started: failing over {', '.join(step['machines'])} "
                       "in parallel")
        machines = [await self.store.call(inv.get_machine, m) for m in step["machines"]]
        singles = [m for m in machines if not m["group"]]
        cgs = sorted({m["group"] for m in machines if m["group"]})
        jobs = [self._failover_machine(job_id, run, m) for m in singles]
        jobs += [self._failover_cg(job_id, run, cg, [m for m in machines if m["group"] == cg]) for cg in cgs]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        done, failed = [], []
        for what, out in zip([m["name"] for m in singles] + [f"consistency group {cg}" for cg in cgs], outcomes):
            if isinstance(out, asyncio.CancelledError):
                raise out
            if isinstance(out, BaseException):
                text = getattr(out, "message", None) or str(out) or type(out).__name__
                failed.append(f"{what}: {text}")
                await self.log(job_id, f"failover of {what} failed: {text}")
            else:
                done += out
        if done:
            await asyncio.shield(self.store.call(plans.add_failovers, job_id, done))
        if failed:
            raise StepFailed(f"{len(failed)} of {len(outcomes)} failovers failed ({'; '.join(failed)})")
        await self.log(job_id, f"group {step['group']} done")

    def _targets(self, run: dict, job_id: str, machine: str, disk_ids: list[str]) -> dict[str, str]:
        o = run["options"]
        targets = fo.target_paths(o["to"], disk_ids, o["test"], job_id)
        try:
            _check_targets(targets, o["overwrite"])
        except TargetExists as exc:
            raise StepFailed(f"machine {machine}: {exc}") from None
        os.makedirs(o["to"], exist_ok=True)
        return targets

    async def _materialized(self, job_id: str, run: dict, machine: str, point, targets: dict) -> dict:
        disks = await fo.materialize_point(self._repo(), point, targets, run["options"]["overwrite"],
                                           lambda *_: None)
        await self.store.call(fo.record_failover, machine, job_id, run["options"]["test"], point.point_id, targets)
        for d in disks:
            await self.log(job_id, f"machine {machine} failed over to point {point.point_id} ({point.consistency}, "
                           f"taken {utc(point.created)}): {d['disk_id']} -> {d['path']}, image digest "
                           f"{d['image_digest']} recomputed from the written image: OK")
        return {"machine": machine, "point_id": point.point_id, "consistency": point.consistency,
                "created": point.created, "disks": disks}

    async def _failover_machine(self, job_id: str, run: dict, machine: dict) -> list[dict]:
        choice = run["options"]["point"]
        repo = self._repo()
        entries = await repo.list_points(damaged=[])
        if choice == "latest":
            beats = await self.store.call(inv.heartbeats)
            known = ((beats.get(machine["name"], (0, {}))[1] or {}).get("last_point") or {}).get("point_id")
            entries = await fo.wait_for_known(lambda: repo.list_points(damaged=[]), machine, known,
                                              time.monotonic() + fo.LATEST_WAIT_SECONDS)
        policy = await self.store.call(inv.get_policy, machine["policy"])
        point = fo.choose(entries, machine, policy, "latest-processed" if choice == "latest" else choice, time.time())
        targets = self._targets(run, job_id, machine["name"], [f"{machine['name']}.{d}" for d in machine["disks"]])
        return [await self._materialized(job_id, run, machine["name"], point, targets)]

    async def _failover_cg(self, job_id: str, run: dict, cg: str, members: list[dict]) -> list[dict]:
        entries = await self._repo().list_points(damaged=[])
        gp = fo.group_choice(entries, cg, group_point_choice(run["options"]["point"]))
        await self.log(job_id, f"consistency group {cg}: one group point {gp.tag} ({gp.consistency}) for "
                       f"{', '.join(sorted(gp.members))}")
        names = {m["name"] for m in members}

        async def one(name, mp):
            return await self._materialized(job_id, run, name, mp, self._targets(run, job_id, name, sorted(mp.disks)))

        outcomes = await asyncio.gather(*(one(n, mp) for n, mp in gp.members.items() if n in names),
                                        return_exceptions=True)
        for out in outcomes:     # every member ran to its end; the first failure speaks for the group
            if isinstance(out, BaseException):
                raise out
        return list(outcomes)


def group_point_choice(choice: str) -> str:
    """A plan's point choice for a consistency group: the newest group point, or the newest app-consistent one."""
    return "latest-app" if choice == "latest-app" else "latest-group"
