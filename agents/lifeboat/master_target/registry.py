"""The master target's registry: which disks it may write (id → target path, size) and which senders it trusts.

Kept as `<state_dir>/registry.json` (FORMATS.md section 12), written atomically by `lifeboat
master-target add-disk/add-sender` (the control plane calls the same functions) and by the
daemon itself when it creates an alternate-location image. The daemon re-reads the file when its
mtime changes, so a registration needs no restart. Sender tokens are stored as SHA-256 digests:
the file lets nobody impersonate a sender.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass

from ..core.errors import LifeboatError
from ..core.wire import DISK_ID_RE, SECTOR_BYTES
from ..process_server.cache import write_json_atomic

REGISTRY_FILE = "registry.json"
REGISTRY_VERSION = 1
MIN_TOKEN_CHARS = 16


class RegistryError(LifeboatError):
    """Master-target registry: {}."""


@dataclass(frozen=True)
class TargetDisk:
    disk_id: str
    path: str
    size: int


def target_size(path: str) -> int:
    """Size in bytes of an image file or a block device (lseek works for both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


class Registry:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, REGISTRY_FILE)
        self.disks: dict[str, TargetDisk] = {}
        self.senders: dict[str, str] = {}   # name -> sha256 hex of its token
        self._mtime: float | None = None
        os.makedirs(state_dir, exist_ok=True)
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed since the last read (a missing file is an empty registry)."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self.disks, self.senders, self._mtime = {}, {}, None
            return
        if mtime == self._mtime:
            return
        with open(self.path) as f:
            try:
                doc = json.load(f)
            except ValueError as exc:
                raise RegistryError(f"{self.path} is not valid JSON ({exc}); fix or re-create it") from None
        if not isinstance(doc, dict) or doc.get("version") != REGISTRY_VERSION:
            raise RegistryError(f"{self.path}: version {doc.get('version') if isinstance(doc, dict) else '?'} "
                                f"is not {REGISTRY_VERSION}")
        self.disks = {d: TargetDisk(d, str(v["path"]), int(v["size"])) for d, v in doc.get("disks", {}).items()}
        self.senders = {str(n): str(h) for n, h in doc.get("senders", {}).items()}
        self._mtime = mtime

    def save(self) -> None:
        doc = {"version": REGISTRY_VERSION,
               "disks": {d.disk_id: {"path": d.path, "size": d.size} for d in self.disks.values()},
               "senders": dict(self.senders)}
        write_json_atomic(self.path, doc)
        self._mtime = os.stat(self.path).st_mtime_ns

    def add_disk(self, disk_id: str, path: str, size: int | None = None, create: bool = False) -> TargetDisk:
        """Register a target; `create` makes a new zero-filled image of `size` bytes (refusing an existing file)."""
        if not DISK_ID_RE.fullmatch(disk_id):
            raise RegistryError(f"disk id {disk_id!r} must match {DISK_ID_RE.pattern}")
        if create:
            if size is None or size <= 0 or size % SECTOR_BYTES:
                raise RegistryError(f"size {size} of a new image must be a positive multiple of {SECTOR_BYTES}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite someone's disk
            except FileExistsError:
                raise RegistryError(f"{path} already exists: remove it or choose another path") from None
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            actual = target_size(path)
        except OSError as exc:
            raise RegistryError(f"target {path} for disk {disk_id} cannot be opened: {exc.strerror}") from None
        if size is not None and actual != size:
            raise RegistryError(f"target {path} holds {actual} bytes, disk {disk_id} needs {size}: "
                                "resize the target or register another one")
        disk = TargetDisk(disk_id, os.path.abspath(path), actual)
        self.disks[disk_id] = disk
        self.save()
        return disk

    def add_sender(self, name: str, token: str) -> None:
        if len(token.strip()) < MIN_TOKEN_CHARS:
            raise RegistryError(f"token of sender {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        self.senders[name] = token_digest(token)
        self.save()

    def sender_for(self, token: str) -> str | None:
        """The registered sender presenting this token, or None (constant-time comparison per sender)."""
        digest = token_digest(token)
        found = None
        for name, expected in self.senders.items():
            if hmac.compare_digest(digest, expected):
                found = name
        return found
