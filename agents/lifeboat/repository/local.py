"""Local-directory backend: one file per object, written to a temp name, fsynced, renamed."""

from __future__ import annotations

import asyncio
import os
import uuid

from ..core.errors import ObjectNotFound, RepositoryError
from .backend import Backend, check_name

PARTIAL_SUFFIX = ".partial"


class LocalBackend(Backend):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = f"local:{self.root}"

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def _put_sync(self, name: str, parts: list[bytes] | bytes) -> None:
        path = self._path(name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for part in [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)  # atomic publish: readers see the old object or the whole new one
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise RepositoryError(f"cannot write {name} under {self.root}: {exc.strerror}") from None
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def put(self, name: str, parts: list[bytes] | bytes) -> None:
        await asyncio.to_thread(self._put_sync, name, parts)

    def _read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        except IsADirectoryError:
            raise ObjectNotFound(name, " (it is a prefix)") from None

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread(self._read, name)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read, name, offset, length)

    async def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    async def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def _list(self, prefix: str) -> list[str]:
        out = []
        # Walk only below the prefix's folder: listing one disk's log must not scan the repository.
        start_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *start_rel.split("/")) if start_rel else self.root
        def walk_error(exc: OSError) -> None:
            # A missing prefix folder is an empty listing; anything else (EIO, ENOTDIR, EACCES) must
            # not look like "no objects", or a log could be restarted over existing segments.
            if not (isinstance(exc, FileNotFoundError) and exc.filename == start):
                raise RepositoryError(f"cannot list {prefix!r} in {self.root}: {exc}") from None

        for folder, dirs, files in os.walk(start, onerror=walk_error):
            rel = os.path.relpath(folder, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for f in files:
                if f.endswith(PARTIAL_SUFFIX):
                    continue
                name = base + f
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
