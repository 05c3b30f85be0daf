"""`lifeboat`: initialise, list points, fail over (test), verify the repository."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time

from .. import __version__
from ..core import config as cfgmod
from ..core import keys, tls
from ..core import logging as lblog
from ..core.errors import IntegrityError, LifeboatError
from ..repository.materialize import materialize
from ..repository.open import backend_from_url
from ..repository.repo import Repository
from ..repository.verify import verify_repository
from ..mobility.group_wire import NAME_RE
from . import control, doctor, inventory
from . import plan_cmd
from ..control.auth import new_passphrase, new_token
from .control import write_secret
from .control_args import add_api_args, api_configured
from . import control_failover as control_failover_cli
from .control_failover import control_failover
from . import retention_cmd
from ..core import malloc as malloc_pin
from . import azure_failover, key_cmd, master_target_cmd, push_install, reprotect_cmd
from .points import GroupFailoverRefused, group_points, machine_points, point_group, resolve, resolve_group
from .repo_args import add_repo_args, open_from_args


def _progress(label: str):
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done != total and now - last[0] < 0.5:
            return
        last[0] = now
        width = 30
        fill = int(width * done / max(total, 1))
        line = f"{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}"
        print(("\r" + line) if tty else line, end="" if tty and done != total else "\n", file=sys.stderr, flush=True)

    return show


async def cmd_init(args) -> int:
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    tls_dir = os.path.join(d, "tls")
    if os.path.exists(os.path.join(tls_dir, "ca.pem")):
        raise LifeboatError(f"{tls_dir}/ca.pem exists: {d} is already initialised")
    ca_pem, ca_key = tls.create_ca(tls_dir)
    hosts = [h for h in args.hosts.split(",") if h]
    tls.issue_server_cert(ca_pem, ca_key, tls_dir, "server", hosts)
    token_path = os.path.join(d, "agent.token")
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    # Configuration-server bootstrap secrets (the daemon stores their hashes at first start).
    passphrase_path, operator_path = os.path.join(d, "registration.passphrase"), os.path.join(d, "operator.credential")
    write_secret(passphrase_path, new_passphrase())
    write_secret(operator_path, new_token())
    repo_url = args.repo or f"local:{os.path.join(d, 'repository')}"
    if args.passphrase_file:
        with open(args.passphrase_file) as f:
            unlocker = keys.Unlocker.from_passphrase(f.read().strip())
        key_path = ""
    else:
        key_path = os.path.join(d, "repository.key")
        unlocker = keys.write_key_file(key_path)
    conn = None
    if args.azure_connection_string_file:
        with open(args.azure_connection_string_file) as f:
            conn = f.read().strip()
    backend = backend_from_url(repo_url, conn)
    try:
        repo = await Repository.init(backend, unlocker)
    finally:
        await backend.close()
    print(json.dumps({"ca_cert": ca_pem, "server_cert": os.path.join(tls_dir, "server.pem"),
                      "server_key": os.path.join(tls_dir, "server.key"), "agent_token": token_path,
                      "repository": repo_url, "repository_id": repo.id, "key_file": key_path or None,
                      "registration_passphrase": passphrase_path, "operator_credential": operator_path}, indent=2))
    return 0


RESERVED_CERT_NAMES = ("ca", "server")   # lifeboat init's own files in <dir>/tls


async def cmd_member_cert(args) -> int:
    """A consistency-group member's certificate (CN = machine name) from the CA of `lifeboat init`."""
    tls_dir = os.path.join(os.path.abspath(args.dir), "tls")
    ca_pem, ca_key = os.path.join(tls_dir, "ca.pem"), os.path.join(tls_dir, "ca.key")
    for path in (ca_pem, ca_key):
        if not os.path.isfile(path):
            raise LifeboatError(f"{path} does not exist: member certificates are issued by the CA of "
                                f"'lifeboat init --dir {args.dir}' (run it first, or pass the --dir it used)")
    if not NAME_RE.fullmatch(args.machine):
        raise LifeboatError(f"machine name {args.machine!r} must match {NAME_RE.pattern}: it is the member's "
                            "identity (certificate common name) on the group port")
    if args.machine in RESERVED_CERT_NAMES:
        raise LifeboatError(f"machine name {args.machine!r} would overwrite {tls_dir}/{args.machine}.pem of "
                            "'lifeboat init'; choose another name")
    cert, key = os.path.join(tls_dir, f"{args.machine}.pem"), os.path.join(tls_dir, f"{args.machine}.key")
    if not args.overwrite and (os.path.exists(cert) or os.path.exists(key)):
        raise LifeboatError(f"{cert} exists; pass --overwrite to issue a new certificate for {args.machine}")
    hosts = [h.strip() for h in (args.hosts or args.machine).split(",") if h.strip()]
    cert, key = tls.issue_member_cert(ca_pem, ca_key, tls_dir, args.machine, hosts)
    print(json.dumps({"cert": cert, "key": key, "ca_cert": ca_pem, "common_name": args.machine, "hosts": hosts},
                     indent=2))
    return 0


