"""Snapshot providers (mobility/snapshot.py): reflink on a real XFS, freeze-copy, none, lvm via a fake runner."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from lifeboat.mobility.freeze import Frozen
from lifeboat.mobility.snapshot import (
    FreezeCopyProvider,
    LvmProvider,
    NoneProvider,
    ReflinkProvider,
    SnapshotError,
    SnapshotTooLarge,
    backing_file,
    make_provider,
)

BS = 4096
MIB = 1 << 20


def snapshot_sha256(snap, size: int) -> str:
    h, buf = hashlib.sha256(), bytearray(MIB)
    for offset in range(0, size, MIB):
        view = memoryview(buf)[:min(MIB, size - offset)]
        assert snap.readinto(view, offset) == len(view)
        h.update(view)
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def fill(path: str, size: int, byte: bytes) -> None:
    """Write size bytes of `byte` to a new file on a filesystem that is *not* frozen, and fsync."""
    with open(path, "wb") as f:
        f.write(byte * size)
        f.flush()
        os.fsync(f.fileno())


def patterned_image(path: Path, blocks: int) -> None:
    """Block i holds the byte i % 251 (a different value per block, none zero for i > 0)."""
    with open(path, "wb") as f:
        for i in range(blocks):
            f.write(bytes([i % 251]) * BS)


# -- reflink -------------------------------------------------------------------------------------

def test_reflink_clone_taken_while_frozen_is_the_image_as_it_was(loop_lab, xfs_reflink):
    disk = loop_lab.ext4_disk("guest", folder=xfs_reflink)
    fill(os.path.join(disk.mountpoint, "before"), 4 * MIB, b"a")
    provider = ReflinkProvider()
    with Frozen([disk.mountpoint], timeout=30):
        snap = provider.create("web01-root", disk.device, "c1", [], BS)
        expected = file_sha256(disk.image)   # reading the image while frozen: nothing can change it
    size = disk.image.stat().st_size
    clone = xfs_reflink / ".lifeboat-snapshots" / "web01-root.c1.snap"
    assert snap.path == str(clone) and clone.exists()
    assert (snap.provider, snap.consistent) == ("reflink", True)
    assert oct(clone.stat().st_mode & 0o777) == "0o600"
    fill(os.path.join(disk.mountpoint, "after"), 8 * MIB, b"b")
    os.sync()
    assert file_sha256(disk.image) != expected
    assert snapshot_sha256(snap, size) == expected
    snap.drop()
    snap.drop()   # idempotent
    assert not clone.exists()
    with pytest.raises(SnapshotError, match="dropped"):
        snap.readinto(memoryview(bytearray(BS)), 0)


def test_reflink_keep_leaves_the_most_recent_clones(loop_lab, xfs_reflink):
    disk = loop_lab.ext4_disk("guest", folder=xfs_reflink)
    folder = xfs_reflink / "kept"
    provider = ReflinkProvider(dir=str(folder), keep=2)
    for tag in ("t1", "t2", "t3"):
        provider.create("d1", disk.device, tag, [], BS).drop()
    assert sorted(p.name for p in folder.iterdir()) == ["d1.t2.snap", "d1.t3.snap"]
    # Another disk's clones are not counted against, nor deleted for, this one.
    provider.create("d2", str(disk.image), "t9", [], BS).drop()
    assert sorted(p.name for p in folder.iterdir()) == ["d1.t2.snap", "d1.t3.snap", "d2.t9.snap"]
    assert file_sha256(folder / "d1.t3.snap") == file_sha256(disk.image)


def test_reflink_on_ext4_fails_naming_the_filesystem(tmp_path):
    image = tmp_path / "disk.img"
    patterned_image(image, 16)
    with pytest.raises(SnapshotError, match=r"at /\S* \(ext4\) cannot reflink") as info:
        ReflinkProvider(dir=str(tmp_path / "snaps")).create("d1", str(image), "t1", [], BS)
    assert "XFS" in str(info.value)
    assert list((tmp_path / "snaps").iterdir()) == []   # no empty clone left behind


def test_reflink_without_a_backing_file_fails():
    with pytest.raises(SnapshotError, match="no backing image file"):
        ReflinkProvider().create("d1", "/dev/null", "t1", [], BS)


def test_tags_are_checked(tmp_path):
    image = tmp_path / "disk.img"
    patterned_image(image, 1)
    for tag in ("../x", "-rf", "a b", ""):
        with pytest.raises(SnapshotError, match="tag"):
            ReflinkProvider(dir=str(tmp_path)).create("d1", str(image), tag, [], BS)


def test_backing_file(loop_lab, tmp_path):
    image = loop_lab.image("b.img", 8 * MIB)
    dev = loop_lab.attach(image)
    assert backing_file(dev) == str(image)
    assert backing_file(str(image)) == str(image)
    assert backing_file("/dev/null") is None
    assert backing_file(str(tmp_path / "missing")) is None
    parted = loop_lab.partitioned_ext4_disk("parted")
    assert backing_file(parted.device) == str(parted.image)
    assert backing_file(f"{parted.device}p1") is None   # cloning the whole image is not the partition


# -- freeze-copy and none ------------------------------------------------------------------------

def test_freeze_copy_serves_the_copied_ranges_as_they_were(loop_lab):
    image = loop_lab.root / "fc.img"
    patterned_image(image, 64)
    dev = loop_lab.attach(image)
    ranges = [(10, 2), (3, 1), (11, 3), (63, 5)]   # unsorted, overlapping, past the end
    snap = FreezeCopyProvider(max_bytes=6 * BS).create("d1", dev, "t1", ranges, BS)
    assert (snap.provider, snap.consistent, snap.nbytes) == ("freeze-copy", True, 6 * BS)
    with open(dev, "r+b") as f:   # the live device changes after the copy
        f.write(b"\xff" * 64 * BS)
    view = memoryview(bytearray(4 * BS))
    assert snap.readinto(view, 10 * BS) == 4 * BS
    assert bytes(view) == b"".join(bytes([i]) * BS for i in (10, 11, 12, 13))
    assert snap.readinto(view[:100], 3 * BS + 7) == 100 and bytes(view[:100]) == bytes([3]) * 100
    assert snap.readinto(view[:BS], 63 * BS) == BS and bytes(view[:BS]) == bytes([63]) * BS
    for offset, length in ((0, BS), (4 * BS, BS), (13 * BS, 2 * BS), (3 * BS, 2 * BS)):
        with pytest.raises(SnapshotError, match="outside the extents copied"):
            snap.readinto(view[:length], offset)
    snap.drop()
    snap.drop()
    with pytest.raises(SnapshotError, match="dropped"):
        snap.readinto(view, 10 * BS)


def test_freeze_copy_over_its_bound_copies_nothing(tmp_path):
    image = tmp_path / "fc.img"
    patterned_image(image, 64)
    with pytest.raises(SnapshotTooLarge, match="24576 dirty bytes, over the freeze-copy bound of 20480; nothing was copied"):
        FreezeCopyProvider(max_bytes=5 * BS).create("d1", str(image), "t1", [(0, 4), (40, 2)], BS)


def test_none_provider_reads_the_live_device(loop_lab):
    image = loop_lab.root / "live.img"
    patterned_image(image, 16)
    dev = loop_lab.attach(image)
    snap = NoneProvider().create("d1", dev, "t1", [(0, 16)], BS)
    assert (snap.provider, snap.consistent) == ("none", False)
    view = memoryview(bytearray(BS))
    snap.readinto(view, 5 * BS)
    assert bytes(view) == bytes([5]) * BS
    with open(dev, "r+b") as f:
        f.seek(5 * BS)
        f.write(b"\xee" * BS)
    snap.readinto(view, 5 * BS)
    assert bytes(view) == b"\xee" * BS
    snap.drop()


def _physical_block(path: str) -> int:
    """First physical filesystem block of a file (filefrag -v, 4 KiB ext4 blocks)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", path], check=True, capture_output=True, text=True).stdout
    extent = next(line for line in out.splitlines() if line.strip().startswith("0:"))
    return int(extent.split()[3].rstrip("."))


