"""The management API (`/api/v1`, HTTPS, JSON): routes, authentication, errors as {error, message}."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import __version__
from ..core import logging as log
from . import auth
from .auth import NAME_RE, Principal, Refused
from .inventory import InventoryError
from .metrics import ControlMetrics
from .store import Store

logger = log.get("lifeboat.control.api")
API_PREFIX = "/api/v1"
MAX_REQUEST_BYTES = 64 * 1024    # every request body is JSON of a few fields
CTX_KEY = web.AppKey("control_ctx", object)
PRINCIPAL_KEY = web.RequestKey("lifeboat_principal", Principal)


class ApiError(Exception):
    """A request the API refuses with a 4xx: `code` is stable, `message` says what was wrong and what to do."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class ControlContext:
    """What route handlers need; later modules add their own attributes through `extra`."""

    store: Store
    metrics: ControlMetrics
    credential_ttl_seconds: float | None = None
    server_name: str = "primary"
    extra: dict[str, Any] = field(default_factory=dict)
    server: Any = None   # the ProcessServer the role runs in: its repository (.repo) and cache (.cache)


def ctx_of(request: web.Request) -> ControlContext:
    return request.app[CTX_KEY]  # type: ignore[return-value]


async def read_json(request: web.Request, required: dict[str, type] | None = None) -> dict:
    """The request's JSON object (bounded by client_max_size), with `required` fields type-checked."""
    if request.content_length is None and request.body_exists and request.headers.get("Transfer-Encoding"):
        raise ApiError(411, "bad_request", "send the JSON body with a Content-Length (not chunked)")
    raw = await request.read() if request.body_exists else b"{}"
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"the request body is not JSON ({exc}): send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    for name, tp in (required or {}).items():
        value = body.get(name)
        if value is None:
            raise ApiError(400, "bad_request", f"field {name!r} is required")
        if not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
            raise ApiError(400, "bad_request", f"field {name!r} must be a {tp.__name__}, got {type(value).__name__}")
    return body


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ApiError(400, "bad_request", f"{what} {value!r} must match {NAME_RE.pattern} (lower-case letters, "
                       "digits, '_' or '-', at most 32)")
    return value


def _refuse(request: web.Request, exc: Refused, principal: Principal | None = None) -> web.Response:
    ctx = ctx_of(request)
    ctx.metrics.refusals.labels(exc.reason).inc()
    logger.warning("api call refused", reason=exc.reason, status=exc.status, detail=exc.message,
                   principal=str(principal) if principal else None, method=request.method, path=request.path,
                   peer=request.remote)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return web.json_response({"error": exc.reason, "message": exc.message}, status=exc.status, headers=headers)


