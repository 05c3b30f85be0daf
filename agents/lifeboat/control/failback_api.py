"""Routes recording a machine's failback steps (the CLI talks to the master target; this keeps the state)."""

from __future__ import annotations

from aiohttp import web

from ..core import logging as log
from . import failback as fb
from .api import API_PREFIX, PRINCIPAL_KEY, ApiError, ctx_of, read_json, require

logger = log.get("lifeboat.control.failback")


async def post_step(request):
    require(request)
    name = request.match_info["machine"]
    body = await read_json(request, {"step": str})
    if body["step"] not in fb.STEPS:
        raise ApiError(400, "bad_request", f"step must be one of {', '.join(fb.STEPS)}")
    out = await ctx_of(request).store.call(fb.record_step, name, body["step"], str(request[PRINCIPAL_KEY]))
    logger.info("failback step recorded", MACHINE=name, step=out["step"], was=out["from"], state=out["state"],
                powered_off=out["powered_off"], by=str(request[PRINCIPAL_KEY]))
    return web.json_response(out)


async def get_steps(request):
    require(request)
    name = request.match_info["machine"]
    return web.json_response({"machine": name, "steps": await ctx_of(request).store.call(fb.history, name)})


def add_routes(app: web.Application) -> None:
    app.router.add_post(API_PREFIX + "/machines/{machine}/failback", post_step)
    app.router.add_get(API_PREFIX + "/machines/{machine}/failback", get_steps)
