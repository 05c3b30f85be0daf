"""Operator commands for the inventory: protect, unprotect, policy, group, move, process-servers, status."""

from __future__ import annotations

import json
import time

from ..control.inventory import POLICY_FIELDS
from ..core.errors import LifeboatError
from .control_args import add_api_args, client_from_args


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


async def cmd_protect(args) -> int:
    body = {"disks": args.disk, "policy": args.policy}
    if args.group:
        body["group"] = args.group
    if args.process_server:
        body["process_server"] = args.process_server
    async with client_from_args(args) as api:
        _print(await api.call("PUT", f"/machines/{args.machine}", body))
    return 0


async def cmd_unprotect(args) -> int:
    async with client_from_args(args) as api:
        _print(await api.call("DELETE", f"/machines/{args.machine}"))
    return 0


async def cmd_policy(args) -> int:
    async with client_from_args(args) as api:
        if args.action == "list":
            _print((await api.call("GET", "/policies"))["policies"])
            return 0
        if not args.name:
            raise LifeboatError(f"policy {args.action} needs the policy NAME")
        if args.action == "show":
            _print(await api.call("GET", f"/policies/{args.name}"))
            return 0
        changes = {f: getattr(args, f) for f in POLICY_FIELDS if getattr(args, f) is not None}
        if args.retention_days is not None:
            changes["retention_seconds"] = args.retention_days * 86400
        _print(await api.call("PUT", f"/policies/{args.name}", changes))
    return 0


async def cmd_group(args) -> int:
    async with client_from_args(args) as api:
        if args.action == "list":
            _print((await api.call("GET", "/groups"))["groups"])
            return 0
        if not args.name:
            raise LifeboatError("group create needs the group NAME")
        _print(await api.call("POST", "/groups", {"name": args.name}))
    return 0


async def cmd_move(args) -> int:
    async with client_from_args(args) as api:
        _print(await api.call("POST", f"/machines/{args.machine}/move", {"process_server": args.to}))
    return 0


async def cmd_process_servers(args) -> int:
    async with client_from_args(args) as api:
        _print((await api.call("GET", "/process-servers"))["process_servers"])
    return 0


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


async def cmd_status(args) -> int:
    async with client_from_args(args) as api:
        if args.machine:
            rows = [await api.call("GET", f"/machines/{args.machine}/status")]
        else:
            rows = (await api.call("GET", "/status"))["machines"]
    if args.json:
        _print(rows)
        return 0
    print(f"{'MACHINE':<16} {'STATE':<13} {'HEALTH':<9} {'RPO':>6} {'BACKLOG':>10} {'CHURN/s':>10} {'TIER':<8} "
          f"{'LAST APP POINT':<20} {'PS':<10} LAST RESYNC")
    for r in rows:
        app = r["last_app_point"]
        app_text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(app["created"])) if app else "-"
        resync = r["last_resync"]
        resync_text = f"{resync['disk']}: {resync['reason']}" if resync else "-"
        ps = r["process_server"] + (f"->{r['move_to']}" if r["move_to"] else "")
        print(f"{r['machine']:<16} {r['state']:<13} {r['health']:<9} {_age(r['rpo_seconds']):>6} "
              f"{_bytes(r['backlog_bytes']):>10} {_bytes(r['churn_bytes_per_second']):>10} "
              f"{r['tracking_tier'] or '-':<8} {app_text:<20} {ps:<10} {resync_text}")
        if r.get("powered_off"):
            print(f"  {r['machine']}: on-prem machine powered off ({r['state']}): its agent's batches are refused")
        for why in r["health_reasons"]:
            print(f"  {r['machine']}: {why}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("protect", help="protect a machine (disks, replication policy, group, process server)")
    add_api_args(p)
    p.add_argument("machine")
    p.add_argument("--disk", action="append", required=True, help="a disk as named in the agent config (repeat)")
    p.add_argument("--policy", default="default")
    p.add_argument("--group", help="consistency group ('lifeboat group create' first)")
    p.add_argument("--process-server", help="process server the agent sends to (default: the primary)")
    p.set_defaults(fn=cmd_protect)

    p = sub.add_parser("unprotect", help="stop protecting a machine (its points stay in the repository)")
    add_api_args(p)
    p.add_argument("machine")
    p.set_defaults(fn=cmd_unprotect)

    p = sub.add_parser("policy", help="replication policies: RPO threshold, retention, consistency intervals")
    add_api_args(p)
    p.add_argument("action", choices=("list", "show", "set"))
    p.add_argument("name", nargs="?")
    for f in POLICY_FIELDS:
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=float)
    p.add_argument("--retention-days", type=float, help="the same as --retention-seconds × 86400")
    p.set_defaults(fn=cmd_policy)

    p = sub.add_parser("group", help="multi-machine consistency groups")
    add_api_args(p)
    p.add_argument("action", choices=("list", "create"))
    p.add_argument("name", nargs="?")
    p.set_defaults(fn=cmd_group)

    p = sub.add_parser("move", help="move a machine to another process server (no full resync)")
    add_api_args(p)
    p.add_argument("machine")
    p.add_argument("--to", required=True, help="the process server's name ('lifeboat process-servers')")
    p.set_defaults(fn=cmd_move)

    p = sub.add_parser("process-servers", help="list the registered process servers")
    add_api_args(p)
    p.set_defaults(fn=cmd_process_servers)

    p = sub.add_parser("status", help="one row per protected machine: state, RPO, backlog, churn, tier, health")
    add_api_args(p)
    p.add_argument("machine", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
