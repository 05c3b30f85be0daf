"""Page-blob target on Azurite: sparse ranges, zero skipping, Azure's limits, footer last, cleanup on failure."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from azure.core.exceptions import ServiceResponseError
from azure.storage.blob import BlobServiceClient
from azure.storage.blob.aio import BlobClient as AioBlobClient

from lifeboat.core.errors import ConfigError
from lifeboat.repository.page_blob_target import (MAX_PAGE_BLOB_BYTES, PAGE_BYTES, PageBlobTarget, _nonzero_runs,
                                                  PageBlobTargetError, page_ranges, parse_target)
from lifeboat.repository.vhd import VHD_FOOTER_BYTES, parse_footer

KiB, MiB = 1024, 1024 * 1024


def sparse_image(path, size: int, pieces: dict[int, bytes]) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return str(path)


def test_page_ranges_cover_the_data_aligned_and_bounded(tmp_path):
    size = 3 * MiB + 1000  # a tail that is not a whole page
    pieces = {0: os.urandom(5000), 1 * MiB + 4096: os.urandom(300 * KiB), size - 700: os.urandom(700)}
    path = sparse_image(tmp_path / "img", size, pieces)
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = list(page_ranges(fd, size, 64 * KiB))
    finally:
        os.close(fd)
    assert all(o % PAGE_BYTES == 0 and n % PAGE_BYTES == 0 and 0 < n <= 64 * KiB for o, n in ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "sorted, never overlapping"
    assert ranges[-1][0] + ranges[-1][1] == -(-size // PAGE_BYTES) * PAGE_BYTES
    covered = set()
    for o, n in ranges:
        covered.update(range(o // PAGE_BYTES, (o + n) // PAGE_BYTES))
    for offset, data in pieces.items():
        assert set(range(offset // PAGE_BYTES, -(-(offset + len(data)) // PAGE_BYTES))) <= covered
    # The holes (most of the 3 MiB) are not in any range.
    assert len(covered) * PAGE_BYTES < 1 * MiB


def test_parse_target_and_names():
    assert parse_target("dr-drills") == ("dr-drills", "")
    assert parse_target("dr-drills/2026/web01/") == ("dr-drills", "2026/web01/")
    for bad in ("Dr", "a", "dr--x", "dr/../x y", "dr/a//b"):
        with pytest.raises(ConfigError):
            parse_target(bad)


@pytest.fixture
def container(azurite):
    name = f"pb-{uuid.uuid4().hex[:12]}"
    yield name
    service = BlobServiceClient.from_connection_string(azurite)
    try:
        service.delete_container(name)
    except Exception:  # noqa: BLE001 - a test may not have created it
        pass


def written_ranges(azurite: str, container: str, blob: str) -> list[tuple[int, int]]:
    client = BlobServiceClient.from_connection_string(azurite).get_blob_client(container, blob)
    return [(p.start, p.end + 1) for p in client.list_page_ranges()]


def test_upload_is_the_image_then_padding_then_footer(tmp_path, azurite, container):
    size = 2 * MiB + 3 * KiB
    zero_run = bytes(256 * KiB)     # written zeros (not a hole): skipped by content, not by SEEK_DATA
    pieces = {0: os.urandom(200 * KiB), 200 * KiB: zero_run, 456 * KiB: os.urandom(40 * KiB),
              size - 3 * KiB: os.urandom(3 * KiB)}
    path = sparse_image(tmp_path / "img", size, pieces)
    progress: list[tuple[int, int]] = []

    async def go():
        async with PageBlobTarget(azurite, container, concurrency=3, range_bytes=64 * KiB) as target:
            return await target.upload(path, "drill/web01.sda.vhd", verify=True,
                                       progress=lambda d, t: progress.append((d, t)))
    res = asyncio.run(go())
    assert (res.disk_size, res.vhd_size, res.blob_size) == (size, 3 * MiB, 3 * MiB + 512)
    assert res.verified and res.url.endswith(f"/{container}/drill/web01.sda.vhd")
    blob = BlobServiceClient.from_connection_string(azurite).get_blob_client(container, "drill/web01.sda.vhd")
    data = blob.download_blob().readall()
    with open(path, "rb") as f:
        want = f.read()
    assert hashlib.sha256(data[:size]).digest() == hashlib.sha256(want).digest()
    assert data[size:3 * MiB] == bytes(3 * MiB - size)
    assert parse_footer(data[-512:]).current_size == 3 * MiB
    # Only data was written: the zero run and the holes are not among the blob's page ranges.
    pages = written_ranges(azurite, container, "drill/web01.sda.vhd")
    assert (3 * MiB, 3 * MiB + 512) in pages or pages[-1][1] == 3 * MiB + 512
    # 64 KiB ranges: 256..448 KiB hold only the written zeros, 528 KiB..2 MiB is a hole.
    assert not any(s < 448 * KiB and e > 256 * KiB for s, e in pages), pages
    assert not any(s < 2 * MiB and e > 512 * KiB for s, e in pages), pages
    assert res.uploaded_bytes == sum(e - s for s, e in pages) - 512 < 320 * KiB
    assert res.skipped_bytes == size - res.uploaded_bytes
    assert progress[-1] == (size, size) and [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_existing_blob_is_refused_then_replaced_with_overwrite(tmp_path, azurite, container):
    first = sparse_image(tmp_path / "a", 1 * MiB, {0: os.urandom(4096)})
    second = sparse_image(tmp_path / "b", 2 * MiB, {MiB: os.urandom(4096)})

    async def go():
        async with PageBlobTarget(azurite, container) as target:
            await target.upload(first, "x.vhd")
            with pytest.raises(PageBlobTargetError, match="exists; pass --overwrite"):
                await target.upload(second, "x.vhd")
            return await target.upload(second, "x.vhd", overwrite=True)
    res = asyncio.run(go())
    data = BlobServiceClient.from_connection_string(azurite).get_blob_client(container, "x.vhd") \
        .download_blob().readall()
    assert res.blob_size == len(data) == 2 * MiB + 512
    with open(second, "rb") as f:
        assert data[:2 * MiB] == f.read()   # nothing of the first image is left (it had data at 0)


def test_a_failed_upload_leaves_no_blob(tmp_path, azurite, container):
    path = sparse_image(tmp_path / "img", 2 * MiB, {0: os.urandom(2 * MiB)})

    def fail_after_first(done, total):
        raise RuntimeError("operator pressed ctrl-c")

    async def go():
        async with PageBlobTarget(azurite, container, range_bytes=256 * KiB) as target:
            with pytest.raises(RuntimeError, match="ctrl-c"):
                await target.upload(path, "half.vhd", progress=fail_after_first)
    asyncio.run(go())
    names = [b.name for b in BlobServiceClient.from_connection_string(azurite).get_container_client(container)
             .list_blobs()]
    assert names == []


def test_azure_limits_are_enforced_here(tmp_path, azurite, container):
    huge = sparse_image(tmp_path / "huge", MAX_PAGE_BLOB_BYTES, {})  # 8 TiB sparse: + footer is too big

    async def go():
        async with PageBlobTarget(azurite, container) as target:
            with pytest.raises(PageBlobTargetError, match=r"more than an Azure page blob's 8796093022208"):
                await target.upload(huge, "huge.vhd")
            with pytest.raises(ConfigError, match="blob name"):
                await target.upload(huge, "x" * 1025)
    asyncio.run(go())
    with pytest.raises(ValueError, match="multiple of 512 up to 4194304"):
        PageBlobTarget(azurite, container, range_bytes=8 * MiB)
    with pytest.raises(ValueError, match="multiple of 512"):
        PageBlobTarget(azurite, container, range_bytes=1000)


def test_nonzero_runs_split_a_range_at_its_zero_pieces():
    g = 4096
    a, b, c = os.urandom(2 * g), os.urandom(g - 1) + b"\0", b"\0" * (g - 1) + b"\1"  # b, c: zero-edged but not zero
    data = a + bytes(3 * g) + b + c + bytes(g)
    runs = _nonzero_runs(data, g)
    assert [(s, len(r)) for s, r, _ in runs] == [(0, 2 * g), (5 * g, 2 * g)]
    rebuilt = bytearray(len(data))
    for s, r, md5 in runs:
        rebuilt[s:s + len(r)] = r
        assert md5 == hashlib.md5(r).digest()
    assert bytes(rebuilt) == data
    assert _nonzero_runs(bytes(3 * g), g) == []
    assert [(s, len(r)) for s, r, _ in _nonzero_runs(os.urandom(g + 512), g)] == [(0, g + 512)]


def test_zeros_inside_a_range_are_not_sent(tmp_path, azurite, container):
    # One 4 MiB range: data, 1 MiB of written zeros, data. Only the data's 64 KiB pieces are sent.
    size = 4 * MiB
    head, tail = os.urandom(100 * KiB), os.urandom(64 * KiB)
    path = sparse_image(tmp_path / "img", size, {0: head, 100 * KiB: bytes(MiB), 2 * MiB: tail,
                                                 2 * MiB + 64 * KiB: bytes(2 * MiB - 64 * KiB)})

    async def go():
        async with PageBlobTarget(azurite, container) as target:
            return await target.upload(path, "z.vhd")
    res = asyncio.run(go())
    pages = written_ranges(azurite, container, "z.vhd")
    assert pages == [(0, 128 * KiB), (2 * MiB, 2 * MiB + 64 * KiB), (4 * MiB, 4 * MiB + 512)], pages
    assert res.uploaded_bytes == 192 * KiB
    data = BlobServiceClient.from_connection_string(azurite).get_blob_client(container, "z.vhd") \
        .download_blob().readall()
    with open(path, "rb") as f:
        assert data[:size] == f.read()


def test_read_back_catches_pages_damaged_on_the_way(tmp_path, azurite, container, monkeypatch):
    # Azurite accepts a wrong Content-MD5 on Put Page (real Azure refuses it), so damage that gets
    # past the MD5 is simulated by flipping one byte after the MD5 was taken: only --verify-upload
    # can see it, and the blob is then removed.
    path = sparse_image(tmp_path / "img", MiB, {0: os.urandom(200 * KiB)})
    original = AioBlobClient.upload_page

    async def damaging(self, page, offset, length, **kwargs):
        if offset == 0 and length > VHD_FOOTER_BYTES:   # the data run 0..256 KiB, not the footer
            at = 64 * KiB + 1000
            page = page[:at] + bytes([page[at] ^ 0xFF]) + page[at + 1:]
        return await original(self, page, offset, length, **kwargs)

    monkeypatch.setattr(AioBlobClient, "upload_page", damaging)

    async def go():
        async with PageBlobTarget(azurite, container) as target:
            await target.upload(path, "unchecked.vhd")   # without read-back the damage goes unnoticed
            with pytest.raises(PageBlobTargetError,
                               match=rf"read-back differs from the image at byte {64 * KiB + 1000}"):
                await target.upload(path, "checked.vhd", verify=True)
    asyncio.run(go())
    names = [b.name for b in BlobServiceClient.from_connection_string(azurite).get_container_client(container)
             .list_blobs()]
    assert names == ["unchecked.vhd"]


def test_transient_page_failures_are_retried(tmp_path, azurite, container, monkeypatch):
    path = sparse_image(tmp_path / "img", 2 * MiB, {0: os.urandom(2 * MiB)})
    original = AioBlobClient.upload_page
    calls: list[int] = []

    async def flaky(self, page, offset, length, **kwargs):
        calls.append(offset)
        if len(calls) in (1, 4):
            raise ServiceResponseError("connection reset by peer")
        return await original(self, page, offset, length, **kwargs)

    monkeypatch.setattr(AioBlobClient, "upload_page", flaky)

    async def go():
        async with PageBlobTarget(azurite, container, concurrency=1, range_bytes=MiB,
                                  retry_base_seconds=0.01) as target:
            return await target.upload(path, "flaky.vhd")
    res = asyncio.run(go())
    # Two data ranges and the footer, two of the five calls failed once and were sent again.
    assert calls == [0, 0, MiB, 2 * MiB, 2 * MiB] and res.uploaded_bytes == 2 * MiB
    data = BlobServiceClient.from_connection_string(azurite).get_blob_client(container, "flaky.vhd") \
        .download_blob().readall()
    with open(path, "rb") as f:
        assert data[:2 * MiB] == f.read()
    assert parse_footer(data[-512:]).current_size == 2 * MiB


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 64 * 1024 // 512).map(lambda n: n * 512 + 7),
       st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 20_000)), max_size=6),
       st.sampled_from([512, 4096, 65536]))
def test_page_ranges_property(tmp_path, size_pages, writes, range_bytes):
    """For any sparse layout: ranges are aligned, bounded, ordered, inside the image, and cover every written byte."""
    size = size_pages
    path = tmp_path / f"img-{uuid.uuid4().hex}"
    pieces = {o: b"\1" * min(n, size - o) for o, n in writes if o < size}
    sparse_image(path, size, pieces)
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = list(page_ranges(fd, size, range_bytes))
    finally:
        os.close(fd)
    end = -(-size // PAGE_BYTES) * PAGE_BYTES
    assert all(o % PAGE_BYTES == 0 and n % PAGE_BYTES == 0 and 0 < n <= range_bytes and o + n <= end
               for o, n in ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    covered = {p for o, n in ranges for p in range(o // PAGE_BYTES, (o + n) // PAGE_BYTES)}
    for offset, data in pieces.items():
        assert set(range(offset // PAGE_BYTES, (offset + len(data) - 1) // PAGE_BYTES + 1)) <= covered
    os.unlink(path)


def test_a_sas_connection_string_never_reaches_the_url(tmp_path, azurite, container):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    parts = dict(p.split("=", 1) for p in azurite.strip(";").split(";"))
    sas = generate_account_sas(parts["AccountName"], parts["AccountKey"],
                               ResourceTypes(service=True, container=True, object=True),
                               AccountSasPermissions(read=True, write=True, create=True, delete=True, list=True),
                               expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    conn = f"BlobEndpoint={parts['BlobEndpoint']};SharedAccessSignature={sas}"
    path = sparse_image(tmp_path / "img", MiB, {0: os.urandom(4096)})

    async def go():
        async with PageBlobTarget(conn, container) as target:
            return await target.upload(path, "sas.vhd")
    res = asyncio.run(go())
    assert res.url == f"{parts['BlobEndpoint']}/{container}/sas.vhd"
    assert "sig=" not in res.url and "?" not in res.url
