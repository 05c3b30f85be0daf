"""Storage backend interface: named immutable objects, published atomically."""

from __future__ import annotations

import abc
import re

from ..core.errors import ObjectNotFound, RepositoryError

# Object names are relative, '/'-separated, of safe characters: no '..', no absolute paths.
OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def check_name(name: str) -> str:
    if not OBJECT_NAME_RE.fullmatch(name) or len(name) > 512:
        raise RepositoryError(f"invalid object name {name!r}")
    return name


class Backend(abc.ABC):
    """Every backend passes tests/unit/repository/test_backend_conformance.py.

    Contract: put() makes an object visible only once it is complete (readers never see a
    partial object); a second put() of the same name replaces it atomically. get() of a missing
    object raises ObjectNotFound. list() returns full names under a prefix, sorted.
    """

    location: str

    @abc.abstractmethod
    async def put(self, name: str, parts: list[bytes] | bytes) -> None: ...

    @abc.abstractmethod
    async def get(self, name: str) -> bytes: ...

    @abc.abstractmethod
    async def get_range(self, name: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def size(self, name: str) -> int: ...

    @abc.abstractmethod
    async def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    async def delete(self, name: str) -> None: ...

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{name: size in bytes} under a prefix; backends whose listing carries sizes override this
        (one call instead of one per object). An object deleted meanwhile is left out."""
        out = {}
        for name in await self.list(prefix):
            try:
                out[name] = await self.size(name)
            except ObjectNotFound:
                pass
        return out

    async def close(self) -> None:
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
