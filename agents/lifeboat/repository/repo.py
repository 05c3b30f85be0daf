"""The repository: key unlock, config, log segments per disk and the recovery-point catalog."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from ..core import crypto, keys, sealed
from ..core.catalog import PointEntry, point_object_name
from ..core.errors import IntegrityError, KeyUnlockError, ObjectNotFound, RepositoryError
from ..core.segment import SegmentReader
from .backend import Backend

REPO_CONFIG_VERSION = 1
CONFIG_NAME = "config"
KEYS_PREFIX = "keys/"
SEQ_DIGITS = 20
CATALOG_READ_CONCURRENCY = 16  # parallel catalog reads (each is one small GET on Azure)


def segment_name(disk_id: str, seq: int) -> str:
    return f"disks/{disk_id}/log/{seq:0{SEQ_DIGITS}d}"


class Repository:
    def __init__(self, backend: Backend, master: bytes, config: dict) -> None:
        self.backend = backend
        self.config = config
        self.id = config["id"]
        # Separate subkeys so that no ciphertext of one kind can be presented as another.
        self.segment_key = crypto.derive_subkey(master, b"lifeboat-segment")
        self.object_key = crypto.derive_subkey(master, b"lifeboat-object")
        self.checkpoint_key = crypto.derive_subkey(master, b"lifeboat-checkpt")
        self._master = master
        self.key_name: str | None = None

    def __repr__(self) -> str:
        return f"Repository({self.backend.location}, id={self.id})"

    @classmethod
    async def init(cls, backend: Backend, unlocker: keys.Unlocker) -> "Repository":
        if await backend.exists(CONFIG_NAME):
            raise RepositoryError(f"{backend.location} already holds a repository (its 'config' exists)")
        master = crypto.new_key()
        config = {
            "version": REPO_CONFIG_VERSION,
            "id": uuid.uuid4().hex,
            "created": time.time(),
            "cipher": "aegis256",
            "compression": "zstd-1",
        }
        repo = cls(backend, master, config)
        await repo.add_key(unlocker)
        # config last: a repository is only "there" once a key can open it.
        await backend.put(CONFIG_NAME, sealed.seal_object(repo.object_key, CONFIG_NAME, sealed.OBJECT_CONFIG, config))
        return repo

    async def add_key(self, unlocker: keys.Unlocker) -> str:
        key_id = os.urandom(8).hex()
        blob = await asyncio.to_thread(keys.wrap_master_key, self._master, key_id, unlocker)
        await self.backend.put(KEYS_PREFIX + key_id, blob)
        return key_id

    @classmethod
    async def open(cls, backend: Backend, unlocker: keys.Unlocker) -> "Repository":
        names = await backend.list(KEYS_PREFIX)
        if not names:
            raise KeyUnlockError(f"{backend.location} has no key objects: is it a Lifeboat repository? (run 'lifeboat init')")
        master = None
        for name in names:
            master = await asyncio.to_thread(keys.unwrap_master_key, await backend.get(name), unlocker)
            if master:
                break
        if master is None:
            raise KeyUnlockError(f"none of the {len(names)} key objects in {backend.location} opens with this {unlocker.kdf}")
        repo = cls(backend, master, {"id": "?"})
        repo.key_name = name  # the key object that opened it (lifeboat key rotate replaces this one)
        try:
            raw = await backend.get(CONFIG_NAME)
        except ObjectNotFound:
            raise RepositoryError(f"{backend.location} has keys but no config: initialisation never finished") from None
        config = sealed.open_object(repo.object_key, CONFIG_NAME, sealed.OBJECT_CONFIG, raw)
        version = config.get("version")
        if version != REPO_CONFIG_VERSION or isinstance(version, bool):  # JSON true == 1 in Python
            raise RepositoryError(f"repository config version {version!r} is not supported by this build")
        if not isinstance(config.get("id"), str) or not config["id"]:
            raise IntegrityError(CONFIG_NAME, f"repository config has no valid 'id' (got {config.get('id')!r})")
        repo.config, repo.id = config, config["id"]
        return repo

    # -- log segments -------------------------------------------------------------------------
    async def put_segment(self, disk_id: str, seq: int, parts: list[bytes]) -> None:
        await self.backend.put(segment_name(disk_id, seq), parts)

    async def read_segment(self, disk_id: str, seq: int) -> SegmentReader:
        name = segment_name(disk_id, seq)
        data = await self.backend.get(name)
        return await asyncio.to_thread(SegmentReader, name, data, self.segment_key, disk_id, seq)

    async def list_segments(self, disk_id: str) -> list[int]:
        prefix = f"disks/{disk_id}/log/"
        seqs = []
        for name in await self.backend.list(prefix):
            tail = name[len(prefix):]
            if tail.isdigit():
                seqs.append(int(tail))
        return sorted(seqs)

    async def delete_segment(self, disk_id: str, seq: int) -> None:
        await self.backend.delete(segment_name(disk_id, seq))

    async def list_disks(self) -> list[str]:
        return sorted({n.split("/")[1] for n in await self.backend.list("disks/") if n.count("/") >= 3})

    # -- recovery-point catalog ---------------------------------------------------------------
    async def put_point(self, entry: PointEntry) -> None:
        name = point_object_name(entry.disk_id, entry.point_id)
        await self.backend.put(name, sealed.seal_object(self.object_key, name, sealed.OBJECT_POINT, entry.to_json()))

    async def read_point(self, name: str) -> PointEntry:
        body = sealed.open_object(self.object_key, name, sealed.OBJECT_POINT, await self.backend.get(name))
        entry = PointEntry.from_json(name, body)
        if point_object_name(entry.disk_id, entry.point_id) != name:
            raise IntegrityError(name, f"entry describes {entry.disk_id}/{entry.point_id}")
        return entry

    async def list_points(self, disk_id: str | None = None,
                          damaged: list[IntegrityError] | None = None) -> list[PointEntry]:
        """Read every catalog entry (16 at a time). A damaged entry raises, or, when the caller passes
        a `damaged` list, is collected there so the intact points stay usable in a disaster."""
        names = await self.backend.list(f"points/{disk_id}/" if disk_id else "points/")
        limit = asyncio.Semaphore(CATALOG_READ_CONCURRENCY)

        async def read(name: str) -> PointEntry | None:
            async with limit:
                try:
                    return await self.read_point(name)
                except IntegrityError as exc:
                    if damaged is None:
                        raise
                    damaged.append(exc)
                    return None

        entries = [e for e in await asyncio.gather(*(read(n) for n in names)) if e is not None]
        return sorted(entries, key=lambda e: (e.created, e.point_id, e.disk_id))
