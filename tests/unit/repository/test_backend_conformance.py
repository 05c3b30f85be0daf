"""One storage conformance suite, run against every backend: local directory and Azure on Azurite."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError

from lifeboat.core.errors import ObjectNotFound, RepositoryError
from lifeboat.repository.azure import AzureBackend
from lifeboat.repository.backend import Backend
from lifeboat.repository.local import PARTIAL_SUFFIX, LocalBackend

MIB = 1024 * 1024


@pytest.fixture(params=["local", pytest.param("azure", marks=pytest.mark.azurite)])
def backend_spec(request, tmp_path) -> tuple[str, str]:
    if request.param == "azure":
        return "azure", request.getfixturevalue("azurite")
    return "local", str(tmp_path / "repo")


@pytest.fixture
async def backend(backend_spec):
    kind, where = backend_spec
    if kind == "local":
        async with LocalBackend(where) as b:
            yield b
        return
    # A fresh container per test, created by the backend on its first put.
    b = AzureBackend(f"conformance-{uuid.uuid4().hex[:16]}", where)
    try:
        yield b
    finally:
        with contextlib.suppress(ResourceNotFoundError):
            await b._client.delete_container()  # keep Azurite's in-memory store small
        await b.close()


async def leave_partial(backend: Backend, name: str, data: bytes) -> None:
    """Leave behind what a writer that died in the middle of put(name) leaves."""
    if isinstance(backend, LocalBackend):
        path = os.path.join(backend.root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}", "wb") as f:
            f.write(data)
    else:
        assert isinstance(backend, AzureBackend)
        await backend._create_container()
        blob = backend._client.get_blob_client(name)
        await blob.stage_block(uuid.uuid4().hex + "00000000", data)  # staged, never committed


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every block offset, so misplaced blocks are caught."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 128  # 4 KiB per step
        counter += 1
    return bytes(out[:size])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_location(backend):
    assert backend.location.startswith(("local:", "azure://"))


async def test_put_get_bytes(backend):
    await backend.put("config", b"hello")
    assert await backend.get("config") == b"hello"
    assert await backend.size("config") == 5
    assert await backend.exists("config")


async def test_put_get_parts(backend):
    parts = [b"head", b"", b"-middle-", bytearray(b"tail")]
    await backend.put("disks/d1/log/0000000001", parts)
    assert await backend.get("disks/d1/log/0000000001") == b"head-middle-tail"


async def test_multi_block_object(backend):
    # 9 MiB: more than two 4 MiB Azure blocks; parts deliberately straddle block boundaries.
    data = pattern(9 * MIB)
    parts = [data[: 3 * MIB + 1], data[3 * MIB + 1 : 8 * MIB - 7], data[8 * MIB - 7 :]]
    await backend.put("disks/d1/log/0000000002", parts)
    assert await backend.size("disks/d1/log/0000000002") == 9 * MIB
    assert digest(await backend.get("disks/d1/log/0000000002")) == digest(data)
    # A range that crosses the first block boundary.
    assert await backend.get_range("disks/d1/log/0000000002", 4 * MIB - 10, 20) == data[4 * MIB - 10 : 4 * MIB + 10]
    await backend.put("disks/d1/log/0000000003", data)
    assert digest(await backend.get("disks/d1/log/0000000003")) == digest(data)


async def test_empty_object(backend):
    await backend.put("points/empty", b"")
    assert await backend.get("points/empty") == b""
    assert await backend.size("points/empty") == 0
    assert await backend.exists("points/empty")
    assert await backend.list("points/") == ["points/empty"]
    await backend.put("points/empty-parts", [])
    assert await backend.get("points/empty-parts") == b""


async def test_overwrite_replaces(backend):
    await backend.put("config", b"version one, the longer one")
    await backend.put("config", b"version two")
    assert await backend.get("config") == b"version two"
    assert await backend.size("config") == len(b"version two")
    assert await backend.list() == ["config"]


async def test_overwrite_is_atomic_for_readers(backend):
    old, new = pattern(5 * MIB, seed=1), pattern(9 * MIB, seed=2)
    await backend.put("checkpoints/c1", old)
    allowed = {digest(old), digest(new)}
    writer = asyncio.create_task(backend.put("checkpoints/c1", [new[: 2 * MIB], new[2 * MIB :]]))
    reads = 0
    while not writer.done() or reads == 0:
        assert digest(await backend.get("checkpoints/c1")) in allowed
        reads += 1
    await writer
    assert digest(await backend.get("checkpoints/c1")) == digest(new)


async def test_get_range(backend):
    await backend.put("keys/k1", b"0123456789")
    assert await backend.get_range("keys/k1", 0, 10) == b"0123456789"
    assert await backend.get_range("keys/k1", 2, 3) == b"234"
    assert await backend.get_range("keys/k1", 7, 100) == b"789"  # short read past the end
    assert await backend.get_range("keys/k1", 10, 5) == b""  # at the end
    assert await backend.get_range("keys/k1", 50, 5) == b""  # beyond the end
    assert await backend.get_range("keys/k1", 3, 0) == b""


async def test_list_sizes_match_the_objects(backend):
    names = {"disks/d1/log/0000000001": 10, "disks/d1/log/0000000002": 0, "disks/d2/log/0000000001": 3 * MIB + 7,
             "points/p1": 1}
    for name, size in names.items():
        await backend.put(name, os.urandom(size))
    assert await backend.list_sizes("disks/d1") == {n: s for n, s in names.items() if n.startswith("disks/d1")}
    assert await backend.list_sizes() == names
    assert await backend.list_sizes("nothing/") == {}


async def test_list_prefix_sorted_nested(backend):
    names = ["points/p2", "disks/d2/log/0000000001", "config", "disks/d1/log/0000000002",
             "keys/k1", "disks/d1/log/0000000001", "disks/d1/checkpoint/c1", "points/p1"]
    for i, name in enumerate(names):
        await backend.put(name, f"object {i}".encode())
    assert await backend.list() == sorted(names)
    assert await backend.list("") == sorted(names)
    assert await backend.list("disks/") == sorted(n for n in names if n.startswith("disks/"))
    assert await backend.list("disks/d1/log/") == ["disks/d1/log/0000000001", "disks/d1/log/0000000002"]
    # A prefix that ends inside a name component.
    assert await backend.list("disks/d1/log/000000000") == ["disks/d1/log/0000000001", "disks/d1/log/0000000002"]
    assert await backend.list("disks/d") == sorted(n for n in names if n.startswith("disks/d"))
    assert await backend.list("poi") == ["points/p1", "points/p2"]
    assert await backend.list("nothing/") == []
    assert await backend.list("disks/d9/") == []


async def test_partial_objects_are_invisible(backend):
    await backend.put("disks/d1/log/0000000001", b"complete")
    await leave_partial(backend, "disks/d1/log/0000000002", b"half of an obj")
    await leave_partial(backend, "disks/d1/log/0000000001", b"half of a replacement")
    assert await backend.list() == ["disks/d1/log/0000000001"]
    assert await backend.list("disks/d1/log/") == ["disks/d1/log/0000000001"]
    assert not await backend.exists("disks/d1/log/0000000002")
    with pytest.raises(ObjectNotFound):
        await backend.get("disks/d1/log/0000000002")
    with pytest.raises(ObjectNotFound):
        await backend.size("disks/d1/log/0000000002")
    # The interrupted replacement changed nothing; a new put of the orphan's name works.
    assert await backend.get("disks/d1/log/0000000001") == b"complete"
    await backend.put("disks/d1/log/0000000002", b"second")
    assert await backend.get("disks/d1/log/0000000002") == b"second"


async def test_delete(backend):
    await backend.put("points/p1", b"x")
    await backend.put("points/p2", b"y")
    await backend.delete("points/p1")
    assert not await backend.exists("points/p1")
    assert await backend.list("points/") == ["points/p2"]
    with pytest.raises(ObjectNotFound):
        await backend.get("points/p1")
    with pytest.raises(ObjectNotFound):
        await backend.delete("points/p1")


async def test_missing_objects(backend):
    # On an empty repository first (for Azure: its container does not exist yet), then on a used one.
    for listed in ([], ["config"]):
        assert await backend.list() == listed
        assert not await backend.exists("nope/missing")
        for read in (backend.get("nope/missing"), backend.size("nope/missing"),
                     backend.get_range("nope/missing", 0, 4), backend.delete("nope/missing")):
            with pytest.raises(ObjectNotFound) as info:
                await read
            assert info.value.object_name == "nope/missing"
            assert "nope/missing" in str(info.value)
        await backend.put("config", b"c")


async def test_a_prefix_is_not_an_object(backend):
    await backend.put("disks/d1/log/0000000001", b"x")
    assert not await backend.exists("disks/d1")
    with pytest.raises(ObjectNotFound):
        await backend.get("disks/d1/log")


INVALID_NAMES = ["", "/etc/passwd", "a//b", "a/../b", "../a", "a/", ".hidden", "a/.b", "a b", "a\\b",
                 "ünicode", "x" * 513, "config\n", "a/b\n"]


@pytest.mark.parametrize("name", INVALID_NAMES)
async def test_invalid_names_rejected(backend, name):
    calls = [backend.put(name, b"x"), backend.get(name), backend.get_range(name, 0, 1),
             backend.size(name), backend.exists(name), backend.delete(name)]
    for call in calls:
        with pytest.raises(RepositoryError, match="invalid object name"):
            await call
    assert await backend.list() == []
