"""Azure Blob Storage backend: block blobs sent whole or in staged blocks, MD5-checked, published in one step."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import math
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import aiohttp
import structlog
from azure.core.exceptions import (
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock
from azure.storage.blob.aio import ContainerClient

from ..core.errors import ConfigError, ObjectNotFound, RepositoryError, TransientBackendError
from .backend import Backend, check_name

logger = structlog.get_logger("lifeboat.repository.azure")

T = TypeVar("T")

# Every Put Block carries the block's MD5 (Content-MD5), so a block damaged in transit is refused by
# the service instead of being committed.
BLOCK_SIZE_BYTES = 4 * 1024 * 1024
MAX_BLOCK_SIZE_BYTES = 4 * 1024 * 1024
# Blocks at least this big are hashed in a worker thread (hashlib releases the GIL): MD5 of a 4 MiB
# block costs ~5 ms, which must not stall the event loop. Smaller ones are cheaper than the hop.
MD5_IN_THREAD_MIN_BYTES = 64 * 1024
# Objects up to this size go up as one Put Blob (with its Content-MD5): one round trip instead of
# staging blocks and committing them, and still all or nothing. A segment of a 16 MiB batch fits.
SINGLE_PUT_MAX_BYTES = 16 * 1024 * 1024
# Blocks of one object staged at the same time; the process server runs several uploads in parallel too.
UPLOAD_CONCURRENCY = 4

# Our own retry loop replaces the SDK's (the clients are built with retry_total=0), so that what is
# retried is decided in one place (is_transient) and tested. 8 attempts with delays 0.5, 1, 2, 4, 8,
# 16, 30 s (each scaled by a random 0.5..1 so that parallel uploaders do not retry in step) give up
# after about 30-60 s; the uploader above keeps the batch in its cache and tries again later.
RETRY_ATTEMPTS = 8
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 30.0

# Request Timeout, Too Many Requests (throttling), and the server-side 5xx that Azure documents as
# retryable. 501/505 and every other 4xx will fail the same way again.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Error codes that are transient although their status is not:
#   Md5Mismatch (400): the block was damaged on the way; sending it again is the fix.
#   ConditionNotMet (412): the SDK reads large blobs in chunks pinned to the first chunk's ETag; the
#     object was replaced mid-read, and reading again returns the new version whole.
TRANSIENT_ERROR_CODES = frozenset({"Md5Mismatch", "ConditionNotMet"})

# Azure container names: 3-63 of [a-z0-9-], starting and ending with a letter or digit, no "--".
CONTAINER_NAME_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

# A SAS token in a URL is a credential; never let it reach an error message or a log line.
_SAS_SIG_RE = re.compile(r"(?i)(sig=)[^&\s'\"]+")


def error_code(exc: BaseException) -> str | None:
    """The storage error code (x-ms-error-code) of an HTTP error, as a plain string."""
    code = getattr(exc, "error_code", None)
    if code is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        code = headers.get("x-ms-error-code")
    if code is None:
        return None
    return str(getattr(code, "value", code))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed.

    Transient: the connection failed or broke, a timeout, an incomplete body, HTTP 408/429/5xx
    (but not 501/505), and the codes in TRANSIENT_ERROR_CODES. Everything else is permanent:
    bad credentials, missing objects, invalid requests. Cancellation is never transient: a
    cancelled upload must stop now, not after one more attempt.
    """
    if isinstance(exc, asyncio.CancelledError):
        return False
    # IncompleteReadError is an HttpResponseError whose status is the 200/206 of the truncated reply.
    if isinstance(exc, IncompleteReadError):
        return True
    if isinstance(exc, HttpResponseError):
        if exc.status_code in TRANSIENT_HTTP_STATUSES:
            return True
        return error_code(exc) in TRANSIENT_ERROR_CODES
    # ServiceRequestError: nothing was sent or no connection; ServiceResponseError: the reply broke.
    # The timeouts are subclasses of both. Raw aiohttp/OS errors can escape from streamed reads.
    return isinstance(exc, (ServiceRequestError, ServiceResponseError, aiohttp.ClientError,
                            ConnectionError, TimeoutError))


