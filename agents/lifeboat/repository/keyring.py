"""Key objects of a repository: list them, and rotate one (a new wrapping of the same master key)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from ..core import keys
from ..core.errors import KeyUnlockError, RepositoryError
from .repo import KEYS_PREFIX, Repository


@dataclass(frozen=True)
class KeyInfo:
    name: str        # keys/<16 hex>
    key_id: str
    kdf: str         # keyfile | argon2id | "?" (unreadable object)
    current: bool    # this is the key object that opened the repository


async def list_keys(repo: Repository) -> list[KeyInfo]:
    out = []
    for name in await repo.backend.list(KEYS_PREFIX):
        try:
            obj = json.loads(await repo.backend.get(name))
            kdf = obj.get("kdf") if isinstance(obj, dict) and isinstance(obj.get("kdf"), str) else "?"
        except (ValueError, RecursionError):
            kdf = "?"
        out.append(KeyInfo(name, name[len(KEYS_PREFIX):], kdf, name == repo.key_name))
    return out


@dataclass(frozen=True)
class Rotation:
    added: str               # name of the new key object
    removed: list[str]       # names of the key objects deleted


async def add_verified_key(repo: Repository, new: keys.Unlocker) -> str:
    """Write a key object wrapping the master key for `new`, read it back and unwrap it; returns its name."""
    added = KEYS_PREFIX + await repo.add_key(new)
    master = await asyncio.to_thread(keys.unwrap_master_key, await repo.backend.get(added), new)
    if master != repo._master:
        await repo.backend.delete(added)
        raise KeyUnlockError(f"the new key object {added} did not open after writing it; the old key is kept")
    return added


async def remove_old_keys(repo: Repository, keep: str, remove_all_others: bool = False) -> list[str]:
    """Delete the key object that opened the repository (or every key object but `keep`)."""
    if repo.key_name is None:
        raise RepositoryError("the repository was not opened with a key object: open it with Repository.open first")
    names = [n for n in await repo.backend.list(KEYS_PREFIX) if n != keep] if remove_all_others else [repo.key_name]
    for name in names:
        await repo.backend.delete(name)
    repo.key_name = keep
    return names


async def rotate_key(repo: Repository, new: keys.Unlocker, remove_all_others: bool = False) -> Rotation:
    """Wrap the master key for `new`, prove the new object opens, then delete the old key object(s).

    Only key objects change: segments, catalog entries and config are encrypted with subkeys of the
    master key, which stays the same (like restic's `key passwd`). A crash between the steps leaves
    both keys working; running the rotation again finishes it.
    """
    if repo.key_name is None:
        raise RepositoryError("the repository was not opened with a key object: open it with Repository.open first")
    added = await add_verified_key(repo, new)
    return Rotation(added, await remove_old_keys(repo, added, remove_all_others))
