"""Routes for recovery plans: define, list, run (test or real), resume, cancel, and the job's log."""

from __future__ import annotations

import os
import time

from aiohttp import web

from ..core import logging as log
from ..core.errors import LifeboatError
from . import failover as fo
from . import inventory as inv
from . import plans
from .api import API_PREFIX, PRINCIPAL_KEY, ApiError, check_name, ctx_of, read_json, require
from .failover_api import runner
from .inventory_api import _repo, list_entries
from .jobs import get_job
from .plan_engine import PlanEngine, group_point_choice, utc

logger = log.get("lifeboat.control.plans")
ENGINE_KEY = "plans"


def engine(request) -> PlanEngine:
    ctx = ctx_of(request)
    if ENGINE_KEY not in ctx.extra:
        ctx.extra[ENGINE_KEY] = PlanEngine(ctx, runner(request))
    return ctx.extra[ENGINE_KEY]


async def get_plans(request):
    require(request)
    return web.json_response({"plans": await ctx_of(request).store.call(plans.list_plans)})


async def put_plan(request):
    require(request)
    name = check_name("plan name", request.match_info["plan"])
    body = await read_json(request)
    store = ctx_of(request).store

    def run(conn):
        return plans.put_plan(conn, name, plans.validate(conn, body))

    plan, created = await store.call(run)
    logger.info("recovery plan stored", plan=name, groups=len(plan["groups"]), by=str(request[PRINCIPAL_KEY]))
    return web.json_response(plan, status=201 if created else 200)


async def get_plan(request):
    require(request)
    return web.json_response(await ctx_of(request).store.call(plans.get_plan, request.match_info["plan"]))


async def delete_plan(request):
    require(request)
    plan = await ctx_of(request).store.call(plans.delete_plan, request.match_info["plan"])
    logger.info("recovery plan deleted", plan=plan["name"], by=str(request[PRINCIPAL_KEY]))
    return web.json_response(plan)


def _run_body(body: dict) -> dict:
    test, point, to, overwrite = (body.get("test", False), body.get("point", "latest"), body.get("to"),
                                  body.get("overwrite", False))
    if not isinstance(test, bool) or not isinstance(overwrite, bool):
        raise ApiError(400, "bad_request", "test and overwrite must be true or false")
    if point not in plans.PLAN_CHOICES:
        raise ApiError(400, "bad_request", f"point {point!r}: a plan fails over many machines at once, so it takes "
                       f"one of {', '.join(plans.PLAN_CHOICES)} (a named point is for one machine: 'lifeboat failover "
                       "MACHINE --point ID')")
    if not isinstance(to, str) or not os.path.isabs(to):
        raise ApiError(400, "bad_request", "to must be an absolute directory path on the primary process server "
                       "(one <disk id>.img per disk of every machine goes there)")
    if os.path.exists(to) and not os.path.isdir(to):
        raise ApiError(400, "bad_request", f"{to} exists and is not a directory: a plan writes one image per disk "
                       "into a directory")
    return {"test": test, "point": point, "to": to, "overwrite": overwrite}


async def _check_points(request, definition: dict, choice: str) -> None:
    """Refuse a choice some machine cannot meet now, naming it, instead of failing in group 5 an hour later."""
    ctx = ctx_of(request)
    entries = await list_entries(request)
    seen_cgs = set()
    for g in definition["groups"]:
        for name in g["machines"]:
            machine = await ctx.store.call(inv.get_machine, name)
            if machine["group"]:
                if machine["group"] not in seen_cgs:
                    seen_cgs.add(machine["group"])
                    try:
                        fo.group_choice(entries, machine["group"], group_point_choice(choice))
                    except LifeboatError as exc:
                        raise ApiError(409, "no_point", f"consistency group {machine['group']} (machine {name}): "
                                       f"{exc}") from None
                continue
            policy = await ctx.store.call(inv.get_policy, machine["policy"])
            fo.choose(entries, machine, policy, "latest-processed" if choice == "latest" else choice, time.time())


async def post_run(request):
    require(request)
    ctx = ctx_of(request)
    name = request.match_info["plan"]
    options = _run_body(await read_json(request))
    stored = await ctx.store.call(plans.get_plan, name)
    definition = {k: stored[k] for k in plans.PLAN_KEYS}
    # The inventory may have changed since the plan was stored: validate again, against now.
    definition = await ctx.store.call(plans.validate, definition)
    active = await ctx.store.call(plans.active_run, name)
    if active:
        raise ApiError(409, "plan_active", f"plan {name} already has job {active} running or waiting: resume or cancel "
                       f"it first ('lifeboat plan log {active}')")
    _repo(request)
    await _check_points(request, definition, options["point"])
    job_id = await engine(request).start(name, definition, options, str(request[PRINCIPAL_KEY]))
    return web.json_response(await ctx.store.call(get_job, job_id), status=202)


async def _plan_job(request) -> dict:
    require(request)
    job_id = request.match_info["job_id"]
    run = await ctx_of(request).store.call(plans.get_run, job_id)
    if run is None:
        raise ApiError(404, "not_found", f"no recovery-plan job {job_id!r}: 'lifeboat plan run NAME' prints the job id "
                       "('lifeboat jobs' lists recent jobs)")
    return run


async def post_resume(request):
    run = await _plan_job(request)
    if not await engine(request).resume(run["job_id"], str(request[PRINCIPAL_KEY])):
        raise ApiError(409, "not_waiting", f"job {run['job_id']} is {run['state']}, not waiting at a manual action: "
                       "only a waiting plan can be resumed ('lifeboat plan log JOB' shows where it is)")
    return web.json_response(await ctx_of(request).store.call(get_job, run["job_id"]))


async def post_cancel(request):
    run = await _plan_job(request)
    if not await engine(request).cancel(run["job_id"], str(request[PRINCIPAL_KEY])):
        what = ("it is running a step: cancel it when it waits at a manual action" if run["state"] == "running"
                else "it has ended")
        raise ApiError(409, "not_waiting", f"job {run['job_id']} is {run['state']}, not waiting: {what}")
    return web.json_response(await ctx_of(request).store.call(get_job, run["job_id"]))


async def get_log(request):
    run = await _plan_job(request)
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise ApiError(400, "bad_request", "after must be a line number (the last 'seq' you have)") from None
    lines = await ctx_of(request).store.call(plans.read_log, run["job_id"], after)
    for line in lines:
        line["time"] = utc(line["at"])
    return web.json_response({"job_id": run["job_id"], "plan": run["plan"], "state": run["state"],
                              "waiting_for": run["waiting_for"], "error": run["error"], "lines": lines})


async def _recover(app: web.Application) -> None:
    """Start-up: a step that was running when the process died is failed and named; waiting runs keep waiting."""
    from .api import CTX_KEY

    failed = await app[CTX_KEY].store.call(plans.fail_interrupted_runs)
    if failed:
        logger.warning("recovery-plan steps interrupted by the previous stop marked failed", jobs=",".join(failed))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(API_PREFIX + "/plans", get_plans)
    r.add_put(API_PREFIX + "/plans/{plan}", put_plan)
    r.add_get(API_PREFIX + "/plans/{plan}", get_plan)
    r.add_delete(API_PREFIX + "/plans/{plan}", delete_plan)
    r.add_post(API_PREFIX + "/plans/{plan}/run", post_run)
    r.add_post(API_PREFIX + "/jobs/{job_id}/resume", post_resume)
    r.add_post(API_PREFIX + "/jobs/{job_id}/cancel", post_cancel)
    r.add_get(API_PREFIX + "/jobs/{job_id}/log", get_log)
    app.on_startup.append(_recover)
