"""Azure backend specifics: error classification, retries, block layout, uncommitted blocks (Azurite)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import aiohttp
import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.storage.blob.aio import BlobClient

from lifeboat.core.errors import ConfigError, ObjectNotFound, RepositoryError, TransientBackendError
from lifeboat.repository import azure
from lifeboat.repository.azure import AzureBackend, describe_error, is_transient, iter_blocks
from lifeboat.repository.open import backend_from_url

MIB = 1024 * 1024
OFFLINE = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
           "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;")


def http_error(status: int, code: str | None = None, cls: type[HttpResponseError] = HttpResponseError):
    exc = cls(message=f"status {status}")
    exc.status_code = status
    exc.error_code = code
    return exc


# -- classification (no server needed) ---------------------------------------------------------

@pytest.mark.parametrize("exc", [
    http_error(408), http_error(429), http_error(500, "InternalError"), http_error(502),
    http_error(503, "ServerBusy"), http_error(504), http_error(500, "OperationTimedOut"),
    http_error(400, "Md5Mismatch"), http_error(412, "ConditionNotMet", cls=ResourceModifiedError),
    IncompleteReadError(message="connection closed after 10 of 100 bytes"),
    ServiceRequestError("cannot connect"), ServiceRequestTimeoutError("connect timeout"),
    ServiceResponseError("connection reset"), ServiceResponseTimeoutError("read timeout"),
    aiohttp.ClientPayloadError("truncated"), aiohttp.ServerDisconnectedError(),
    ConnectionResetError(104, "reset"), TimeoutError(),
], ids=repr)
def test_transient_errors(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    http_error(400, "InvalidHeaderValue"), http_error(400, "InvalidOperation"),
    http_error(403, "AuthenticationFailed", cls=ClientAuthenticationError),
    http_error(404, "BlobNotFound", cls=ResourceNotFoundError),
    http_error(409, "ContainerBeingDeleted", cls=ResourceExistsError), http_error(412, "LeaseIdMissing"),
    http_error(413, "RequestBodyTooLarge"), http_error(416, "InvalidRange"),
    http_error(501), http_error(505),
    asyncio.CancelledError(), ValueError("bad argument"), TypeError(),
], ids=repr)
def test_permanent_errors(exc):
    assert not is_transient(exc)


def test_describe_error_redacts_sas_signature():
    exc = ServiceRequestError("Cannot connect to https://acct.blob.core.windows.net/c/x?sv=2024&sig=SECRET%2Bvalue&se=1")
    text = describe_error(exc)
    assert "SECRET" not in text and "sig=**redacted**" in text
    assert describe_error(http_error(503, "ServerBusy")).startswith("HTTP 503 ServerBusy")


def test_iter_blocks_cuts_exact_sizes():
    parts = [b"a" * 5, b"", b"b" * 7, bytearray(b"c" * 3), memoryview(b"d" * 9)]
    blocks = list(iter_blocks(parts, 4))
    assert [len(b) for b in blocks] == [4, 4, 4, 4, 4, 4]
    assert b"".join(blocks) == b"".join(bytes(p) for p in parts)
    assert list(iter_blocks([], 4)) == []
    assert [len(b) for b in iter_blocks([b"x" * 9], 4)] == [4, 4, 1]


def test_constructor_checks():
    with pytest.raises(ConfigError, match="container name"):
        AzureBackend("Bad_Name", OFFLINE)
    with pytest.raises(ConfigError) as info:
        AzureBackend("good-name", "AccountKey=hunter2-secret;nonsense")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError):
        AzureBackend("good-name", OFFLINE, block_size_bytes=4 * MIB + 1)


async def test_open_builds_azure_backend():
    backend = backend_from_url("azure://lifeboat-repo", OFFLINE)
    assert isinstance(backend, AzureBackend) and backend.location == "azure://lifeboat-repo"
    await backend.close()


# -- the retry loop (no server needed) -----------------------------------------------------------

@pytest.fixture
async def offline():
    async with AzureBackend("retry-test", OFFLINE, retry_attempts=4, retry_base_seconds=0.001,
                            retry_cap_seconds=0.002) as backend:
        yield backend


def scripted(*outcomes):
    """A call that raises or returns the given outcomes in turn, counting its calls."""
    calls = []

    async def call():
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call, calls


async def test_retry_transient_then_success(offline):
    call, calls = scripted(http_error(503, "ServerBusy"), ServiceResponseError("reset"), "done")
    assert await offline._retry("get", "config", call) == "done"
    assert len(calls) == 3


async def test_retry_gives_up_after_attempts(offline):
    call, calls = scripted(*[http_error(500, "InternalError")] * 4)
    with pytest.raises(TransientBackendError, match=r"get 'config' still failing after 4 attempts: HTTP 500"):
        await offline._retry("get", "config", call)
    assert len(calls) == 4


async def test_permanent_error_raised_at_once(offline):
    call, calls = scripted(http_error(403, "AuthorizationFailure", cls=ClientAuthenticationError), "never")
    with pytest.raises(RepositoryError, match=r"azure://retry-test: put 'keys/k1' failed: HTTP 403 AuthorizationFailure") as info:
        await offline._retry("put", "keys/k1", call)
    assert not isinstance(info.value, TransientBackendError)
    assert len(calls) == 1


async def test_cancellation_is_not_retried(offline):
    call, calls = scripted(asyncio.CancelledError(), "never")
    with pytest.raises(asyncio.CancelledError):
        await offline._retry("get", "config", call)
    assert len(calls) == 1


async def test_cancel_during_backoff(offline):
    offline._retry_base = offline._retry_cap = 60.0
    call, calls = scripted(http_error(503), "never")
    task = asyncio.create_task(offline._retry("get", "config", call))
    while not calls:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == 1


def test_backoff_is_capped_and_grows():
    for attempt in range(1, 20):
        delay = azure.backoff_seconds(attempt, 0.5, 30.0)
        assert 0.5 * min(30.0, 0.5 * 2 ** (attempt - 1)) <= delay <= min(30.0, 0.5 * 2 ** (attempt - 1))


async def test_unreachable_endpoint_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        conn = OFFLINE.replace("127.0.0.1:9", f"127.0.0.1:{port}")
        async with AzureBackend("unreachable", conn, retry_attempts=3, retry_base_seconds=0.001) as backend:
            with pytest.raises(TransientBackendError, match=r"'points/p1' still failing after 3 attempts"):
                await backend.get("points/p1")


# -- against Azurite --------------------------------------------------------------------------

@pytest.fixture
async def az(azurite):
    backend = AzureBackend(f"azure-{uuid.uuid4().hex[:16]}", azurite, retry_attempts=3, retry_base_seconds=0.001)
    try:
        yield backend
    finally:
        with contextlib.suppress(ResourceNotFoundError):
            await backend._client.delete_container()
        await backend.close()


@pytest.mark.azurite
async def test_uncommitted_upload_is_invisible(az):
    await az.put("disks/d1/log/0000000001", b"committed")
    blob = az._client.get_blob_client("disks/d1/log/0000000002")
    await blob.stage_block(uuid.uuid4().hex + "00000000", b"staged, never committed")
    assert await az.list() == ["disks/d1/log/0000000001"]
    assert not await az.exists("disks/d1/log/0000000002")
    with pytest.raises(ObjectNotFound):
        await az.get("disks/d1/log/0000000002")
    # The abandoned blocks do not leak into a later put of the same name (staged here: a Put Blob
    # leaves them uncommitted for the service to collect, and its content is its body alone).
    az._single_put_max = 0
    await az.put("disks/d1/log/0000000002", b"real")
    assert await az.get("disks/d1/log/0000000002") == b"real"
    committed, uncommitted = await blob.get_block_list("all")
    assert len(committed) == 1 and uncommitted == []


@pytest.mark.azurite
async def test_nine_mib_object_is_three_blocks(az):
    az._single_put_max = 0   # stage blocks, as for an object above SINGLE_PUT_MAX_BYTES
    data = bytes(range(256)) * (9 * MIB // 256)
    await az.put("checkpoints/c1", data)
    committed, _ = await az._client.get_blob_client("checkpoints/c1").get_block_list("committed")
    assert [b.size for b in committed] == [4 * MIB, 4 * MIB, 1 * MIB]
    assert len({b.id for b in committed}) == 3 and len({len(b.id) for b in committed}) == 1


@pytest.mark.azurite
async def test_container_created_on_first_put(az):
    assert await az.list() == []
    with pytest.raises(ResourceNotFoundError):
        await az._client.get_container_properties()
    await az.put("config", b"c")
    await az._client.get_container_properties()
    assert await az.list() == ["config"]


@pytest.mark.azurite
async def test_block_md5_is_checked_by_the_service(az, monkeypatch):
    await az.put("config", b"c")  # create the container
    az._single_put_max = 0
    monkeypatch.setattr(azure, "_md5", lambda data: b"\0" * 16)
    with pytest.raises(RepositoryError, match="stage block 1/1 of 'points/p1'"):
        await az.put("points/p1", b"a block whose MD5 header is wrong")
    assert await az.list() == ["config"]


@pytest.mark.azurite
async def test_single_put_md5_is_checked_by_the_service(az, monkeypatch):
    await az.put("config", b"c")  # create the container
    monkeypatch.setattr(azure, "_md5", lambda data: b"\0" * 16)
    with pytest.raises(RepositoryError, match="put 'points/p1'"):
        await az.put("points/p1", b"a whole object whose MD5 header is wrong")
    assert await az.list() == ["config"]


@pytest.mark.azurite
async def test_commit_refuses_a_block_that_was_not_staged(az, monkeypatch):
    # No size check after the commit: the commit itself refuses a list naming a block the service
    # does not hold, so a put whose block went missing fails instead of publishing a short object.
    await az.put("config", b"c")  # create the container
    original = BlobClient.stage_block
    calls = []

    async def lose_second(self, block_id, data, *args, **kwargs):
        calls.append(block_id)
        if len(calls) == 2:
            return {}   # pretends to have staged it
        return await original(self, block_id, data, *args, **kwargs)

    monkeypatch.setattr(BlobClient, "stage_block", lose_second)
    az._single_put_max = 0
    with pytest.raises(RepositoryError, match="commit 'checkpoints/c1' failed: HTTP 400 InvalidBlockList"):
        await az.put("checkpoints/c1", bytes(5 * MIB))
    assert await az.list() == ["config"]


@pytest.mark.azurite
async def test_small_objects_are_one_put_blob(az):
    data = bytes(range(256)) * (9 * MIB // 256)
    await az.put("checkpoints/c1", data)
    committed, uncommitted = await az._client.get_blob_client("checkpoints/c1").get_block_list("all")
    assert committed == [] and uncommitted == []   # a Put Blob has no block list
    assert await az.get("checkpoints/c1") == data


@pytest.mark.azurite
async def test_transient_stage_failure_is_retried(az, monkeypatch):
    await az.put("config", b"c")  # create the container
    original = BlobClient.stage_block
    calls = []

    async def flaky(self, block_id, data, *args, **kwargs):
        calls.append(block_id)
        if len(calls) in (1, 3):  # fail the first attempt of two blocks, after consuming the stream
            data.read()
            raise ServiceResponseError("connection reset by peer")
        return await original(self, block_id, data, *args, **kwargs)

    monkeypatch.setattr(BlobClient, "stage_block", flaky)
    az._upload_concurrency = 1
    az._single_put_max = 0
    data = bytes(range(256)) * (5 * MIB // 256)
    await az.put("checkpoints/c1", data)
    assert len(calls) == 4 and calls[0] == calls[1] and calls[2] == calls[3]
    assert await az.get("checkpoints/c1") == data


@pytest.mark.azurite
async def test_wrong_key_is_permanent(azurite):
    wrong = azurite.replace("AccountKey=", "AccountKey=AAAA")
    async with AzureBackend("wrong-key", wrong, retry_attempts=5, retry_base_seconds=10.0) as backend:
        # A 403 must fail at once: with a 10 s base delay a retry would blow the timeout.
        with pytest.raises(RepositoryError, match=r"'config' failed: HTTP 403") as info:
            await asyncio.wait_for(backend.put("config", b"c"), timeout=5)
        assert not isinstance(info.value, TransientBackendError)
