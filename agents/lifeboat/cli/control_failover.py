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
