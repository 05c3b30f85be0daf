"""`lifeboat reenable MACHINE`: the failback's last step; the control plane takes the machine's batches again."""

from __future__ import annotations

import json

from .control_args import add_api_args, client_from_args


async def cmd_reenable(args) -> int:
    async with client_from_args(args) as api:
        out = await api.call("POST", f"/machines/{args.machine}/failback", {"step": "reenable"})
        steps = (await api.call("GET", f"/machines/{args.machine}/failback"))["steps"]
    if args.json:
        print(json.dumps({**out, "steps": steps}, sort_keys=True))
    elif not args.quiet:
        print(f"{args.machine} {out['from']} -> {out['state']}: start its agent on the failed-back disk (it resyncs "
              "by digest against the repository, sending only what differs)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("reenable", help="after 'failback --stage switch': protect the machine forward again")
    add_api_args(p)
    p.add_argument("machine")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_reenable)
