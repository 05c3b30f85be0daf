"""A small loop-mounted ext4 filesystem, so that a directory on it fills up for real (ENOSPC)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class SmallFilesystem:
    """mkfs.ext4 on a sparse file of `size_mib`, mounted with -o loop at `mountpoint` (root only)."""

    def __init__(self, backing: Path, mountpoint: Path, size_mib: int) -> None:
        self.backing, self.mountpoint = Path(backing), Path(mountpoint)
        with open(self.backing, "wb") as f:
            f.truncate(size_mib << 20)
        # No reserved blocks and no journal: the whole size is usable, so "full" means what it says.
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(self.backing))
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "loop", str(self.backing), str(self.mountpoint))
        self.mounted = True

    def free_bytes(self) -> int:
        st = os.statvfs(self.mountpoint)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        if self.mounted:
            # -d frees the loop device as well
            subprocess.run(["umount", "-d", str(self.mountpoint)], capture_output=True)
            self.mounted = False
