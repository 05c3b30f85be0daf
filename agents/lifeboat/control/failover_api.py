"""Routes for failover, test failover, cleanup, commit and jobs; the work runs as jobs in the primary."""

from __future__ import annotations

import os
import time

from aiohttp import web

from ..core import logging as log
from ..core.errors import LifeboatError
from . import failover as fo
from . import inventory as inv
from .api import API_PREFIX, PRINCIPAL_KEY, ApiError, ctx_of, read_json, require
from .inventory_api import _repo, list_entries
from .jobs import JobRunner, get_job, list_jobs

logger = log.get("lifeboat.control.failover")
RUNNER_KEY = "jobs"


def runner(request) -> JobRunner:
    ctx = ctx_of(request)
    if RUNNER_KEY not in ctx.extra:
        ctx.extra[RUNNER_KEY] = JobRunner(ctx.store)
    return ctx.extra[RUNNER_KEY]


def _failover_body(body: dict) -> tuple[bool, str, str, bool]:
    test, point, to, overwrite = body.get("test", False), body.get("point", "latest"), body.get("to"), body.get(
        "overwrite", False)
    if not isinstance(test, bool) or not isinstance(overwrite, bool):
        raise ApiError(400, "bad_request", "test and overwrite must be true or false")
    if not isinstance(point, str) or not point or len(point) > 128:
        raise ApiError(400, "bad_request", f"point must be one of {', '.join(fo.CHOICES)} or a point id")
    if not isinstance(to, str) or not os.path.isabs(to):
        raise ApiError(400, "bad_request", "to must be an absolute directory path on the primary process server "
                       "(one <disk id>.img per disk goes there)")
    if os.path.exists(to) and not os.path.isdir(to):
        raise ApiError(400, "bad_request", f"{to} exists and is not a directory: the failover writes one image per "
                       "disk into a directory")
    return test, point, to, overwrite


class TargetExists(LifeboatError):
    """{}"""


