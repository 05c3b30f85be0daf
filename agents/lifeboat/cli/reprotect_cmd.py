"""`lifeboat reprotect` and `lifeboat failback`: replicate a failed-over disk back to the master target."""

from __future__ import annotations

import asyncio
import functools
import json

from .control_args import add_api_args

# aiohttp and the reprotect client are imported where used: every `lifeboat` command (a failover too)
# parses this module's arguments, and aiohttp alone costs ~0.1 s of start-up.


def _clear_errors(fn):
    """Network and file errors become one line naming what failed and what to check (no traceback)."""
    @functools.wraps(fn)
    async def wrapper(args) -> int:
        import aiohttp

        from ..mobility.reprotect import ReprotectError

        try:
            return await fn(args)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ReprotectError(args.disk, f"cannot talk to {args.via or args.master_target}: "
                                 f"{exc or type(exc).__name__}; check the URL, that the daemon runs, and --ca-cert") from None
        except OSError as exc:
            what = exc.filename or "one of --source-image, --ca-cert, --token-file"
            raise ReprotectError(args.disk, f"cannot read {what}: {exc.strerror or exc}") from None
    return wrapper


def _token(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _endpoints(args):
    from ..mobility.reprotect import Endpoint

    mt = Endpoint(args.master_target, args.ca_cert, _token(args.token_file))
    via = None
    if args.via:
        via = Endpoint(args.via, args.via_ca_cert or args.ca_cert, _token(args.via_token_file or args.token_file))
    return mt, via


def _bookmark_machine(args, disk: str) -> str:
    """Bookmarks name the machine that owns the disk (readers refuse others): disk ids are <machine>.<disk>."""
    return args.target or args.machine or disk.split(".", 1)[0]


async def record_step(args, step: str) -> None:
    """With a management API configured, the control plane records the step (and may refuse it: nothing is sent)."""
    from ..mobility.reprotect import ReprotectError
    from .control_args import api_configured, client_from_args

    if not api_configured(args):
        return
    if not args.target:
        raise ReprotectError(args.disk, f"a management API is configured: name the machine ('lifeboat {args.command} "
                             "MACHINE ...') so the control plane records the failback step")
    async with client_from_args(args) as api:
        out = await api.call("POST", f"/machines/{args.target}/failback", {"step": step})
    if not args.quiet and not args.json:
        print(f"control plane: {args.target} {out['from']} -> {out['state']}"
              + (" (on-prem machine powered off)" if out["powered_off"] else ""))


@_clear_errors
async def cmd_reprotect(args) -> int:
    from ..mobility.reprotect import reprotect

    mt, via = _endpoints(args)
    await record_step(args, "reprotect")   # before a byte is sent: the on-prem machine must be off first
    disk = args.new_disk if args.alternate else args.disk
    res = await reprotect(args.source_image, disk, mt, via, alternate=args.alternate, block_size=args.block_size,
                          batch_bytes=args.batch_bytes, machine=_bookmark_machine(args, disk), point_id=args.point_id,
                          consistency=args.consistency, wait=not args.no_wait)
    if args.json:
        print(json.dumps(res.as_dict(), sort_keys=True))
    elif not args.quiet:
        print(f"{res.mode}-location reprotect of {res.disk_id}: {res.changed_bytes} changed bytes "
              f"({res.zero_bytes} zeroed) of {res.disk_size} sent in batches {res.first_seq}..{res.last_seq} "
              f"({res.sent_body_bytes} bytes on the wire), point {res.point_id}"
              + (", applied" if res.applied else ", not yet applied"))
    return 0


@_clear_errors
async def cmd_failback(args) -> int:
    from ..mobility.reprotect import failback

    mt, via = _endpoints(args)
    if args.stage in ("prepare", "all"):
        await record_step(args, "prepare")
    out = await failback(args.source_image, args.disk, mt, via, stage=args.stage, rollback_point=args.point,
                         block_size=args.block_size,
                         batch_bytes=args.batch_bytes, machine=_bookmark_machine(args, args.disk),
                         point_id=args.point_id, consistency=args.consistency)
    if args.stage in ("switch", "all", "cancel"):
        await record_step(args, "cancel" if args.stage == "cancel" else "switch")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    elif not args.quiet:
        if args.stage == "rollback":
            print(f"{args.disk} switched back to failback point {args.point} (sequence {out['applied_seq']})")
        elif args.stage == "cancel":
            print(f"failover back of {args.disk} cancelled: {len(out['dropped'])} held batches dropped, the disk "
                  f"stays at sequence {out['applied_seq']}")
        elif args.stage == "prepare":
            print(f"failover back of {args.disk} prepared: final sync of {out['changed_bytes']} bytes journaled, "
                  "not applied; run --stage switch (or cancel)")
        else:
            print(f"failed back {args.disk}: the on-prem disk is at point {out.get('point_id')} "
                  f"(sequence {out['applied_seq']})")
    return 0


def add_parser(sub) -> None:
    for name, help_ in (("reprotect", "replicate a failed-over disk image back to the on-prem master target"),
                        ("failback", "planned failover back: final sync (quiesce the source first), then the "
                                     "on-prem disk is switched to that point (the latest)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("target", nargs="?", metavar="MACHINE",
                       help="the machine (required with a management API: the control plane records the step)")
        add_api_args(p)
        p.add_argument("--source-image", required=name == "reprotect",
                       help="the failed-over disk (image file or block device)")
        p.add_argument("--disk", required=True, help="disk id on the master target (original location)")
        p.add_argument("--master-target", required=True, metavar="URL", help="https://host:9444")
        p.add_argument("--ca-cert", required=True, help="CA that signed the master target's certificate")
        p.add_argument("--token-file", required=True, help="this sender's token, registered on the master target")
        p.add_argument("--via", metavar="URL", help="send batches through this process server (forward mode)")
        p.add_argument("--via-ca-cert", help="CA of the process server (default: --ca-cert)")
        p.add_argument("--via-token-file", help="agent token of the process server (default: --token-file)")
        p.add_argument("--block-size", type=int, default=64 * 1024, help="digest block size (default 65536)")
        p.add_argument("--batch-bytes", type=int, default=16 * 1024 * 1024, help="payload bytes per batch")
        p.add_argument("--machine", help="machine name recorded in the bookmark (default: MACHINE, else the "
                                         "disk id's machine part)")
        p.add_argument("--point-id", help="the bookmark's point id (default reprotect-<unix time>)")
        p.add_argument("--consistency", default="crash" if name == "failback" else "none",
                       choices=("app", "crash", "none"), help="what the bookmark claims (quiesce the source first)")
        p.add_argument("--json", action="store_true")
        p.add_argument("-q", "--quiet", action="store_true")
        if name == "reprotect":
            p.add_argument("--no-wait", action="store_true", help="return once journaled, not applied")
            p.add_argument("--alternate", action="store_true",
                           help="alternate location: the master target creates a new image and everything is sent")
            p.add_argument("--new-disk", help="disk id of the new image (with --alternate)")
        else:
            p.add_argument("--stage", choices=("all", "prepare", "switch", "cancel", "rollback"), default="all",
                           help="prepare: hold the on-prem disk and journal the final sync (cancellable); switch: "
                                "apply it; cancel: drop it (only before switch); all: prepare + switch; rollback: "
                                "switch the on-prem disk to an earlier retained failback point (--point)")
            p.add_argument("--point", help="with --stage rollback: the failback point id")
        p.set_defaults(fn=cmd_reprotect if name == "reprotect" else cmd_failback, alternate=False, new_disk=None,
                       no_wait=False, command=name)
