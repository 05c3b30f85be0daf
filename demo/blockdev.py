"""Real block devices for tests and benchmarks: an ext4 loop device whose backing image lives on a reflink XFS."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class NeedsRoot(RuntimeError):
    pass


@dataclass
class TrackedDisk:
    device: str        # /dev/loopN holding ext4, mounted at `mountpoint`
    backing: Path      # its image file, on a reflink-capable XFS
    mountpoint: Path
    snapshot_dir: Path

    def clone_sha256(self, tag: str, disk_id: str) -> str:
        """SHA-256 of the reflink clone the agent kept for a point (the oracle)."""
        return sha256(self.snapshot_dir / f"{disk_id}.{tag}.snap")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def tracked_ext4(tmp: Path, size_mib: int = 128, xfs_mib: int = 2048, filesystem: bool = True):
    """ext4 on /dev/loopN (or, without `filesystem`, the raw device); its backing file on a
    loop-mounted XFS with reflink; all removed afterwards."""
    if os.geteuid() != 0:
        raise NeedsRoot("loop devices, mount and tracefs need root")
    xfs_img, xfs_mnt, mnt = tmp / "xfs.img", tmp / "xfs", tmp / "mnt"
    xfs_mnt.mkdir()
    mnt.mkdir()
    cleanup: list[list[str]] = []
    try:
        with open(xfs_img, "wb") as f:
            f.truncate(xfs_mib << 20)
        run("mkfs.xfs", "-q", "-m", "reflink=1", str(xfs_img))
        run("mount", "-o", "loop", str(xfs_img), str(xfs_mnt))
        cleanup.append(["umount", "-l", str(xfs_mnt)])
        backing = xfs_mnt / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(size_mib << 20)
        device = run("losetup", "-f", "--show", str(backing))
        cleanup.append(["losetup", "-d", device])
        if filesystem:
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", device)
            run("mount", device, str(mnt))
            cleanup.append(["umount", str(mnt)])
        snapshots = xfs_mnt / "snapshots"
        snapshots.mkdir()
        yield TrackedDisk(device, backing, mnt, snapshots)
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)  # never leave it frozen
        for cmd in reversed(cleanup):
            for _ in range(20):
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
                time.sleep(0.25)


WRITER = r'''
import os, random, sys, time
path, size, rate, seed, block = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
if os.fstat(fd).st_size < size:
    os.posix_fallocate(fd, 0, size)  # allocated up front: writes overwrite, the filesystem does not grow
pattern = rng.randbytes(1 << 20)
written, t0, n = 0, time.monotonic(), 0
while True:
    ahead = written - rate * (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(min(ahead / rate, 0.05))
        continue
    start = rng.randrange(len(pattern) - block)
    os.pwrite(fd, pattern[start:start + block], rng.randrange(size // block) * block)
    written += block
    n += 1
    if n % 64 == 0:
        os.fsync(fd)
'''


def start_writer(path: Path, size: int, bytes_per_second: float, seed: int, write_bytes: int = 4096) -> subprocess.Popen:
    """Random aligned writes into one file at about the given rate, fsync every 64 writes, until killed."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size), str(bytes_per_second), str(seed),
                             str(write_bytes)])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
