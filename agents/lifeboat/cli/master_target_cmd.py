"""`lifeboat master-target`: register target disks and senders in a master target's registry."""

from __future__ import annotations

import json

from ..master_target.registry import Registry, RegistryError


async def cmd_master_target(args) -> int:
    reg = Registry(args.state_dir)
    if args.action == "add-disk":
        disk = reg.add_disk(args.disk, args.target, args.size, create=args.create)
        print(json.dumps({"disk_id": disk.disk_id, "path": disk.path, "size": disk.size}))
    elif args.action == "add-sender":
        with open(args.token_file) as f:
            reg.add_sender(args.name, f.read())
        print(json.dumps({"sender": args.name}))
    else:
        print(json.dumps({"disks": {d.disk_id: {"path": d.path, "size": d.size} for d in reg.disks.values()},
                          "senders": sorted(reg.senders)}, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("master-target", help="register disks and senders on a master target (failback)")
    p.add_argument("--state-dir", default="/var/lib/lifeboat/master-target", help="the master target's state_dir")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add-disk", help="map a disk id to an on-prem target (block device or image file)")
    a.add_argument("--disk", required=True)
    a.add_argument("--target", required=True, help="block device or image file")
    a.add_argument("--size", type=int, help="expected size in bytes (checked against the target)")
    a.add_argument("--create", action="store_true", help="create a new zero-filled image of --size bytes")
    a = actions.add_parser("add-sender", help="trust a sender (agent or process server) by its bearer token")
    a.add_argument("--name", required=True)
    a.add_argument("--token-file", required=True)
    actions.add_parser("list", help="print the registry")
    p.set_defaults(fn=cmd_master_target)


__all__ = ["RegistryError", "add_parser"]
