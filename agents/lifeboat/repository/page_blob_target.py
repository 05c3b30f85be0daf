"""Upload a materialised disk image to an Azure page blob as a fixed VHD (data pages, then the footer)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import stat
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import structlog
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, ContainerClient

from ..core.errors import ConfigError, LifeboatError, RepositoryError, TransientBackendError
from .azure import (CONTAINER_NAME_RE, RETRY_ATTEMPTS, RETRY_BASE_SECONDS, RETRY_CAP_SECONDS, backoff_seconds,
                    describe_error, is_transient)
from .vhd import VHD_FOOTER_BYTES, build_footer, parse_footer, rounded_size

logger = structlog.get_logger("lifeboat.repository.page_blob_target")

T = TypeVar("T")

# Azure's limits, enforced here because Azurite does not: Put Page writes at most 4 MiB, at
# 512-byte-aligned offsets and lengths; a page blob is at most 8 TiB (a VHD's data part, a whole
# number of MiB, plus its footer must fit); blob names are at most 1024 characters.
PAGE_BYTES = 512
MAX_PAGE_WRITE_BYTES = 4 * 1024 * 1024
MAX_PAGE_BLOB_BYTES = 8 * 1024 ** 4
MAX_BLOB_NAME_CHARS = 1024
# Put Page calls in flight at once: ~350 MB/s to Azurite with 4 (PERF-LIMITS.md); memory is
# bounded by this many ranges of at most MAX_PAGE_WRITE_BYTES.
UPLOAD_CONCURRENCY = 4
# Zeros inside a range are found in pieces of this size and not sent (a 512-multiple: pages stay aligned).
ZERO_RUN_BYTES = 64 * 1024
_BLOB_NAME_RE = re.compile(r"[A-Za-z0-9._/-]+")


class PageBlobTargetError(LifeboatError):
    """Failover to an Azure page blob failed: {}."""

    exit_code = 74


@dataclass
class PageBlobResult:
    url: str
    container: str
    blob_name: str
    disk_size: int           # the image's size
    vhd_size: int            # the VHD's virtual size: disk_size rounded up to a whole MiB
    blob_size: int           # vhd_size + the 512-byte footer
    uploaded_bytes: int      # data bytes sent (all-zero ranges and holes are skipped)
    skipped_bytes: int
    verified: bool           # every data page read back and compared with the image


def check_blob_name(name: str) -> str:
    if not name or len(name) > MAX_BLOB_NAME_CHARS or not _BLOB_NAME_RE.fullmatch(name) or \
            name.startswith("/") or "//" in name or name.endswith("/"):
        raise ConfigError("--to-azure", f"blob name {name!r}: use 1-{MAX_BLOB_NAME_CHARS} letters, digits, '.', '_', "
                          "'-' and single '/' between parts")
    return name


def parse_target(spec: str) -> tuple[str, str]:
    """CONTAINER[/PREFIX] -> (container, prefix ending in '/' or empty)."""
    container, _, prefix = spec.strip().partition("/")
    if not CONTAINER_NAME_RE.match(container):
        raise ConfigError("--to-azure", f"{container!r} is not an Azure container name (3-63 lowercase letters, "
                          "digits and single hyphens, starting and ending with a letter or digit)")
    prefix = prefix.strip("/")
    if prefix:
        check_blob_name(prefix)
        prefix += "/"
    return container, prefix


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, end) of the parts of the image that may hold data: SEEK_DATA/SEEK_HOLE, or all of it."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                return
            # EINVAL: the filesystem or device cannot say; every byte may be data.
            yield offset, size
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def page_ranges(fd: int, size: int, range_bytes: int) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges covering every data extent, 512-aligned, each at most range_bytes.

    Ranges are cut at multiples of range_bytes, so neighbouring extents never produce overlapping
    writes; the last range may run past `size` (up to the next 512 bytes: zeros are sent there).
    """
    aligned_size = -(-size // PAGE_BYTES) * PAGE_BYTES
    last_end = 0
    for start, end in data_extents(fd, size):
        start = max(start // PAGE_BYTES * PAGE_BYTES, last_end)
        end = min(-(-end // PAGE_BYTES) * PAGE_BYTES, aligned_size)
        while start < end:
            stop = min((start // range_bytes + 1) * range_bytes, end)
            yield start, stop - start
            start = stop
        last_end = max(last_end, end)


def _read_range(fd: int, offset: int, length: int, size: int) -> bytes:
    """The image's bytes at [offset, offset+length), zero-padded past its end."""
    data = os.pread(fd, min(length, size - offset), offset)
    if offset + len(data) < min(offset + length, size):
        raise PageBlobTargetError(f"short read of the staging image at {offset}: {len(data)} of "
                                  f"{min(length, size - offset)} bytes")
    return data + bytes(length - len(data)) if len(data) < length else data


_ZEROS = bytes(MAX_PAGE_WRITE_BYTES)


def _is_zero(data: bytes) -> bool:
    """Whether a range is all zeros: skipped, because a page blob reads zeros where nothing was written."""
    # bytes == bytes is a memcmp (~10 GB/s here); data.strip(b"\0") and memoryview == are ~100x slower.
    return data == (_ZEROS if len(data) == len(_ZEROS) else _ZEROS[:len(data)])


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _nonzero_runs(data: bytes, granularity: int) -> list[tuple[int, bytes, bytes]]:
    """(start, bytes, MD5) of each maximal run of granularity-sized pieces of data that are not all zero.

    Disks hold zeros in runs much shorter than a 4 MiB range (the bench image: 39% zero 1 MiB
    regions, almost never 4 aligned in a row), so a range is split where its zero pieces are.
    """
    runs: list[tuple[int, bytes, bytes]] = []
    start = None
    for i in range(0, len(data) + granularity, granularity):
        piece = data[i:i + granularity]
        if piece and not _is_zero(piece):
            if start is None:
                start = i
            continue
        if start is not None:
            run = data[start:i]
            runs.append((start, run, _md5(run)))
            start = None
    return runs


def image_size(fd: int) -> int:
    st = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


class PageBlobTarget:
    """One storage account's container receiving fixed-VHD page blobs."""

    def __init__(self, connection_string: str, container: str, *, concurrency: int = UPLOAD_CONCURRENCY,
                 range_bytes: int = MAX_PAGE_WRITE_BYTES, zero_run_bytes: int | None = None,
                 retry_attempts: int = RETRY_ATTEMPTS,
                 retry_base_seconds: float = RETRY_BASE_SECONDS, retry_cap_seconds: float = RETRY_CAP_SECONDS):
        if not CONTAINER_NAME_RE.match(container):
            raise ConfigError("--to-azure", f"{container!r} is not an Azure container name")
        if not (PAGE_BYTES <= range_bytes <= MAX_PAGE_WRITE_BYTES and range_bytes % PAGE_BYTES == 0):
            raise ValueError(f"range_bytes must be a multiple of {PAGE_BYTES} up to {MAX_PAGE_WRITE_BYTES}, "
                             f"not {range_bytes}")
        if zero_run_bytes is None:
            zero_run_bytes = min(ZERO_RUN_BYTES, range_bytes)
        if not (PAGE_BYTES <= zero_run_bytes <= range_bytes and zero_run_bytes % PAGE_BYTES == 0):
            raise ValueError(f"zero_run_bytes must be a multiple of {PAGE_BYTES} up to range_bytes, "
                             f"not {zero_run_bytes}")
        if concurrency < 1 or retry_attempts < 1:
            raise ValueError("concurrency and retry_attempts must be at least 1")
        self.container = container
        self._concurrency = concurrency
        self._range_bytes = range_bytes
        self._zero_run_bytes = zero_run_bytes
        self._retry_attempts = retry_attempts
        self._retry_base = retry_base_seconds
        self._retry_cap = retry_cap_seconds
        try:
            # retry_total=0: our retry loop (transient errors only, as the repository backend's) is the only one.
            self._client = ContainerClient.from_connection_string(connection_string, container, retry_total=0)
        except ValueError:
            raise ConfigError("--to-azure-connection-string-file", "not a valid Azure Storage connection string") \
                from None

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "PageBlobTarget":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _retry(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (ResourceNotFoundError, ResourceExistsError):
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent below
                what = f"azure://{self.container}/{name}: {op}"
                if not is_transient(exc):
                    raise RepositoryError(f"{what} failed: {describe_error(exc)}") from exc
                if attempt >= self._retry_attempts:
                    raise TransientBackendError(f"{what} still failing after {attempt} attempts: "
                                                f"{describe_error(exc)}") from exc
                delay = backoff_seconds(attempt, self._retry_base, self._retry_cap)
                logger.warning("page_blob_retry", op=op, OBJECT=name, CONTAINER=self.container, attempt=attempt,
                               delay_seconds=round(delay, 3), error=describe_error(exc))
                await asyncio.sleep(delay)

    async def _ensure_container(self) -> None:
        async def create() -> None:
            try:
                await self._client.create_container()
            except ResourceExistsError:
                pass
        await self._retry("create container", "", create)

    async def upload(self, image_path: str, blob_name: str, *, overwrite: bool = False, verify: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> PageBlobResult:
        """Write image_path as the fixed VHD page blob blob_name; the footer goes last.

        A blob without its footer is not a VHD (Azure refuses to import it), so the footer is the
        commit: it is written only after every data page was acknowledged, then read back and
        parsed. On failure the partial blob is deleted. progress(done, total) counts image bytes.
        """
        check_blob_name(blob_name)
        started = time.monotonic()
        fd = os.open(image_path, os.O_RDONLY)
        try:
            disk_size = image_size(fd)
            vhd_size = rounded_size(disk_size)
            blob_size = vhd_size + VHD_FOOTER_BYTES
            if blob_size > MAX_PAGE_BLOB_BYTES:
                raise PageBlobTargetError(f"{image_path} is {disk_size} bytes; as a VHD it needs {blob_size} bytes, "
                                          f"more than an Azure page blob's {MAX_PAGE_BLOB_BYTES} (8 TiB)")
            if vhd_size != disk_size:
                logger.info("vhd_size_rounded", OBJECT=blob_name, disk_size=disk_size, vhd_size=vhd_size,
                            padding_bytes=vhd_size - disk_size,
                            why="Azure imports only VHDs whose virtual size is a whole number of MiB")
            blob = self._client.get_blob_client(blob_name)
            await self._create(blob, blob_name, blob_size, overwrite)
            try:
                uploaded = await self._upload_pages(blob, blob_name, fd, disk_size, progress)
                footer = build_footer(vhd_size)
                await self._retry("write VHD footer", blob_name, lambda: blob.upload_page(
                    footer, vhd_size, VHD_FOOTER_BYTES, transactional_content_md5=_md5(footer)))
                await self._check_written(blob, blob_name, blob_size, vhd_size, footer)
                if verify:
                    await self._verify(blob, blob_name, fd, disk_size, vhd_size)
            except BaseException:
                await self._delete_quietly(blob, blob_name)
                raise
        finally:
            os.close(fd)
        if progress:
            progress(disk_size, disk_size)
        # One canonical line per upload.
        logger.info("page_blob_uploaded", OBJECT=blob_name, CONTAINER=self.container, disk_size=disk_size,
                    vhd_size=vhd_size, uploaded_bytes=uploaded, verified=verify,
                    seconds=round(time.monotonic() - started, 3))
        # The URL goes to stdout, the descriptor and the ARM template: never with a SAS token in it.
        url = urllib.parse.urlsplit(blob.url)._replace(query="", fragment="").geturl()
        return PageBlobResult(url, self.container, blob_name, disk_size, vhd_size, blob_size, uploaded,
                              disk_size - uploaded, verify)

    async def exists(self, blob_name: str) -> bool:
        blob = self._client.get_blob_client(check_blob_name(blob_name))

        async def call() -> bool:
            try:
                await blob.get_blob_properties()
                return True
            except ResourceNotFoundError:  # BlobNotFound or ContainerNotFound
                return False
        return await self._retry("check", blob_name, call)

    async def _create(self, blob: BlobClient, name: str, blob_size: int, overwrite: bool) -> None:
        if not overwrite and await self.exists(name):
            raise PageBlobTargetError(f"azure://{self.container}/{name} exists; pass --overwrite to replace it, "
                                      "or choose another --to-azure prefix")

        async def create() -> None:
            # Creating a page blob over an existing one replaces it with an all-zero blob of the new size.
            await blob.create_page_blob(blob_size)

        try:
            await self._retry("create page blob", name, create)
        except ResourceNotFoundError:
            await self._ensure_container()
            await self._retry("create page blob", name, create)

    async def _upload_pages(self, blob: BlobClient, name: str, fd: int, disk_size: int,
                            progress: Callable[[int, int], None] | None) -> int:
        ranges = page_ranges(fd, disk_size, self._range_bytes)
        uploaded = 0
        done = 0

        async def worker() -> None:
            nonlocal uploaded, done
            # Workers share one iterator: a range is read only when a worker takes it, so at most
            # `concurrency` ranges are in memory.
            for offset, length in ranges:
                data = await asyncio.to_thread(_read_range, fd, offset, length, disk_size)
                if not _is_zero(data):  # ~0.4 ms per 4 MiB: cheaper than a thread hop
                    for start, run, md5 in await asyncio.to_thread(_nonzero_runs, data, self._zero_run_bytes):
                        at = offset + start
                        # Bytes, not a stream: the SDK slices the page (page[:length]).
                        await self._retry(f"write pages at {at}+{len(run)}", name, lambda: blob.upload_page(
                            run, at, len(run), transactional_content_md5=md5))
                        uploaded += min(len(run), disk_size - at)
                del data
                done = max(done, min(offset + length, disk_size))
                if progress:
                    progress(done, disk_size)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._concurrency):
                    group.create_task(worker())
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return uploaded

    async def _download(self, blob: BlobClient, name: str, offset: int, length: int) -> bytes:
        async def call() -> bytes:
            downloader = await blob.download_blob(offset=offset, length=length)
            return await downloader.readall()
        return await self._retry(f"read back {offset}+{length}", name, call)

    async def _check_written(self, blob: BlobClient, name: str, blob_size: int, vhd_size: int,
                             footer: bytes) -> None:
        props = await self._retry("check size", name, blob.get_blob_properties)
        if props.size != blob_size:
            raise PageBlobTargetError(f"azure://{self.container}/{name} is {props.size} bytes, expected "
                                      f"{blob_size}; it was changed by someone else, fail over again")
        stored = await self._download(blob, name, vhd_size, VHD_FOOTER_BYTES)
        if stored != footer:
            raise PageBlobTargetError(f"azure://{self.container}/{name}: the footer read back differs from the one "
                                      "written; fail over again")
        parse_footer(stored)

    async def _verify(self, blob: BlobClient, name: str, fd: int, disk_size: int, vhd_size: int) -> None:
        """Read every data page back and compare it with the image (zeros past its end)."""
        offset = 0
        while offset < vhd_size:
            length = min(self._range_bytes, vhd_size - offset)
            stored, want = await asyncio.gather(
                self._download(blob, name, offset, length),
                asyncio.to_thread(_read_range, fd, offset, length, disk_size) if offset < disk_size
                else asyncio.sleep(0, bytes(length)))
            if stored != want:
                first = next(i for i in range(length) if i >= len(stored) or stored[i] != want[i])
                raise PageBlobTargetError(f"azure://{self.container}/{name}: read-back differs from the image at "
                                          f"byte {offset + first}; fail over again")
            offset += length

    async def _delete_quietly(self, blob: BlobClient, name: str) -> None:
        try:
            await blob.delete_blob()
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            logger.warning("page_blob_cleanup_failed", OBJECT=name, CONTAINER=self.container,
                           error=describe_error(exc))
