"""The failover's image digest, kept per block while applying, against the real image's bytes: overlaps
within and across segments, partial blocks, zero ranges, a short last block, a checkpoint base, a block
device; and a wrong image (frames out of order, a forged checkpoint chunk) is still caught."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from lifeboat.core import checkpoint as ckfmt
from lifeboat.core import keys
from lifeboat.core.errors import PointIncomplete
from lifeboat.core.segment import SegmentHeader, assemble_segment, encode_record
from lifeboat.core.wire import FRAME_BOOKMARK, FRAME_WRITE, Frame
from lifeboat.repository.checkpoints import build_checkpoint, read_manifest
from lifeboat.repository.image_digests import ImageDigests, write_digests
from lifeboat.repository.local import LocalBackend
from lifeboat.repository.materialize import image_digest_of, materialize
from lifeboat.repository.repo import Repository

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "demo"))
from synthetic_log import SyntheticDisk  # noqa: E402

BLOCK = 4096
DISK_BYTES = 256 * 1024 + 1000     # the last block is short (1000 bytes)


def digest_of_bytes(image: bytes, block: int = BLOCK) -> str:
    """The image digest computed straight from bytes (the agent's definition), independent of the code under test."""
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(image[a:a + block])
                                              for a in range(0, len(image), block)))


@pytest.fixture
async def repo(tmp_path):
    r = await Repository.init(LocalBackend(str(tmp_path / "repo")), keys.write_key_file(str(tmp_path / "key")))
    yield r
    await r.backend.close()


def messy_writes(sd: SyntheticDisk, count: int) -> list[tuple[int, bytes]]:
    """Unaligned, odd-length, overlapping writes, some running to the disk's last byte."""
    out = []
    for i in range(count):
        length = sd.rng.randrange(1, 3 * BLOCK + 77)
        off = sd.rng.randrange(0, sd.size - length + 1)
        if i % 7 == 3:
            off = sd.size - length   # ends on the short last block
        out.append((off, sd.rng.randbytes(length)))
    out.append((min(out[0][0] + 1, sd.size - BLOCK), sd.rng.randbytes(BLOCK)))   # overlaps an earlier write of the same segment
    return out


async def test_overlapping_unaligned_writes_and_partial_zeros_give_the_image_bytes_digest(repo, tmp_path):
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=3)
    await sd.segment([(0, sd.rng.randbytes(DISK_BYTES))])            # the whole disk, last block included
    await sd.segment(messy_writes(sd, 20), zeros=[(BLOCK + 5, 3 * BLOCK), (10 * BLOCK, 2 * BLOCK)])
    sha = await sd.segment(messy_writes(sd, 20), "p1", zeros=[(sd.size - 1500, 1500)])
    [entry] = await repo.list_points(sd.disk_id)
    out = tmp_path / "out.img"
    result = await materialize(repo, entry, str(out))
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha == sd.sha256()
    assert result.image_digest == entry.image_digest == digest_of_bytes(data)
    with open(out, "rb") as f:
        assert image_digest_of(f.fileno(), DISK_BYTES, BLOCK) == result.image_digest   # the full re-read agrees
    # Partial blocks were read back, the rest came from the plaintext as it was written.
    assert 0 < result.reread_bytes < DISK_BYTES


async def test_frames_applied_out_of_order_are_reported(repo, tmp_path):
    """Two overlapping writes swapped in a validly sealed segment: every frame authenticates, only the
    image digest can tell that the last write did not win."""
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=4)
    first, second = (0, sd.rng.randbytes(4 * BLOCK)), (2 * BLOCK, sd.rng.randbytes(4 * BLOCK))
    await sd.segment([first, second], "p1")
    [entry] = await repo.list_points(sd.disk_id)
    bookmark = (await repo.read_segment(sd.disk_id, 1)).payload(entry.frame_index)
    frames = [Frame(FRAME_WRITE, off, len(d), d) for off, d in (second, first)] + [
        Frame(FRAME_BOOKMARK, 0, 0, bookmark)]
    header = SegmentHeader(sd.disk_id, 1, DISK_BYTES, len(frames))
    hb = header.encode()
    await repo.put_segment(sd.disk_id, 1, assemble_segment(
        repo.segment_key, header, [encode_record(repo.segment_key, hb, i, f) for i, f in enumerate(frames)]))
    with pytest.raises(PointIncomplete, match="differs from the digest the agent recorded"):
        await materialize(repo, entry, str(tmp_path / "out.img"))


