"""`lifeboat plan create|list|show|delete|run|resume|cancel|log`: recovery plans in the primary process server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib

from ..core.errors import LifeboatError
from .control_args import add_api_args, client_from_args

LOG_POLL_SECONDS = 0.3
MAX_PLAN_FILE_BYTES = 64 * 1024       # the API takes at most 64 KiB per request


class PlanJobFailed(LifeboatError):
    """{}"""

    exit_code = 5


def read_plan_file(path: str) -> dict:
    """A plan definition from JSON, or TOML when the name ends in .toml ([[groups]] tables)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_FILE_BYTES + 1)
    except OSError as exc:
        raise LifeboatError(f"cannot read the plan file {path}: {exc.strerror}") from None
    if len(raw) > MAX_PLAN_FILE_BYTES:
        raise LifeboatError(f"plan file {path} is over {MAX_PLAN_FILE_BYTES} bytes: a plan is a few groups of names")
    try:
        doc = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise LifeboatError(f"plan file {path} is not valid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise LifeboatError(f"plan file {path} must hold an object with 'groups'")
    return doc


async def follow(api, job: dict, quiet: bool) -> dict:
    """Print the job's log as it grows until it stops running (waiting, succeeded, failed, cancelled)."""
    seen = 0
    while True:
        log = await api.call("GET", f"/jobs/{job['id']}/log?after={seen}")
        for line in log["lines"]:
            seen = line["seq"]
            if not quiet:
                print(f"{line['time']}  {line['line']}", file=sys.stderr, flush=True)
        if log["state"] != "running" and not log["lines"]:
            return await api.call("GET", f"/jobs/{job['id']}")
        if not log["lines"]:
            await asyncio.sleep(LOG_POLL_SECONDS)


def outcome(job: dict) -> int:
    """The job's end on stdout as JSON; a failed job is an error (exit 5), a waiting one is not."""
    params = job.get("params") or {}
    out = {"job": job["id"], "plan": params.get("plan"), "state": job["state"], "test": params.get("test")}
    if job["state"] == "failed":
        raise PlanJobFailed(f"job {job['id']} (plan {params.get('plan')}) failed: {job['error']}")
    if job["state"] == "waiting":
        out["next"] = f"lifeboat plan resume {job['id']}"
    if job["state"] == "cancelled":
        out["error"] = job["error"]
    if job.get("result"):
        out["failovers"] = job["result"]["failovers"]
    print(json.dumps(out))
    return 0


async def cmd_plan(args) -> int:
    a = args.action
    need = {"create": "NAME", "show": "NAME", "delete": "NAME", "run": "NAME", "resume": "JOB", "cancel": "JOB",
            "log": "JOB"}.get(a)
    if need and not args.name:
        raise LifeboatError(f"usage: lifeboat plan {a} {need}")
    async with client_from_args(args) as api:
        if a == "list":
            plans = (await api.call("GET", "/plans"))["plans"]
            print(json.dumps(plans, indent=2) if args.json else "\n".join(
                f"{p['name']}: " + " -> ".join("[" + ", ".join(g["machines"]) + "]" for g in p["groups"])
                for p in plans))
        elif a in ("show", "delete"):
            print(json.dumps(await api.call("GET" if a == "show" else "DELETE", f"/plans/{args.name}"), indent=2))
        elif a == "create":
            if not args.file:
                raise LifeboatError("plan create needs --file PLAN.json (or .toml) with the groups")
            print(json.dumps(await api.call("PUT", f"/plans/{args.name}", read_plan_file(args.file)), indent=2))
        elif a == "run":
            if not args.to:
                raise LifeboatError("--to DIR is required: the directory on the primary process server for the images")
            job = await api.call("POST", f"/plans/{args.name}/run", {"test": args.test, "point": args.point,
                                                                     "to": os.path.abspath(args.to),
                                                                     "overwrite": args.overwrite})
            if not args.quiet:
                print(f"lifeboat plan: job {job['id']} ({job['kind']}) started", file=sys.stderr)
            return outcome(job if args.no_wait else await follow(api, job, args.quiet))
        elif a == "resume":
            job = await api.call("POST", f"/jobs/{args.name}/resume")
            return outcome(job if args.no_wait else await follow(api, job, args.quiet))
        elif a == "cancel":
            return outcome(await api.call("POST", f"/jobs/{args.name}/cancel"))
        elif a == "log":
            log = await api.call("GET", f"/jobs/{args.name}/log")
            if args.json:
                print(json.dumps(log, indent=2))
                return 0
            head = f"job {log['job_id']} (plan {log['plan']}): {log['state']}"
            if log["waiting_for"]:
                head += f", waiting for: {log['waiting_for']} ('lifeboat plan resume {log['job_id']}')"
            if log["error"]:
                head += f": {log['error']}"
            print(head)
            for line in log["lines"]:
                print(f"{line['time']}  {line['line']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="recovery plans: ordered groups of machines, scripts, manual actions; one job")
    add_api_args(p)
    p.add_argument("action", choices=("create", "list", "show", "delete", "run", "resume", "cancel", "log"))
    p.add_argument("name", nargs="?", metavar="NAME | JOB", help="the plan (create/show/delete/run) or the job "
                                                                 "(resume/cancel/log)")
    p.add_argument("--file", help="create: the plan definition (JSON, or TOML if it ends in .toml)")
    p.add_argument("--test", action="store_true", help="run: a drill to test-failover targets; replication goes on "
                                                      "and 'lifeboat failover cleanup MACHINE' removes them")
    p.add_argument("--point", default="latest", choices=("latest", "latest-processed", "latest-app"),
                   help="run: the point of every machine (a consistency group uses its newest group point, or its "
                        "newest app-consistent one)")
    p.add_argument("--to", help="run: directory on the primary process server for the disk images")
    p.add_argument("--overwrite", action="store_true", help="run: replace existing images of a real failover")
    p.add_argument("--no-wait", action="store_true", help="run/resume: print the job and return at once")
    p.add_argument("--json", action="store_true", help="list/log: JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="run/resume: do not print the log while waiting")
    p.set_defaults(fn=cmd_plan)