@pytest.mark.parametrize("provider", [FreezeCopyProvider(max_bytes=MIB), NoneProvider()], ids=["freeze-copy", "none"])
def test_device_reads_are_not_served_from_a_stale_page_cache(ext4_disk, provider):
    # ext4 writes file data around the block device's page cache: a plain buffered read of the
    # device would still return the old bytes cached by an earlier read.
    path = os.path.join(ext4_disk.mountpoint, "f")
    fill(path, 16 * BS, b"A")
    block = _physical_block(path)
    fd = os.open(ext4_disk.device, os.O_RDONLY)
    try:
        assert os.pread(fd, 4, block * BS) == b"AAAA"    # now cached
        with open(path, "r+b") as f:
            f.write(b"B" * 16 * BS)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    with Frozen([ext4_disk.mountpoint], timeout=30):
        snap = provider.create("d1", ext4_disk.device, "t1", [(block, 16)], BS)
    view = memoryview(bytearray(16 * BS))
    assert snap.readinto(view, block * BS) == 16 * BS
    assert bytes(view) == b"B" * 16 * BS
    snap.drop()


# -- lvm -----------------------------------------------------------------------------------------

class FakeRunner:
    """Records command lines; answers from a table of (argv[0], ...) prefixes."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        code, out, err = self.answers.get(argv[0], (0, "", ""))
        return subprocess.CompletedProcess(argv, code, out, err)


def test_lvm_classic_snapshot_command_lines_and_reads(tmp_path):
    run = FakeRunner({"lvs": (0, "  vg0   root   linear\n", "")})
    (tmp_path / "vg0").mkdir()
    patterned_image(tmp_path / "vg0" / "root-lifeboat-c7", 4)   # stands in for the snapshot's device node
    provider = LvmProvider(size="5%ORIGIN", run=run, dev_dir=str(tmp_path))
    snap = provider.create("d1", "/dev/mapper/vg0-root", "c7", [], BS)
    assert run.calls == [
        ["lvs", "--noheadings", "-o", "vg_name,lv_name,segtype", "/dev/mapper/vg0-root"],
        ["lvcreate", "--snapshot", "--name", "root-lifeboat-c7", "--extents", "5%ORIGIN", "vg0/root"],
    ]
    assert (snap.provider, snap.consistent, snap.path) == ("lvm", True, str(tmp_path / "vg0" / "root-lifeboat-c7"))
    view = memoryview(bytearray(BS))
    assert snap.readinto(view, 2 * BS) == BS and bytes(view) == bytes([2]) * BS
    snap.drop()
    snap.drop()
    assert run.calls[2:] == [["lvremove", "-f", "vg0/root-lifeboat-c7"]]


def test_lvm_default_size_and_real_dev_path():
    run = FakeRunner({"lvs": (0, "vg0 root linear", "")})
    snap = LvmProvider(run=run).create("d1", "/dev/vg0/root", "c1", [], BS)
    assert run.calls[1][-3:] == ["--extents", "10%ORIGIN", "vg0/root"]
    assert snap.path == "/dev/vg0/root-lifeboat-c1"
    with pytest.raises(SnapshotError, match="cannot open snapshot /dev/vg0/root-lifeboat-c1"):
        snap.readinto(memoryview(bytearray(BS)), 0)


def test_lvm_thin_snapshot_is_activated():
    run = FakeRunner({"lvs": (0, "  vg1 data thin\n", "")})
    snap = LvmProvider(run=run).create("d1", "/dev/vg1/data", "c2", [], BS)
    assert run.calls[1:] == [
        ["lvcreate", "--snapshot", "--name", "data-lifeboat-c2", "--setactivationskip", "n", "vg1/data"],
        ["lvchange", "-ay", "-K", "vg1/data-lifeboat-c2"],
    ]
    snap.drop()
    assert run.calls[-1] == ["lvremove", "-f", "vg1/data-lifeboat-c2"]


def test_lvm_failures_carry_stderr_and_clean_up():
    run = FakeRunner({"lvs": (0, "vg0 root linear", ""),
                      "lvcreate": (5, "", "  Insufficient free space: 256 extents needed\n")})
    with pytest.raises(SnapshotError, match="Insufficient free space: 256 extents needed") as info:
        LvmProvider(run=run).create("d1", "/dev/vg0/root", "c3", [], BS)
    assert "no snapshot was made" in str(info.value)

    run = FakeRunner({"lvs": (0, "vg1 data thin", ""), "lvchange": (5, "", "activation failed")})
    with pytest.raises(SnapshotError, match="activation failed"):
        LvmProvider(run=run).create("d1", "/dev/vg1/data", "c4", [], BS)
    assert run.calls[-1] == ["lvremove", "-f", "vg1/data-lifeboat-c4"]   # no half-made snapshot left

    run = FakeRunner({"lvs": (5, "", "  Failed to find logical volume \"sda\"")})
    with pytest.raises(SnapshotError, match="cannot resolve /dev/sda to an LVM volume"):
        LvmProvider(run=run).create("d1", "/dev/sda", "c5", [], BS)

    run = FakeRunner({"lvs": (0, "vg0 root", "")})
    with pytest.raises(SnapshotError, match="not 'vg lv segtype'"):
        LvmProvider(run=run).create("d1", "/dev/vg0/root", "c6", [], BS)

    run = FakeRunner({"lvs": (0, "vg0 root linear", ""), "lvremove": (5, "", "Logical volume in use")})
    snap = LvmProvider(run=run).create("d1", "/dev/vg0/root", "c7", [], BS)
    with pytest.raises(SnapshotError, match="in use.*lvremove -f vg0/root-lifeboat-c7"):
        snap.drop()


# -- factory -------------------------------------------------------------------------------------

def test_make_provider():
    assert isinstance(make_provider("reflink", keep=3), ReflinkProvider)
    assert make_provider("reflink", keep=3).keep == 3
    assert isinstance(make_provider("lvm"), LvmProvider)
    assert make_provider("freeze-copy", max_bytes=10).max_bytes == 10
    assert make_provider("none").name == "none"
    with pytest.raises(ValueError, match="reflink, lvm, freeze-copy, none"):
        make_provider("zfs")
