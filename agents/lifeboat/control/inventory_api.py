"""Routes for policies, groups, machines, process servers, heartbeats and status (handlers stay thin)."""

from __future__ import annotations

import time

from aiohttp import web

from ..core import logging as log
from ..core.errors import LifeboatError
from . import inventory as inv
from .api import API_PREFIX, PRINCIPAL_KEY, ApiError, check_name, ctx_of, read_json, require
from .status import machine_status, points_by_machine

logger = log.get("lifeboat.control.inventory")
MAX_DISKS_PER_MACHINE = 64
MAX_REPORTED_TEXT = 256


def _repo(request: web.Request):
    server = ctx_of(request).server
    repo = getattr(server, "repo", None)
    if repo is None:
        raise ApiError(503, "repository_unavailable", "the primary process server has no repository open yet; retry")
    return repo


async def list_entries(request: web.Request) -> list:
    try:
        return await _repo(request).list_points(damaged=[])
    except LifeboatError as exc:
        raise ApiError(503, "repository_unavailable", f"cannot read the recovery-point catalog: {exc}; retry "
                       "later, or run 'lifeboat verify'") from None


# --- policies and groups ------------------------------------------------------------------------

async def get_policies(request):
    require(request)
    return web.json_response({"policies": await ctx_of(request).store.call(inv.list_policies)})


async def get_policy(request):
    require(request, "agent", "process-server")
    name = request.match_info["policy"]
    return web.json_response(await ctx_of(request).store.call(inv.get_policy, name))


async def put_policy(request):
    require(request)
    name = check_name("policy name", request.match_info["policy"])
    body = await read_json(request)
    policy, created = await ctx_of(request).store.call(inv.put_policy, name, body)
    logger.info("policy saved", policy=name, created=created, by=str(request[PRINCIPAL_KEY]), **{
        k: v for k, v in policy.items() if k != "name"})
    return web.json_response(policy, status=201 if created else 200)


async def get_groups(request):
    require(request)
    return web.json_response({"groups": await ctx_of(request).store.call(inv.list_groups)})


async def post_group(request):
    require(request)
    body = await read_json(request, {"name": str})
    group = await ctx_of(request).store.call(inv.create_group, check_name("group name", body["name"]))
    return web.json_response(group, status=201)


# --- machines -----------------------------------------------------------------------------------

async def get_machines(request):
    require(request)
    return web.json_response({"machines": await ctx_of(request).store.call(inv.list_machines)})


async def get_machine(request):
    machine = request.match_info["machine"]
    require(request, "agent", machine=machine)
    return web.json_response(await ctx_of(request).store.call(inv.get_machine, machine))


async def put_machine(request):
    """Protect a machine: its disks (names as in the agent's config), policy, group, process server."""
    require(request)
    name = check_name("machine name", request.match_info["machine"])
    body = await read_json(request, {"disks": list})
    disks = body["disks"]
    if not disks or len(disks) > MAX_DISKS_PER_MACHINE or len(set(disks)) != len(disks):
        raise ApiError(400, "bad_request", f"disks must list 1 to {MAX_DISKS_PER_MACHINE} distinct disk names")
    for d in disks:
        check_name("disk name", d)
    policy = body.get("policy", "default")
    group = body.get("group")
    ps = body.get("process_server")
    for what, v in (("policy", policy), ("group", group), ("process_server", ps)):
        if v is not None and not isinstance(v, str):
            raise ApiError(400, "bad_request", f"{what} must be a string")
    machine, created = await ctx_of(request).store.call(inv.protect, name, disks, policy, group, ps)
    logger.info("machine protected" if created else "protection changed", MACHINE=name, disks=",".join(disks),
                policy=policy, GROUP=group, process_server=machine["process_server"], by=str(request[PRINCIPAL_KEY]))
    return web.json_response(machine, status=201 if created else 200)


async def delete_machine(request):
    require(request)
    machine = await ctx_of(request).store.call(inv.unprotect, request.match_info["machine"])
    try:
        ctx_of(request).metrics.last_heartbeat.remove(machine["name"])
    except KeyError:
        pass   # it never sent a heartbeat
    logger.warning("machine unprotected (its points stay in the repository)", MACHINE=machine["name"],
                   by=str(request[PRINCIPAL_KEY]))
    return web.json_response(machine)


async def post_move(request):
    require(request)
    body = await read_json(request, {"process_server": str})
    machine = await ctx_of(request).store.call(inv.request_move, request.match_info["machine"], body["process_server"])
    logger.info("machine move requested", MACHINE=machine["name"], to=machine["move_to"],
                current=machine["process_server"])
    return web.json_response(machine, status=202 if machine["move_to"] else 200)


async def get_process_servers(request):
    require(request)
    return web.json_response({"process_servers": await ctx_of(request).store.call(inv.list_process_servers)})


# --- heartbeat and status -----------------------------------------------------------------------

