"""`lifeboat failover [--test] MACHINE ...`, `failover cleanup|commit MACHINE`: jobs in the primary process server."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from ..core.errors import LifeboatError
from .control_args import client_from_args

JOB_POLL_SECONDS = 0.3


class JobFailed(LifeboatError):
    """{}"""

    exit_code = 5


async def wait_job(api, job: dict, quiet: bool, progress_factory) -> dict:
    """Poll the job until it ends, drawing its progress; the finished job."""
    bars: dict[str, object] = {}
    while job["state"] == "running":
        await asyncio.sleep(JOB_POLL_SECONDS)
        job = await api.call("GET", f"/jobs/{job['id']}")
        prog = job.get("progress")
        if prog and not quiet:
            bar = bars.setdefault(prog["step"], progress_factory(prog["step"]))
            bar(prog["done"], prog["total"])  # type: ignore[operator]
    if job["state"] == "failed":
        raise JobFailed(f"job {job['id']} ({job['kind']}) failed: {job['error']}")
    return job


async def control_failover(args, progress_factory) -> int:
    action, machine = "failover", None
    if args.target and args.target[0] in ("commit", "cleanup"):
        if len(args.target) != 2:
            raise LifeboatError(f"usage: lifeboat failover {args.target[0]} MACHINE")
        action, machine = args.target
    elif args.target:
        if len(args.target) != 1:
            raise LifeboatError("usage: lifeboat failover [--test] MACHINE --point CHOICE --to DIR "
                                "(or: failover commit MACHINE, failover cleanup MACHINE)")
        machine = args.target[0]
    if action == "failover":
        if not args.to:
            raise LifeboatError("--to DIR is required: the directory on the primary process server for the images")
        body = {"test": args.test, "point": args.point, "to": os.path.abspath(args.to), "overwrite": args.overwrite}
        path = f"/groups/{args.group}/failover" if args.group else f"/machines/{machine}/failover"
    else:
        if args.test:
            raise LifeboatError(f"failover {action} takes no --test: cleanup removes test failovers, commit commits "
                                "the real one")
        body, path = {}, f"/machines/{machine}/failover/{action}"
    async with client_from_args(args) as api:
        job = await api.call("POST", path, body)
        if not args.quiet:
            print(f"lifeboat failover: job {job['id']} ({job['kind']}) started", file=sys.stderr)
        job = await wait_job(api, job, args.quiet, progress_factory)
    result = job["result"] or {}
    if action == "failover":
        members = result.get("members") or [result]
        for m in members:
            for d in m["disks"]:
                print(json.dumps({"job": job["id"], "machine": m["machine"], "point_id": m["point_id"],
                                  "test": result["test"], **d}))
    else:
        print(json.dumps({"job": job["id"], **result}))
    return 0


async def cmd_jobs(args) -> int:
    """Recent jobs (newest first), or one job with --id."""
    async with client_from_args(args) as api:
        if args.id:
            jobs = [await api.call("GET", f"/jobs/{args.id}")]
        else:
            query = f"?machine={args.machine}" if args.machine else ""
            jobs = (await api.call("GET", f"/jobs{query}"))["jobs"]
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print(f"{'JOB':<32} {'KIND':<14} {'MACHINE':<16} {'STATE':<10} ERROR")
    for j in jobs:
        print(f"{j['id']:<32} {j['kind']:<14} {j['machine'] or '-':<16} {j['state']:<10} {j['error'] or ''}")
    return 0


def add_parser(sub) -> None:
    from .control_args import add_api_args

    p = sub.add_parser("jobs", help="failover, cleanup and commit jobs of the primary process server")
    add_api_args(p)
    p.add_argument("machine", nargs="?", help="only this machine's jobs")
    p.add_argument("--id", help="one job, with its result")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_jobs)
