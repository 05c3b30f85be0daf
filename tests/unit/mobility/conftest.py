"""Loop devices, filesystems and mounts for the mobility tests; always thawed, unmounted and detached."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = ("losetup", "mount", "umount", "fsfreeze", "mkfs.ext4", "mkfs.xfs", "sfdisk", "partx")
UDEV_WAIT_SECONDS = 5.0


def _sh(*argv: str, input: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=input, timeout=60).stdout


def _quiet(*argv: str) -> int:
    return subprocess.run(argv, capture_output=True, timeout=60).returncode


@dataclass
class Disk:
    image: Path          # the image file behind the loop device
    device: str          # /dev/loopN
    mountpoint: str      # where its filesystem (or its first partition's) is mounted


class LoopLab:
    """Makes images, loop devices, filesystems and mounts; close() undoes everything in reverse."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def image(self, name: str, size: int, folder: Path | None = None) -> Path:
        path = (folder or self.root) / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def attach(self, image: Path, partitions: bool = False) -> str:
        dev = _sh("losetup", "--find", "--show", str(image)).strip()
        self._stack.callback(_quiet, "losetup", "-d", dev)
        if partitions:
            # `losetup -P` does not create the partitions here; partx -a does (see ARCHITECTURE.md).
            _sh("partx", "-a", dev)
            self._stack.callback(_quiet, "partx", "-d", dev)
            deadline = time.monotonic() + UDEV_WAIT_SECONDS
            while not os.path.exists(f"{dev}p1") and time.monotonic() < deadline:
                time.sleep(0.05)
        return dev

    def mkfs(self, dev: str, kind: str) -> None:
        if kind == "ext4":
            _sh("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        elif kind == "xfs-reflink":
            _sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev)
        else:
            raise ValueError(kind)

    def mount(self, dev: str, mountpoint: Path, *options: str) -> str:
        mountpoint.mkdir(parents=True, exist_ok=True)
        _sh("mount", *options, dev, str(mountpoint))
        self._stack.callback(self._unmount, str(mountpoint))
        return str(mountpoint)

    def bind(self, source: str, mountpoint: Path) -> str:
        return self.mount(source, mountpoint, "--bind")

    @staticmethod
    def _unmount(mountpoint: str) -> None:
        # Thaw first: a frozen filesystem left behind would block every later writer for good.
        _quiet("fsfreeze", "-u", mountpoint)
        for _ in range(20):
            if _quiet("umount", mountpoint) == 0:
                return
            time.sleep(0.1)
        _quiet("umount", "-l", mountpoint)

    def ext4_disk(self, name: str, size: int = 64 << 20, folder: Path | None = None) -> Disk:
        image = self.image(f"{name}.img", size, folder)
        dev = self.attach(image)
        self.mkfs(dev, "ext4")
        return Disk(image, dev, self.mount(dev, self.root / f"{name}.mnt"))

    def partitioned_ext4_disk(self, name: str, size: int = 64 << 20) -> Disk:
        image = self.image(f"{name}.img", size)
        # One Linux partition from 1 MiB, 32 MiB long (sizes in 512-byte sectors).
        _sh("sfdisk", "--quiet", str(image), input="label: dos\n2048,65536,L\n")
        dev = self.attach(image, partitions=True)
        self.mkfs(f"{dev}p1", "ext4")
        return Disk(image, dev, self.mount(f"{dev}p1", self.root / f"{name}.mnt"))


def _needs_root_and_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0 or missing or not os.path.exists("/dev/loop-control"):
        reason = f"needs root, /dev/loop-control and {', '.join(missing) or 'the block tools'}"
        if os.environ.get("LIFEBOAT_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(f"{reason} (LIFEBOAT_REQUIRE_ROOT_TESTS=1 forbids skipping)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def loop_lab(tmp_path: Path) -> Iterator[LoopLab]:
    """A LoopLab rooted in tmp_path; everything it made is thawed, unmounted and detached afterwards."""
    _needs_root_and_tools()
    lab = LoopLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def ext4_disk(loop_lab: LoopLab) -> Disk:
    """A mounted 64 MiB ext4 on a loop device (image under tmp_path, which is ext4: no reflink)."""
    return loop_lab.ext4_disk("disk")


@pytest.fixture
def xfs_reflink(loop_lab: LoopLab) -> Path:
    """A mounted XFS with reflink=1 from a sparse 512 MiB file: where FICLONE works on these machines."""
    image = loop_lab.image("xfs.img", 512 << 20)
    dev = loop_lab.attach(image)
    loop_lab.mkfs(dev, "xfs-reflink")
    return Path(loop_lab.mount(dev, loop_lab.root / "xfs.mnt"))