async def test_checkpoint_base_then_overlapping_segments(repo, tmp_path):
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=5)
    await sd.segment([(0, sd.rng.randbytes(DISK_BYTES // 2))])
    await sd.segment(messy_writes(sd, 10), zeros=[(3 * BLOCK, 5 * BLOCK + 9)])
    await build_checkpoint(repo, sd.disk_id, 2, work_dir=str(tmp_path), chunk_bytes=64 * 1024)
    await sd.segment(messy_writes(sd, 10), "p1")
    [entry] = await repo.list_points(sd.disk_id)
    result = await materialize(repo, entry, str(tmp_path / "out.img"))
    data = (tmp_path / "out.img").read_bytes()
    assert result.checkpoint_seq == 2
    assert hashlib.sha256(data).hexdigest() == sd.sha256()
    assert result.image_digest == entry.image_digest == digest_of_bytes(data)
    assert result.reread_bytes < DISK_BYTES // 2


async def test_a_forged_checkpoint_chunk_is_reported(repo, tmp_path):
    """A chunk replaced by another well-formed, correctly sealed one (a key holder's mistake or attack):
    its own checks pass, the image digest does not."""
    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=6)
    await sd.segment([(0, sd.rng.randbytes(DISK_BYTES))])
    await build_checkpoint(repo, sd.disk_id, 1, work_dir=str(tmp_path), chunk_bytes=64 * 1024)
    await sd.segment([(5, b"x" * 100)], "p1")
    manifest = await read_manifest(repo, sd.disk_id, 1)
    index, cid = manifest.refs[1]
    name = ckfmt.chunk_name(sd.disk_id, cid)
    forged = bytearray(sd.image[index * 65536:(index + 1) * 65536])
    forged[777] ^= 1
    await repo.backend.put(name, ckfmt.seal_chunk(repo.checkpoint_key, name, index, index * 65536, bytes(forged)))
    [entry] = await repo.list_points(sd.disk_id)
    with pytest.raises(PointIncomplete, match="differs from the digest the agent recorded"):
        await materialize(repo, entry, str(tmp_path / "out.img"))


def test_image_digests_last_write_wins_against_a_reference_image(tmp_path):
    """ImageDigests alone, fed the same writes as a bytearray and a file: equal after every mix of full,
    partial, zero and past-the-end writes."""
    import random

    rng = random.Random(7)
    size, bs = 40 * 1024 + 123, 1024
    ref = bytearray(size)
    d = ImageDigests(size, bs, all_stale=False)
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        for _ in range(300):
            off = rng.randrange(0, size)
            length = rng.randrange(1, 5 * bs)
            if rng.random() < 0.3:
                ref[off:off + length] = bytes(min(length, size - off))
                os.pwrite(fd, bytes(min(length, size - off)), off)
                d.wrote(off, length, None, 0)
            else:
                data = rng.randbytes(length)   # may run past the end: the image keeps only its size
                ref[off:off + length] = data[: size - off]
                os.pwrite(fd, data[: size - off], off)
                d.wrote(off, length, *write_digests(data, off, bs))
        assert d.finish(fd) == digest_of_bytes(bytes(ref), bs)
    finally:
        os.close(fd)


def _require_loop_devices() -> None:
    if os.geteuid() == 0 and shutil.which("losetup") and os.path.exists("/dev/loop-control"):
        return
    if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":
        pytest.fail("this test needs root and loop devices", pytrace=False)
    pytest.skip("needs root and loop devices")


async def test_block_device_target_reads_back_blocks_nothing_wrote(repo, tmp_path):
    _require_loop_devices()
    size = 256 * 1024   # a loop device's size is a multiple of 512
    sd = SyntheticDisk(repo, "web01", "sda", size, block_size=BLOCK, seed=8)
    sd.image[:] = b"\xa5" * size   # the device's old contents, which writes do not cover everywhere
    await sd.segment(messy_writes(sd, 12), "p1", zeros=[(7 * BLOCK + 3, BLOCK)])
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xa5" * size)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        [entry] = await repo.list_points(sd.disk_id)
        result = await materialize(repo, entry, dev)
        with open(dev, "rb") as f:
            data = f.read(size)
        assert hashlib.sha256(data).hexdigest() == sd.sha256()
        assert result.image_digest == entry.image_digest == digest_of_bytes(data)
        assert result.reread_bytes > 0   # the untouched blocks (old data) were read, not assumed zero
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


async def test_cancelled_failover_stops_its_threads_and_removes_the_image(repo, tmp_path):
    """Cancelled after the first of many segments: the writer thread is out before the fd closes, the
    half-written image is gone, and a second failover of the same point is bit-exact."""
    import asyncio
    import threading

    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=9)
    for _ in range(11):
        await sd.segment(messy_writes(sd, 6))
    await sd.segment(messy_writes(sd, 6), "p1")
    [entry] = await repo.list_points(sd.disk_id)
    out = tmp_path / "out.img"
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 1:
            task.cancel()

    task = asyncio.ensure_future(materialize(repo, entry, str(out), progress=progress))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen and seen[0] == (1, 12)
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith(("lifeboat-write", "lifeboat-decode"))]
    result = await materialize(repo, entry, str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sd.sha256() and result.segments == 12


async def test_a_point_with_an_impossible_block_size_is_refused_clearly(repo, tmp_path):
    import dataclasses

    sd = SyntheticDisk(repo, "web01", "sda", DISK_BYTES, block_size=BLOCK, seed=10)
    await sd.segment(messy_writes(sd, 3), "p1")
    [entry] = await repo.list_points(sd.disk_id)
    for bad in (0, -4096, 1 << 30):
        with pytest.raises(PointIncomplete, match=f"digest block size {bad}, outside"):
            await materialize(repo, dataclasses.replace(entry, block_size=bad), str(tmp_path / "out.img"))
    assert not (tmp_path / "out.img").exists()
