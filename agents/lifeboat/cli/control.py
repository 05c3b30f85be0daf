"""Control-plane commands over the management API: register, credentials (list, issue, revoke)."""

from __future__ import annotations

import json
import os
import sys

from ..core.errors import LifeboatError
from .control_args import add_api_args, client_from_args


def write_secret(path: str, secret: str, overwrite: bool = False) -> None:
    """Write a credential file 0600, never following an existing file unless asked to replace it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise LifeboatError(f"{path} exists: pass --overwrite to replace it, or choose another --out") from None
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)


async def cmd_register(args) -> int:
    if bool(args.machine) == bool(args.process_server):
        raise LifeboatError("register either an agent (--machine NAME) or a process server (--process-server NAME)")
    try:
        with open(args.passphrase_file) as f:
            passphrase = f.readline().strip()
    except OSError as exc:
        raise LifeboatError(f"cannot read the passphrase file {args.passphrase_file}: {exc.strerror}") from None
    kind, name = ("agent", args.machine) if args.machine else ("process-server", args.process_server)
    body = {"passphrase": passphrase, "kind": kind, "name": name}
    if kind == "process-server":
        if not args.url:
            raise LifeboatError("a process server registers with --url https://HOST:PORT, the ingest URL agents "
                                "assigned to it will use")
        body["url"] = args.url
    out = args.out or f"{name}.credential"
    if os.path.exists(out) and not args.overwrite:
        raise LifeboatError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    async with client_from_args(args, credential=False) as api:
        reply = await api.call("POST", "/register", body)
    write_secret(out, reply["token"], overwrite=args.overwrite)
    print(json.dumps({"principal": reply["principal"], "credential_id": reply["credential_id"],
                      "credential_file": os.path.abspath(out)}, indent=2))
    return 0


async def cmd_credentials(args) -> int:
    async with client_from_args(args) as api:
        if args.action == "list":
            creds = (await api.call("GET", "/credentials"))["credentials"]
            if args.json:
                print(json.dumps(creds, indent=2))
                return 0
            print(f"{'ID':<20} {'PRINCIPAL':<32} {'STATE':<8} REVOKED REASON")
            for c in creds:
                state = "revoked" if c["revoked"] else "live"
                print(f"{c['id']:<20} {c['kind'] + ':' + c['name']:<32} {state:<8} {c['revoked_reason'] or ''}")
            return 0
        if args.action == "revoke":
            if not args.id:
                raise LifeboatError("credentials revoke needs the credential id ('lifeboat credentials list')")
            reply = await api.call("POST", f"/credentials/{args.id}/revoke", {"reason": args.reason})
            print(json.dumps(reply, indent=2))
            return 0
        # issue
        if not (args.kind and args.name and args.out):
            raise LifeboatError("credentials issue needs --kind, --name and --out")
        body = {"kind": args.kind, "name": args.name}
        if args.ttl_seconds:
            body["ttl_seconds"] = args.ttl_seconds
        reply = await api.call("POST", "/credentials", body)
        write_secret(args.out, reply["token"])
        print(json.dumps({"principal": reply["principal"], "credential_id": reply["credential_id"],
                          "credential_file": os.path.abspath(args.out)}, indent=2))
        return 0


async def cmd_passphrase(args) -> int:
    """Rotate the registration passphrase: the new one goes to --out (0600), never to the terminal."""
    async with client_from_args(args) as api:
        reply = await api.call("POST", "/registration/passphrase", {})
    write_secret(args.out, reply["passphrase"], overwrite=args.overwrite)
    print(json.dumps({"registration_passphrase": os.path.abspath(args.out)}, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("register", help="exchange the one-time registration passphrase for this principal's credential")
    add_api_args(p, credential=False)
    p.add_argument("--passphrase-file", required=True, help="registration.passphrase from 'lifeboat init'")
    p.add_argument("--machine", help="register the mobility agent of this machine")
    p.add_argument("--process-server", help="register a scale-out process server of this name")
    p.add_argument("--url", help="process server: its ingest URL (https://HOST:9443) for the agents assigned to it")
    p.add_argument("--out", help="where to write the credential (0600; default ./<name>.credential)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("credentials", help="list, issue or revoke management API credentials (operator)")
    add_api_args(p)
    p.add_argument("action", choices=("list", "issue", "revoke"))
    p.add_argument("id", nargs="?", help="revoke: the credential id")
    p.add_argument("--reason", default="revoked by the operator", help="revoke: why (kept with the credential)")
    p.add_argument("--kind", choices=("operator", "agent", "process-server"), help="issue: the principal's kind")
    p.add_argument("--name", help="issue: the principal's name (machine name for an agent)")
    p.add_argument("--ttl-seconds", type=float, help="issue: expire after this long")
    p.add_argument("--out", help="issue: where to write the credential (0600)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_credentials)

    p = sub.add_parser("passphrase", help="rotate the registration passphrase (operator); the old one stops working")
    add_api_args(p)
    p.add_argument("action", choices=("rotate",))
    p.add_argument("--out", required=True, help="where to write the new passphrase (0600)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_passphrase)