def _warn_damaged(damaged: list[IntegrityError]) -> None:
    """Damaged catalog entries are reported, never silently skipped; the intact points stay usable."""
    for exc in damaged:
        print(f"lifeboat: damaged catalog entry left out: {exc}", file=sys.stderr)


async def cmd_points(args) -> int:
    repo = await open_from_args(args)
    damaged: list[IntegrityError] = []
    try:
        entries = await repo.list_points(damaged=damaged)
    finally:
        await repo.backend.close()
    _warn_damaged(damaged)
    if args.group:
        return _print_group_points(args, group_points(entries, args.group), damaged)
    points = machine_points(entries)
    if args.machine:
        points = [p for p in points if p.machine == args.machine]
    if args.json:
        print(json.dumps([{"point_id": p.point_id, "machine": p.machine, "created": p.created,
                           "consistency": p.consistency, "complete": p.complete,
                           "disks": {d: {"seq": e.seq, "disk_size": e.disk_size, "image_digest": e.image_digest}
                                     for d, e in sorted(p.disks.items())}} for p in points], indent=2))
        return 1 if damaged else 0
    print(f"{'POINT':<40} {'MACHINE':<16} {'CREATED (UTC)':<20} {'CONSISTENCY':<11} DISKS")
    for p in points:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.created))
        disks = ",".join(sorted(d.split(".", 1)[1] for d in p.disks)) + ("" if p.complete else " (incomplete)")
        print(f"{p.point_id:<40} {p.machine:<16} {created:<20} {p.consistency:<11} {disks}")
    return 1 if damaged else 0


def _print_group_points(args, listing, damaged) -> int:
    if listing.incomplete:
        print(f"lifeboat: {len(listing.incomplete)} incomplete point(s) of group {args.group} left out (some member "
              f"lacks a point for the tag: aborted, or uploads still catching up): "
              f"{', '.join(sorted(listing.incomplete))}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"group": g.group, "tag": g.tag, "created": g.created, "consistency": g.consistency,
                           "members": {m: p.point_id for m, p in g.members.items()}} for g in listing.points],
                         indent=2))
        return 1 if damaged else 0
    print(f"{'TAG':<40} {'CREATED (UTC)':<20} {'CONSISTENCY':<11} MEMBERS")
    for g in listing.points:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(g.created))
        print(f"{g.tag:<40} {created:<20} {g.consistency:<11} {','.join(g.members)}")
    return 1 if damaged else 0


async def _materialize_all(repo, entries: dict, targets: dict[str, str], args) -> list:
    results = []
    for disk, target in targets.items():
        res = await materialize(repo, entries[disk], target, args.overwrite,
                                None if args.quiet else _progress(f"{disk} segments"))
        results.append(res)
    return results


