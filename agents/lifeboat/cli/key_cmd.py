"""`lifeboat key list | rotate`: the repository's key objects; a new key file or passphrase for the same data."""

from __future__ import annotations

import json
import os

from ..core import keys
from ..core.errors import ConfigError
from ..repository.keyring import add_verified_key, list_keys, remove_old_keys
from .repo_args import add_repo_args, open_from_args


def _new_unlocker(args) -> keys.Unlocker:
    if args.new_key_file:
        path = os.path.abspath(args.new_key_file)
        if os.path.exists(path):
            raise ConfigError("--new-key-file", f"{path} exists: name a new file (the old key file stays valid "
                              "until the rotation has succeeded)")
        return keys.write_key_file(path)
    try:
        with open(args.new_passphrase_file) as f:
            return keys.Unlocker.from_passphrase(f.read().strip())
    except OSError as exc:
        raise ConfigError("--new-passphrase-file", f"cannot read {args.new_passphrase_file}: {exc.strerror}") from None


async def cmd_key_list(args) -> int:
    repo = await open_from_args(args)
    try:
        infos = await list_keys(repo)
    finally:
        await repo.backend.close()
    if args.json:
        print(json.dumps([{"id": k.key_id, "kdf": k.kdf, "current": k.current} for k in infos], indent=2))
    else:
        for k in infos:
            print(f"{'*' if k.current else ' '} {k.key_id}  {k.kdf}")
    return 0


async def cmd_key_rotate(args) -> int:
    repo = await open_from_args(args)
    try:
        new = _new_unlocker(args)
        try:
            added = await add_verified_key(repo, new)
        except BaseException:
            if args.new_key_file and os.path.exists(args.new_key_file):
                os.unlink(args.new_key_file)  # nothing in the repository opens with it
            raise
        # From here on the new key file (or passphrase) opens the repository: it is never removed.
        removed = await remove_old_keys(repo, added, remove_all_others=args.remove_all_others)
    finally:
        await repo.backend.close()
    print(json.dumps({"added": added, "removed": removed,
                      "new_key_file": os.path.abspath(args.new_key_file) if args.new_key_file else None}, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("key", help="list or rotate the repository's key objects (the data is not re-encrypted)")
    ksub = p.add_subparsers(dest="key_command", required=True)
    lp = ksub.add_parser("list", help="list key objects; * marks the one that opened the repository")
    add_repo_args(lp)
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(fn=cmd_key_list)
    rp = ksub.add_parser("rotate", help="wrap the master key for a new key file or passphrase, then delete the "
                                        "old key object; data objects are untouched")
    add_repo_args(rp)
    new = rp.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-key-file", help="create this key file (mode 0600) for the new key object")
    new.add_argument("--new-passphrase-file", help="file holding the new passphrase (Argon2id)")
    rp.add_argument("--remove-all-others", action="store_true",
                    help="delete every other key object too, not only the one that opened the repository")
    rp.set_defaults(fn=cmd_key_rotate)