def describe_error(exc: BaseException) -> str:
    """A one-line description of a remote error for messages and logs, with SAS signatures redacted."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code = error_code(exc)
        text = (str(exc).strip().splitlines() or [exc.reason or ""])[0]
        detail = f"HTTP {exc.status_code}" + (f" {code}" if code else "") + (f": {text}" if text else "")
    else:
        text = (str(exc).strip().splitlines() or [""])[0]
        detail = f"{type(exc).__name__}" + (f": {text}" if text else "")
    return _SAS_SIG_RE.sub(r"\1**redacted**", detail)


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number `attempt` (1-based): capped exponential, scaled by a random 0.5..1."""
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def iter_blocks(parts: Iterable[bytes | bytearray | memoryview], block_size: int) -> Iterator[bytes]:
    """Cut the concatenation of parts into blocks of exactly block_size bytes (the last one shorter)."""
    pending: list[memoryview] = []
    filled = 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            take = min(len(view), block_size - filled)
            pending.append(view[:take])
            filled += take
            view = view[take:]
            if filled == block_size:
                yield b"".join(pending)
                pending, filled = [], 0
    if filled:
        yield b"".join(pending)


class AzureBackend(Backend):
    """One Azure Blob container per repository; each object is one block blob.

    put() sends an object of at most SINGLE_PUT_MAX_BYTES as one Put Blob with its MD5; a bigger one
    is staged as blocks of at most 4 MiB, each with its MD5, then published by committing the block
    list. Staged but uncommitted blocks are invisible to readers, and the commit replaces a previous
    version in one step, so readers see the old object or the whole new one, never a part. The
    commit succeeds only if every block it lists was staged (with its length and MD5) by this put.
    """

    def __init__(
        self,
        container: str,
        connection_string: str,
        *,
        block_size_bytes: int = BLOCK_SIZE_BYTES,
        single_put_max_bytes: int = SINGLE_PUT_MAX_BYTES,
        upload_concurrency: int = UPLOAD_CONCURRENCY,
        retry_attempts: int = RETRY_ATTEMPTS,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        retry_cap_seconds: float = RETRY_CAP_SECONDS,
    ) -> None:
        if not CONTAINER_NAME_RE.match(container):
            raise ConfigError("repository.url", f"azure://{container}: an Azure container name is 3-63 "
                              "lowercase letters, digits and single hyphens, starting and ending with a "
                              "letter or digit")
        if not 0 < block_size_bytes <= MAX_BLOCK_SIZE_BYTES:
            raise ValueError(f"block_size_bytes must be 1..{MAX_BLOCK_SIZE_BYTES}, not {block_size_bytes}")
        if single_put_max_bytes < 0:
            raise ValueError(f"single_put_max_bytes must be >= 0 (0: always stage blocks), not {single_put_max_bytes}")
        if upload_concurrency < 1 or retry_attempts < 1:
            raise ValueError("upload_concurrency and retry_attempts must be at least 1")
        self.container = container
        self.location = f"azure://{container}"
        self._block_size = block_size_bytes
        self._single_put_max = single_put_max_bytes
        self._upload_concurrency = upload_concurrency
        self._retry_attempts = retry_attempts
        self._retry_base = retry_base_seconds
        self._retry_cap = retry_cap_seconds
        try:
            # retry_total=0: the SDK's own retry policy is off; _retry below is the only retry loop.
            self._client = ContainerClient.from_connection_string(connection_string, container, retry_total=0)
        except ValueError:
            # The connection string holds the account key: do not repeat it in the message.
            raise ConfigError("repository.azure_connection_string_file",
                              "not a valid Azure Storage connection string") from None

    async def close(self) -> None:
        # Blob clients come from self._client and share its transport; closing it closes them all.
        await self._client.close()

    # -- retries -----------------------------------------------------------------------------

    async def _retry(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run call(), retrying transient errors with capped exponential backoff.

        ResourceNotFoundError passes through for the caller to map. A permanent error raises
        RepositoryError at once; transient errors that persist raise TransientBackendError.
        CancelledError is a BaseException and is never caught here.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except ResourceNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent below
                what = f"{self.location}: {op} '{name}'"
                if not is_transient(exc):
                    raise RepositoryError(f"{what} failed: {describe_error(exc)}") from exc
                if attempt >= self._retry_attempts:
                    raise TransientBackendError(
                        f"{what} still failing after {attempt} attempts: {describe_error(exc)}") from exc
                delay = backoff_seconds(attempt, self._retry_base, self._retry_cap)
                logger.warning("azure_retry", op=op, OBJECT=name, CONTAINER=self.container, attempt=attempt,
                               delay_seconds=round(delay, 3), error=describe_error(exc))
                await asyncio.sleep(delay)

    async def _read(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._retry(op, check_name(name), call)
        except ResourceNotFoundError:
            # BlobNotFound or ContainerNotFound: either way the object does not exist.
            raise ObjectNotFound(name) from None

    # -- writing -----------------------------------------------------------------------------

    async def put(self, name: str, parts: list[bytes] | bytes) -> None:
        check_name(name)
        if isinstance(parts, (bytes, bytearray, memoryview)):
            parts = [parts]
        try:
            await self._upload(name, parts)
        except ResourceNotFoundError as exc:
            if error_code(exc) != "ContainerNotFound":
                raise RepositoryError(f"{self.location}: put '{name}' failed: {describe_error(exc)}") from exc
            # First put into a new repository: create its container, then upload again from scratch
            # (blocks staged before the failure were refused, so nothing is left behind).
            await self._create_container()
            try:
                await self._upload(name, parts)
            except ResourceNotFoundError as exc2:
                raise RepositoryError(f"{self.location}: put '{name}' failed: {describe_error(exc2)}") from exc2

    async def _create_container(self) -> None:
        async def create() -> None:
            try:
                await self._client.create_container()
            except ResourceExistsError:
                pass  # created meanwhile by another writer, or by an earlier attempt whose reply was lost
        await self._retry("create container for", self.container, create)
        logger.info("azure_container_created", CONTAINER=self.container)

    async def _upload(self, name: str, parts: list[bytes]) -> None:
        blob = self._client.get_blob_client(name)
        total = sum(len(memoryview(p).cast("B")) for p in parts)
        if total <= self._single_put_max:
            await self._put_whole(blob, name, parts, total)
            return
        count = math.ceil(total / self._block_size)
        # One random token per put: two writers of the same name stage disjoint blocks, and the last
        # commit wins whole. All IDs have the same length, as Azure requires within one blob.
        token = uuid.uuid4().hex
        block_ids = [f"{token}{i:08x}" for i in range(count)]
        blocks = enumerate(iter_blocks(parts, self._block_size))
        staged = 0

        async def stage_worker() -> None:
            nonlocal staged
            # Workers share one iterator: each block is cut (and copied) only when a worker takes it,
            # so at most `upload_concurrency` blocks are copied at once.
            for index, data in blocks:
                # Same effect as the SDK's validate_content=True (a Content-MD5 header the service
                # checks), but hashed off the event loop.
                md5 = await asyncio.to_thread(_md5, data) if len(data) >= MD5_IN_THREAD_MIN_BYTES else _md5(data)

                async def stage(block_id: str = block_ids[index], data: bytes = data, md5: bytes = md5) -> None:
                    # A fresh stream per attempt (a failed attempt leaves the last one read to its end).
                    # A stream, not bytes, because aiohttp then writes it in chunks and yields to the loop.
                    await blob.stage_block(block_id, io.BytesIO(data), length=len(data),
                                           transactional_content_md5=md5)

                await self._retry(f"stage block {index + 1}/{count} of", name, stage)
                staged += len(data)

        if count:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(self._upload_concurrency, count)):
                        group.create_task(stage_worker())
            except ExceptionGroup as eg:
                raise eg.exceptions[0] from None

        if staged != total:   # checked before the commit: a wrong cut publishes nothing
            raise RepositoryError(f"{self.location}: put '{name}' staged {staged} bytes but was given {total}; "
                                  "nothing was committed, put it again")
        # Commit is idempotent: a retry after a lost reply re-commits the same list (BlobBlock's
        # default state "Latest" finds the blocks among the committed ones).
        commit = functools.partial(blob.commit_block_list, [BlobBlock(block_id=b) for b in block_ids],
                                   validate_content=True)
        await self._retry("commit", name, commit)
        # No get_blob_properties round trip to check the size: the commit is the check. Put Block List
        # fails (InvalidBlockList) unless every listed ID is staged, the IDs carry this put's random
        # token (no other writer's or earlier put's block can match), and the service accepted each
        # staged block only with the length and MD5 we sent. So a successful commit stores exactly
        # the concatenation of our blocks: `staged` bytes, checked above to be the `total` we were given.

    async def _put_whole(self, blob, name: str, parts: list[bytes], total: int) -> None:
        """One Put Blob: the service stores the whole body or nothing, and refuses it unless it
        matches the Content-MD5 we send (hashed off the event loop, as the blocks are)."""

        def join_and_hash() -> tuple[bytes, bytes]:
            joined = b"".join(parts)   # the SDK's single put takes one bytes object
            return joined, _md5(joined)

        data, md5 = await asyncio.to_thread(join_and_hash) if total >= MD5_IN_THREAD_MIN_BYTES else join_and_hash()

        async def call() -> None:
            await blob.upload_blob(data, length=total, overwrite=True, transactional_content_md5=md5)

        await self._retry("put", name, call)

    async def delete(self, name: str) -> None:
        blob = self._client.get_blob_client(check_name(name))
        attempts = 0

        async def call() -> None:
            nonlocal attempts
            attempts += 1
            try:
                await blob.delete_blob()
            except ResourceNotFoundError:
                if attempts > 1:
                    return  # an earlier attempt deleted it and its reply was lost
                raise

        await self._read("delete", name, call)

    # -- reading -----------------------------------------------------------------------------

    async def get(self, name: str) -> bytes:
        blob = self._client.get_blob_client(check_name(name))

        async def call() -> bytes:
            downloader = await blob.download_blob()
            return await downloader.readall()

        return await self._read("get", name, call)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Read up to `length` bytes at `offset`; short or empty past the end, like a file read."""
        if offset < 0 or length < 0:
            raise ValueError(f"get_range of '{name}': offset {offset} and length {length} must be >= 0")
        if length == 0:
            await self.size(name)  # raises ObjectNotFound as the other reads do
            return b""
        blob = self._client.get_blob_client(check_name(name))

        async def call() -> bytes:
            try:
                downloader = await blob.download_blob(offset=offset, length=length)
            except HttpResponseError as exc:
                if exc.status_code == 416:  # the range starts at or after the end of the object
                    return b""
                raise
            return await downloader.readall()

        return await self._read("get range of", name, call)

    async def size(self, name: str) -> int:
        blob = self._client.get_blob_client(check_name(name))
        properties = await self._read("get size of", name, blob.get_blob_properties)
        return properties.size

    async def exists(self, name: str) -> bool:
        try:
            await self.size(name)
        except ObjectNotFound:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        async def call() -> list[str]:
            # Only committed blobs are listed: an upload in progress (or abandoned) does not appear.
            try:
                return [n async for n in self._client.list_blob_names(name_starts_with=prefix or None)]
            except ResourceNotFoundError:
                return []  # no container yet: an empty repository

        return sorted(await self._retry("list", prefix + "*", call))

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        async def call() -> dict[str, int]:
            try:
                return {b.name: b.size async for b in self._client.list_blobs(name_starts_with=prefix or None)}
            except ResourceNotFoundError:
                return {}

        return dict(sorted((await self._retry("list", prefix + "*", call)).items()))