async def _failover_group(args, repo) -> int:
    if args.machine or args.disk:
        raise LifeboatError("--group fails over every disk of every member of the group: --machine and --disk "
                            "do not apply")
    damaged: list[IntegrityError] = []
    gp = resolve_group(group_points(await repo.list_points(damaged=damaged), args.group), args.group, args.point)
    _warn_damaged(damaged)
    entries = {d: e for mp in gp.members.values() for d, e in mp.disks.items()}
    if os.path.exists(args.to) and not os.path.isdir(args.to):
        raise LifeboatError(f"{args.to} is not a directory: a group failover writes one <disk-id>.img per disk of "
                            "every member into the --to directory")
    os.makedirs(args.to, exist_ok=True)
    targets = {d: os.path.join(args.to, f"{d}.img") for d in sorted(entries)}
    existing = [t for t in targets.values() if os.path.exists(t) and not os.path.isdir(t)]
    if existing and not args.overwrite:
        raise LifeboatError(f"{existing[0]} exists ({len(existing)} of the {len(targets)} images do); pass "
                            "--overwrite to replace them, or choose another --to directory")
    results = await _materialize_all(repo, entries, targets, args)
    for r in results:
        print(json.dumps({"group": gp.group, "tag": gp.tag, "machine": entries[r.disk_id].machine,
                          "point_id": r.point_id, "disk_id": r.disk_id, "path": r.path, "segments": r.segments,
                          "image_digest": r.image_digest, "verified": True}))
    return 0


async def cmd_failover(args) -> int:
    # MACHINE positional (or --group without --repo/-c) with a management API: a job in the primary.
    if args.target or (args.group and api_configured(args) and not (args.repo or args.config)):
        if not api_configured(args):
            raise LifeboatError("'lifeboat failover MACHINE' goes through the management API: pass --api (or set "
                                "$LIFEBOAT_API); the direct form is 'lifeboat failover --test --machine M --repo ...'")
        return await control_failover(args, _progress)
    if not args.test:
        raise LifeboatError("only test failover (--test) is available in this release; production failover "
                            "to Azure comes with the configuration-server role")
    if not args.to and not args.to_azure:
        raise LifeboatError("name the target: --to PATH (a local image or directory) or --to-azure CONTAINER[/PREFIX]")
    malloc_pin.pin_malloc()   # before the first frame buffer is allocated
    repo = await open_from_args(args)
    try:
        if args.to_azure:
            return await azure_failover.run(args, repo, _progress)
        if args.group:
            return await _failover_group(args, repo)
        damaged: list[IntegrityError] = []
        point = resolve(machine_points(await repo.list_points(damaged=damaged)), args.point, args.machine)
        _warn_damaged(damaged)
        group = point_group(point)
        if group:
            raise GroupFailoverRefused(f"machine {point.machine} is in consistency group {group}: fail over the whole "
                                       f"group with --group {group} (a member alone would not match the others' "
                                       "instant)")
        disks = sorted(point.disks)
        if args.disk:
            wanted = f"{point.machine}.{args.disk}"
            if wanted not in point.disks:
                raise LifeboatError(f"point {point.point_id} has no disk {args.disk!r} (it has "
                                    f"{', '.join(d.split('.', 1)[1] for d in disks)})")
            disks = [wanted]
        if len(disks) == 1 and not os.path.isdir(args.to):
            targets = {disks[0]: args.to}
        else:
            os.makedirs(args.to, exist_ok=True)
            targets = {d: os.path.join(args.to, f"{d}.img") for d in disks}
        results = await _materialize_all(repo, point.disks, targets, args)
    finally:
        await repo.backend.close()
    for r in results:
        print(json.dumps({"point_id": r.point_id, "disk_id": r.disk_id, "path": r.path, "segments": r.segments,
                          "image_digest": r.image_digest, "verified": True}))
    return 0


async def cmd_verify(args) -> int:
    repo = await open_from_args(args)
    try:
        report = await verify_repository(repo, None if args.quiet else _progress("objects"))
    finally:
        await repo.backend.close()
    for name, what in report.problems:
        print(f"DAMAGED {name}: {what}")
    print(f"checked {report.checked} objects, {report.bytes} segment bytes, {len(report.problems)} problems")
    if report.unreferenced:
        print(f"{len(report.unreferenced)} checkpoint chunk(s) no manifest lists (an interrupted retention pass; "
              f"the next 'lifeboat retention apply' deletes them), e.g. {report.unreferenced[0]}")
    if report.problems:
        print(f"first damaged object: {report.problems[0][0]}", file=sys.stderr)
        return 1
    return 0