def _check_targets(targets: dict[str, str], overwrite: bool) -> None:
    existing = [p for p in targets.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise TargetExists(f"{existing[0]} exists ({len(existing)} of {len(targets)} targets do): pass --overwrite, "
                           "or choose another directory")


async def post_failover(request):
    require(request)
    ctx = ctx_of(request)
    name = request.match_info["machine"]
    test, choice, to, overwrite = _failover_body(await read_json(request))
    machine = await ctx.store.call(inv.get_machine, name)
    policy = await ctx.store.call(inv.get_policy, machine["policy"])
    repo = _repo(request)
    beats = await ctx.store.call(inv.heartbeats)
    known = ((beats.get(name, (0, {}))[1] or {}).get("last_point") or {}).get("point_id")
    # Refuse impossible choices now, with the way out, rather than in a job that fails later.
    entries = await list_entries(request)
    fo.choose(entries, machine, policy, "latest-processed" if choice == "latest" else choice, time.time())
    disk_ids = [f"{name}.{d}" for d in machine["disks"]]
    kind = "test-failover" if test else "failover"
    if not test:   # a drill's targets are per job; a real failover's are fixed: refuse a clash now
        try:
            _check_targets(fo.target_paths(to, disk_ids, False, ""), overwrite)
        except TargetExists as exc:
            raise ApiError(409, "target_exists", str(exc)) from None

    async def work(job_id, progress):
        nonlocal entries
        if choice == "latest":
            entries = await fo.wait_for_known(lambda: repo.list_points(damaged=[]), machine, known,
                                              time.monotonic() + fo.LATEST_WAIT_SECONDS)
        point = fo.choose(entries, machine, policy, "latest-processed" if choice == "latest" else choice, time.time())
        targets = fo.target_paths(to, disk_ids, test, job_id)
        _check_targets(targets, overwrite)
        os.makedirs(to, exist_ok=True)
        disks = await fo.materialize_point(repo, point, targets, overwrite, progress)
        await ctx.store.call(fo.record_failover, name, job_id, test, point.point_id, targets)
        return {"machine": name, "test": test, "point_id": point.point_id, "choice": choice,
                "consistency": point.consistency, "created": point.created, "disks": disks}

    job = await runner(request).start(kind, name, str(request[PRINCIPAL_KEY]),
                                      {"test": test, "point": choice, "to": to}, work)
    return web.json_response(job, status=202)


async def post_group_failover(request):
    require(request)
    ctx = ctx_of(request)
    group = request.match_info["group"]
    test, choice, to, overwrite = _failover_body(await read_json(request))
    groups = {g["name"]: g for g in await ctx.store.call(inv.list_groups)}
    if group not in groups or not groups[group]["members"]:
        raise ApiError(404, "not_found", f"no consistency group {group!r} with protected members ('lifeboat group list')")
    machines = {m: await ctx.store.call(inv.get_machine, m) for m in groups[group]["members"]}
    repo = _repo(request)
    try:
        gp = fo.group_choice(await list_entries(request), group, choice)
    except LifeboatError as exc:
        raise ApiError(409 if "not a point of every member" in str(exc) else 404, "no_point", str(exc)) from None
    kind = "test-failover" if test else "failover"

    async def work(job_id, progress):
        out = []
        for name, mp in gp.members.items():
            if name not in machines:
                continue
            targets = fo.target_paths(to, sorted(mp.disks), test, job_id)
            _check_targets(targets, overwrite)
            os.makedirs(to, exist_ok=True)
            disks = await fo.materialize_point(repo, mp, targets, overwrite, progress)
            await ctx.store.call(fo.record_failover, name, job_id, test, mp.point_id, targets)
            out.append({"machine": name, "point_id": mp.point_id, "disks": disks})
        return {"group": group, "tag": gp.tag, "test": test, "consistency": gp.consistency, "members": out}

    job = await runner(request).start(kind, None, str(request[PRINCIPAL_KEY]),
                                      {"group": group, "test": test, "point": choice, "to": to}, work)
    return web.json_response(job, status=202)


async def post_cleanup(request):
    require(request)
    ctx = ctx_of(request)
    name = request.match_info["machine"]
    await ctx.store.call(inv.get_machine, name)
    drills = await ctx.store.call(fo.active_failovers, name, True)
    if not drills:
        raise ApiError(409, "nothing_to_clean", f"machine {name} has no test failover to clean up ('lifeboat jobs "
                       f"{name}' lists its jobs)")

    async def work(job_id, progress):
        removed = []
        for i, d in enumerate(drills):
            removed += fo.remove_targets(d["targets"])
            await ctx.store.call(fo.set_failover_state, name, d["job_id"], "cleaned")
            progress("test failovers removed", i + 1, len(drills))
        return {"machine": name, "cleaned_jobs": [d["job_id"] for d in drills], "removed": removed}

    job = await runner(request).start("cleanup", name, str(request[PRINCIPAL_KEY]), {}, work)
    return web.json_response(job, status=202)


async def post_commit(request):
    require(request)
    ctx = ctx_of(request)
    name = request.match_info["machine"]
    await ctx.store.call(inv.get_machine, name)
    real = await ctx.store.call(fo.active_failovers, name, False)
    if not real:
        drills = await ctx.store.call(fo.active_failovers, name, True)
        hint = (" (a test failover is removed with 'lifeboat failover cleanup', never committed)" if drills else "")
        raise ApiError(409, "nothing_to_commit", f"machine {name} has no failover to commit: run 'lifeboat failover "
                       f"{name} --point ... --to DIR' first{hint}")
    last = real[-1]
    repo = _repo(request)

    async def work(job_id, progress):
        report = await fo.commit(repo, name, last["point_id"])
        await ctx.store.call(fo.set_failover_state, name, last["job_id"], "committed")
        return {"machine": name, "point_id": last["point_id"], **report}

    job = await runner(request).start("commit", name, str(request[PRINCIPAL_KEY]), {"point_id": last["point_id"]}, work)
    return web.json_response(job, status=202)


async def get_job_route(request):
    require(request)
    job_id = request.match_info["job_id"]
    job = await ctx_of(request).store.call(get_job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} ('lifeboat jobs' lists the recent ones)")
    job["progress"] = runner(request).progress.get(job_id)
    return web.json_response(job)


async def get_jobs(request):
    require(request)
    machine = request.query.get("machine")
    return web.json_response({"jobs": await ctx_of(request).store.call(list_jobs, machine)})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post(API_PREFIX + "/machines/{machine}/failover", post_failover)
    r.add_post(API_PREFIX + "/machines/{machine}/failover/cleanup", post_cleanup)
    r.add_post(API_PREFIX + "/machines/{machine}/failover/commit", post_commit)
    r.add_post(API_PREFIX + "/groups/{group}/failover", post_group_failover)
    r.add_get(API_PREFIX + "/jobs", get_jobs)
    r.add_get(API_PREFIX + "/jobs/{job_id}", get_job_route)