def _check_report(body: dict, machine: str) -> dict:
    """Keep only well-typed, bounded fields of an agent's report (it is shown to operators)."""
    disks = body.get("disks", {})
    if not isinstance(disks, dict) or len(disks) > MAX_DISKS_PER_MACHINE:
        raise ApiError(400, "bad_request", f"disks must be an object of at most {MAX_DISKS_PER_MACHINE} disks")
    clean = {}
    for disk_id, d in disks.items():
        if not isinstance(disk_id, str) or not disk_id.startswith(machine + ".") or not isinstance(d, dict):
            raise ApiError(400, "bad_request", f"disk {disk_id!r} is not a disk of machine {machine} "
                           f"(ids are {machine}.<disk>)")
        entry = {}
        for key, tp in (("tracker", str), ("tier", str), ("tier_reason", str), ("last_resync_reason", str)):
            if isinstance(d.get(key), tp):
                entry[key] = d[key][:MAX_REPORTED_TEXT]
        for key in ("backlog_bytes", "acked_seq"):
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool) and d[key] >= 0:
                entry[key] = d[key]
        for key in ("churn_bytes_per_second", "last_resync_at"):
            if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool) and d[key] >= 0:
                entry[key] = float(d[key])
        clean[disk_id] = entry
    state = body.get("state", "replicating")
    last = body.get("last_point")
    return {"state": state[:64] if isinstance(state, str) else "unknown", "disks": clean,
            "last_point": last if isinstance(last, dict) and isinstance(last.get("point_id"), str) else None}


async def _drained(request, machine: dict, report: dict) -> str | None:
    """None once every disk's acknowledged batches are in the repository (a move can proceed); else why not."""
    repo = _repo(request)
    for d in machine["disks"]:
        disk_id = f"{machine['name']}.{d}"
        acked = report["disks"].get(disk_id, {}).get("acked_seq")
        if acked is None:
            return f"the agent has not reported disk {disk_id}'s acknowledged sequence yet"
        segs = await repo.list_segments(disk_id)
        uploaded = segs[-1] if segs else 0
        if uploaded < acked:
            return f"{machine['process_server']} has uploaded {disk_id} up to {uploaded} of {acked}"
    return None


async def post_heartbeat(request):
    """The agent's per-cycle report; the answer tells it its policy and process server (and to hold for a move)."""
    name = request.match_info["machine"]
    require(request, "agent", machine=name)
    ctx = ctx_of(request)
    report = _check_report(await read_json(request), name)
    machine = await ctx.store.call(inv.get_machine, name)
    received = await ctx.store.call(inv.store_heartbeat, name, report)
    ctx.metrics.last_heartbeat.labels(name).set(received)
    hold_reason = None
    if machine["move_to"]:
        hold_reason = await _drained(request, machine, report)
        if hold_reason is None:
            old = machine["process_server"]
            machine = await ctx.store.call(inv.finish_move, name)
            logger.info("machine moved", MACHINE=name, old=old, new=machine["process_server"])
    policy = await ctx.store.call(inv.get_policy, machine["policy"])
    url = await ctx.store.call(inv.process_server_url, machine["process_server"])
    return web.json_response({"machine": name, "policy": policy,
                              "process_server": {"name": machine["process_server"], "url": url},
                              "hold": hold_reason is not None, "hold_reason": hold_reason})


async def _status_rows(request, only: str | None = None) -> list[dict]:
    ctx = ctx_of(request)
    machines = await ctx.store.call(inv.list_machines)
    if only is not None:
        machines = [m for m in machines if m["name"] == only]
        if not machines:
            await ctx.store.call(inv.get_machine, only)   # raises the 404 with the way out
    policies = {p["name"]: p for p in await ctx.store.call(inv.list_policies)}
    beats = await ctx.store.call(inv.heartbeats)
    points = points_by_machine(await list_entries(request), {m["name"]: m for m in machines})
    cache = getattr(ctx.server, "cache", None)
    now = time.time()
    rows = []
    for m in machines:
        backlog = {}
        if cache is not None:
            for d in m["disks"]:
                disk_id = f"{m['name']}.{d}"
                if cache.known(disk_id):
                    backlog[disk_id] = cache.backlog_bytes(disk_id)
        rows.append(machine_status(m, policies[m["policy"]], beats.get(m["name"]), points.get(m["name"], []),
                                   backlog, now))
    return rows


async def get_status(request):
    require(request)
    return web.json_response({"machines": await _status_rows(request)})


async def get_machine_status(request):
    machine = request.match_info["machine"]
    require(request, "agent", machine=machine)
    return web.json_response((await _status_rows(request, machine))[0])


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(API_PREFIX + "/policies", get_policies)
    r.add_get(API_PREFIX + "/policies/{policy}", get_policy)
    r.add_put(API_PREFIX + "/policies/{policy}", put_policy)
    r.add_get(API_PREFIX + "/groups", get_groups)
    r.add_post(API_PREFIX + "/groups", post_group)
    r.add_get(API_PREFIX + "/machines", get_machines)
    r.add_get(API_PREFIX + "/machines/{machine}", get_machine)
    r.add_put(API_PREFIX + "/machines/{machine}", put_machine)
    r.add_delete(API_PREFIX + "/machines/{machine}", delete_machine)
    r.add_post(API_PREFIX + "/machines/{machine}/move", post_move)
    r.add_post(API_PREFIX + "/machines/{machine}/heartbeat", post_heartbeat)
    r.add_get(API_PREFIX + "/machines/{machine}/status", get_machine_status)
    r.add_get(API_PREFIX + "/process-servers", get_process_servers)
    r.add_get(API_PREFIX + "/status", get_status)