async def cmd_config_sample(args) -> int:
    sys.stdout.write(cfgmod.sample(cfgmod.SCHEMAS[args.daemon]))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lifeboat", description="Lifeboat disaster recovery: operator command.")
    ap.add_argument("--version", action="version", version=f"lifeboat {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create the CA, server certificate, agent token, repository and its key")
    p.add_argument("--dir", required=True, help="where to put tls/, agent.token and repository.key")
    p.add_argument("--repo", help="repository URL (default local:<dir>/repository)")
    p.add_argument("--hosts", default="localhost,127.0.0.1", help="names/IPs for the server certificate")
    p.add_argument("--passphrase-file", help="wrap the repository key with this passphrase (Argon2id) instead of a key file")
    p.add_argument("--azure-connection-string-file", help="for azure:// repositories")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("member-cert", help="issue a consistency-group member's certificate from the init CA")
    p.add_argument("--dir", required=True, help="the directory 'lifeboat init --dir' used (its tls/ca.pem, ca.key)")
    p.add_argument("--machine", required=True, help="the member's machine name (the certificate's common name)")
    p.add_argument("--hosts", help="comma-separated names/IPs the other members reach its group port by "
                                   "(default: the machine name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing certificate of this machine")
    p.set_defaults(fn=cmd_member_cert)

    p = sub.add_parser("points", help="list recovery points")
    add_repo_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--machine")
    which.add_argument("--group", help="list the complete points of this consistency group (one row per tag)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_points)

    p = sub.add_parser("failover", help="materialise a machine's disks at a recovery point")
    add_repo_args(p)
    p.add_argument("--test", action="store_true", help="test failover: write to an isolated target, replication continues")
    p.add_argument("--point", default="latest",
                   help="point id, latest, latest-crash or latest-app; with --group: a group tag, latest-group "
                        "(= latest), latest-crash or latest-app; through the API also latest-processed")
    p.add_argument("--machine")
    p.add_argument("--group", help="fail over every member of this consistency group at one group point "
                                   "(--to is then a directory)")
    p.add_argument("--disk", help="only this disk (as named in the agent config)")
    p.add_argument("--to", help="image file (one disk) or directory (one <disk-id>.img per disk)")
    p.add_argument("target", nargs="*", metavar="MACHINE | commit MACHINE | cleanup MACHINE",
                   help="through the management API: fail over MACHINE (a job in the primary process server; --to is "
                        "a directory there), or commit / clean up its failover")
    add_api_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing image file")
    p.add_argument("-q", "--quiet", action="store_true")
    azure_failover.add_args(p)
    p.set_defaults(fn=cmd_failover)

    p = sub.add_parser("verify", help="read and authenticate every repository object")
    add_repo_args(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("config-sample", help="print a sample configuration generated from the schema")
    p.add_argument("daemon", choices=sorted(cfgmod.SCHEMAS))
    p.set_defaults(fn=cmd_config_sample)

    doctor.add_parser(sub)
    control.add_parser(sub)
    inventory.add_parser(sub)
    retention_cmd.add_parser(sub)
    plan_cmd.add_parser(sub)
    key_cmd.add_parser(sub)
    reprotect_cmd.add_parser(sub)
    master_target_cmd.add_parser(sub)
    control_failover_cli.add_parser(sub)
    push_install.add_parser(sub)
    from . import reenable_cmd; reenable_cmd.add_parser(sub)  # noqa: E702 - failback's last step
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Logs go to stderr, so that stdout stays parseable (--json output, init's JSON summary).
    lblog.configure(level="info", fmt="console", identifier="lifeboat")
    try:
        return asyncio.run(args.fn(args))
    except LifeboatError as exc:
        print(f"lifeboat {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