async def authenticate(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        raise Refused(401, "unauthenticated", "no credential: send 'Authorization: Bearer <token>' with the token "
                      "from the credential file ('lifeboat init' for the operator, 'lifeboat register' otherwise)")
    return await ctx_of(request).store.call(auth.authenticate, header[7:].strip())


def require(request: web.Request, *kinds: str, machine: str | None = None) -> Principal:
    """Authorise the authenticated principal: one of `kinds`; an agent only for its own `machine`."""
    principal: Principal = request[PRINCIPAL_KEY]
    if principal.kind == "operator":
        return principal
    if principal.kind not in kinds:
        raise Refused(403, "forbidden", f"{principal} may not {request.method} {request.path}: this call needs "
                      f"{' or '.join(('operator',) + kinds)} credentials")
    if principal.kind == "agent" and machine is not None and principal.name != machine:
        raise Refused(403, "forbidden", f"{principal} may act only on its own machine {principal.name!r}, "
                      f"not on {machine!r}: use machine {machine}'s own credential")
    return principal


PUBLIC_ROUTES = {(API_PREFIX + "/version", "GET"), (API_PREFIX + "/register", "POST")}


@web.middleware
async def api_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    ctx = ctx_of(request)
    principal = None
    try:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
        if (route, request.method) not in PUBLIC_ROUTES and request.match_info.http_exception is None:
            principal = request[PRINCIPAL_KEY] = await authenticate(request)
        resp = await handler(request)
    except Refused as exc:
        resp = _refuse(request, exc, principal)
    except InventoryError as exc:
        resp = web.json_response({"error": exc.code, "message": exc.message}, status=exc.status)
        logger.info("api call rejected", code=exc.code, status=exc.status, detail=exc.message,
                    principal=str(principal) if principal else None, method=request.method, path=request.path)
    except ApiError as exc:
        logger.info("api call rejected", code=exc.code, status=exc.status, detail=exc.message,
                    principal=str(principal) if principal else None, method=request.method, path=request.path)
        resp = web.json_response({"error": exc.code, "message": exc.message, **exc.extra}, status=exc.status)
    except web.HTTPRequestEntityTooLarge:
        resp = web.json_response({"error": "too_large", "message": f"request body over {MAX_REQUEST_BYTES} bytes: "
                                  "API requests are small JSON objects"}, status=413)
    except web.HTTPException as exc:
        if exc.status == 404:
            msg = f"no API route {request.method} {request.path}: see /api/v1 in openapi.json"
        elif exc.status == 405:
            msg = f"{request.method} is not allowed on {request.path}"
        else:
            msg = exc.reason
        resp = web.json_response({"error": "not_found" if exc.status == 404 else "bad_request", "message": msg},
                                 status=exc.status)
    except sqlite3.Error as exc:
        logger.exception("control database error", path=request.path)
        resp = web.json_response({"error": "internal", "message": f"database error: {exc}; retry, and see the "
                                  "process server's log"}, status=500)
    except Exception as exc:  # noqa: BLE001 - a bug in one handler answers 500, never takes the daemon down
        logger.exception("api handler failed", method=request.method, path=request.path)
        resp = web.json_response({"error": "internal", "message": f"{type(exc).__name__}: {exc}; see the process "
                                  "server's log"}, status=500)
    ctx.metrics.requests.labels(f"{resp.status // 100}xx").inc()
    return resp


# --- routes of this module --------------------------------------------------------------------

async def get_version(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    return web.json_response({"api": "v1", "version": __version__, "schema_version": ctx.store.schema_version,
                              "server": ctx.server_name})


async def post_register(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await read_json(request, {"passphrase": str, "kind": str, "name": str})
    kind = body["kind"]
    if kind not in ("agent", "process-server"):
        raise ApiError(400, "bad_request", f"kind {kind!r} cannot register: use 'agent' or 'process-server' "
                       "(operator credentials come from 'lifeboat init' or 'lifeboat credentials issue')")
    name = check_name("name", body["name"])
    url = body.get("url", "")
    if kind == "process-server" and (not isinstance(url, str) or not url.startswith("https://")):
        raise ApiError(400, "bad_request", "a process server registers with its ingest 'url' (https://host:port), "
                       "which agents assigned to it will use")
    if len(body["passphrase"]) > auth.MAX_TOKEN_CHARS:
        raise Refused(403, "bad_passphrase", "the registration passphrase is wrong")

    def run(conn):
        if kind == "process-server" and conn.execute("SELECT 1 FROM process_servers WHERE name = ? AND is_primary = 1",
                                                     (name,)).fetchone():
            raise ApiError(409, "conflict", f"{name} is the primary process server's name: register the scale-out "
                           "under another name")
        cred_id, token = auth.register(conn, body["passphrase"], kind, name, ctx.credential_ttl_seconds)
        if kind == "process-server":
            conn.execute("INSERT INTO process_servers (name, url, is_primary, registered) VALUES (?, ?, 0, ?) "
                         "ON CONFLICT(name) DO UPDATE SET url = excluded.url", (name, url, time.time()))
        return cred_id, token

    cred_id, token = await ctx.store.call(run)
    logger.info("principal registered", kind=kind, name=name, credential=cred_id, peer=request.remote)
    return web.json_response({"credential_id": cred_id, "token": token, "principal": f"{kind}:{name}"}, status=201)


async def get_whoami(request: web.Request) -> web.Response:
    p: Principal = request[PRINCIPAL_KEY]
    return web.json_response({"kind": p.kind, "name": p.name, "credential_id": p.credential_id,
                              "principal": str(p)})


async def get_credentials(request: web.Request) -> web.Response:
    require(request)
    return web.json_response({"credentials": await ctx_of(request).store.call(auth.list_credentials)})


async def post_credential_issue(request: web.Request) -> web.Response:
    require(request)
    body = await read_json(request, {"kind": str, "name": str})
    if body["kind"] not in auth.PRINCIPAL_KINDS:
        raise ApiError(400, "bad_request", f"kind {body['kind']!r} must be one of {', '.join(auth.PRINCIPAL_KINDS)}")
    name = check_name("name", body["name"])
    ttl = body.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
        raise ApiError(400, "bad_request", "ttl_seconds must be a positive number (omit it for no expiry)")
    cred_id, token = await ctx_of(request).store.call(auth.issue, body["kind"], name, ttl)
    logger.info("credential issued", kind=body["kind"], name=name, credential=cred_id,
                by=str(request[PRINCIPAL_KEY]))
    return web.json_response({"credential_id": cred_id, "token": token, "principal": f"{body['kind']}:{name}"},
                             status=201)


async def post_credential_revoke(request: web.Request) -> web.Response:
    require(request)
    cred_id = request.match_info["credential_id"]
    body = await read_json(request)
    reason = str(body.get("reason", "revoked by the operator"))[:200]
    row = await ctx_of(request).store.call(auth.revoke, cred_id, reason)
    if row is None:
        raise ApiError(404, "not_found", f"no credential {cred_id!r}: 'lifeboat credentials list' shows them")
    logger.warning("credential revoked", credential=cred_id, principal=f"{row['kind']}:{row['name']}",
                   by=str(request[PRINCIPAL_KEY]), reason=reason)
    return web.json_response(row)


async def post_credential_check(request: web.Request) -> web.Response:
    """A scale-out process server asks whose a token is (it validates agents' batches with this)."""
    require(request, "process-server")
    body = await read_json(request, {"token": str})
    try:
        p = await ctx_of(request).store.call(auth.authenticate, body["token"])
    except Refused as exc:
        return web.json_response({"valid": False, "reason": exc.reason, "message": exc.message})
    return web.json_response({"valid": True, "kind": p.kind, "name": p.name, "credential_id": p.credential_id})


async def post_passphrase_rotate(request: web.Request) -> web.Response:
    """A new registration passphrase (the old one stops working); returned once, stored as a hash."""
    require(request)
    passphrase = auth.new_passphrase()
    await ctx_of(request).store.call(auth.install_passphrase, passphrase, True)
    logger.warning("registration passphrase rotated", by=str(request[PRINCIPAL_KEY]))
    return web.json_response({"passphrase": passphrase})


def build_app(ctx: ControlContext) -> web.Application:
    """The API application; other modules add routes (`app.router.add_*`) before it is started."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[api_middleware])
    app[CTX_KEY] = ctx
    r = app.router
    r.add_get(API_PREFIX + "/version", get_version)
    r.add_post(API_PREFIX + "/register", post_register)
    r.add_get(API_PREFIX + "/whoami", get_whoami)
    r.add_get(API_PREFIX + "/credentials", get_credentials)
    r.add_post(API_PREFIX + "/credentials", post_credential_issue)
    r.add_post(API_PREFIX + "/credentials/{credential_id}/revoke", post_credential_revoke)
    r.add_post(API_PREFIX + "/credentials/check", post_credential_check)
    r.add_post(API_PREFIX + "/registration/passphrase", post_passphrase_rotate)
    from . import failover_api, inventory_api
    inventory_api.add_routes(app)
    failover_api.add_routes(app)
    from . import plans_api; plans_api.add_routes(app)  # noqa: E702 - recovery plans (control/plans*.py)
    from . import failback_api; failback_api.add_routes(app)  # noqa: E702 - failback states (control/failback.py)
    return app
