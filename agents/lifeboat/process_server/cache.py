"""Bounded on-disk batch cache: fsynced batch files per disk, acknowledged and uploaded sequence state."""

from __future__ import annotations

import json
import os
import re

from ..repository.repo import SEQ_DIGITS

BATCH_SUFFIX = ".batch"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "state.json"
_BATCH_RE = re.compile(r"^(\d{%d})\.batch$" % SEQ_DIGITS)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


class DiskCache:
    """Layout: <dir>/<disk_id>/<seq>.batch (complete, fsynced) and state.json (uploaded_through).

    A batch is acknowledged only after its file is complete, fsynced and renamed, so after any
    crash `acked_seq = max(uploaded_through, highest .batch)` and nothing acknowledged is lost.
    """

    def __init__(self, root: str, capacity_bytes: int, high_water_ratio: float) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.high_water_bytes = int(capacity_bytes * high_water_ratio)
        self.used_bytes = 0        # complete batch files
        self.reserved_bytes = 0    # bodies being received (their Content-Length)
        self._pending: dict[str, dict[int, int]] = {}   # disk -> {seq: size}
        self._uploaded: dict[str, int] = {}
        os.makedirs(root, exist_ok=True)

    def recover(self) -> dict[str, int]:
        """Scan after a (re)start: drop partial bodies, count complete batches. Returns disks' acked seqs."""
        for disk_id in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, disk_id)
            if not os.path.isdir(folder):
                continue
            self._pending.setdefault(disk_id, {})
            state = os.path.join(folder, STATE_FILE)
            if os.path.exists(state):
                with open(state) as f:
                    self._uploaded[disk_id] = int(json.load(f)["uploaded_through"])
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.endswith(PARTIAL_SUFFIX) or name.endswith(".tmp"):
                    os.unlink(path)  # never acknowledged: the sender still holds it
                    continue
                m = _BATCH_RE.match(name)
                if m:
                    seq = int(m.group(1))
                    if seq <= self._uploaded.get(disk_id, 0):
                        os.unlink(path)  # uploaded before the crash, deletion was lost
                        continue
                    size = os.stat(path).st_size
                    self._pending[disk_id][seq] = size
                    self.used_bytes += size
        return {d: self.acked_seq(d) for d in self._pending}

    def disks(self) -> list[str]:
        return sorted(self._pending)

    def acked_seq(self, disk_id: str) -> int:
        pending = self._pending.get(disk_id) or {}
        return max([self._uploaded.get(disk_id, 0), *pending])

    def uploaded_seq(self, disk_id: str) -> int:
        return self._uploaded.get(disk_id, 0)

    def known(self, disk_id: str) -> bool:
        return disk_id in self._pending

    def adopt(self, disk_id: str, uploaded_through: int) -> None:
        """Start tracking a disk whose log already holds segments up to uploaded_through."""
        folder = os.path.join(self.root, disk_id)
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, STATE_FILE), {"uploaded_through": uploaded_through})
        self._uploaded[disk_id] = uploaded_through
        self._pending.setdefault(disk_id, {})

    def pending(self, disk_id: str) -> list[int]:
        return sorted(self._pending.get(disk_id, {}))

    def backlog_bytes(self, disk_id: str | None = None) -> int:
        if disk_id:
            return sum(self._pending.get(disk_id, {}).values())
        return self.used_bytes

    @property
    def free_ratio(self) -> float:
        return max(0.0, 1 - (self.used_bytes + self.reserved_bytes) / self.capacity_bytes)

    def can_accept(self, nbytes: int) -> bool:
        return self.used_bytes + self.reserved_bytes + nbytes <= self.high_water_bytes

    def batch_path(self, disk_id: str, seq: int, partial: bool = False) -> str:
        return os.path.join(self.root, disk_id, f"{seq:0{SEQ_DIGITS}d}" + (PARTIAL_SUFFIX if partial else BATCH_SUFFIX))

    def open_partial(self, disk_id: str, seq: int) -> int:
        os.makedirs(os.path.join(self.root, disk_id), exist_ok=True)
        self._pending.setdefault(disk_id, {})
        return os.open(self.batch_path(disk_id, seq, True), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def commit(self, disk_id: str, seq: int, fd: int, size: int) -> None:
        """fsync, publish and count a fully received batch (called in a worker thread)."""
        self.sync_partial(fd)
        self.publish_partial(disk_id, seq)

    def sync_partial(self, fd: int) -> None:
        """fsync and close a fully received body; batches of one disk may sync in any order."""
        os.fsync(fd)
        os.close(fd)

    def publish_partial(self, disk_id: str, seq: int) -> None:
        """Rename a synced body to its batch name. In seq order only: recovery takes the highest
        batch file as acknowledged, so seq must not appear before seq - 1 is durable."""
        os.rename(self.batch_path(disk_id, seq, True), self.batch_path(disk_id, seq))
        fsync_dir(os.path.join(self.root, disk_id))

    def published(self, disk_id: str, seq: int, size: int) -> None:
        self._pending.setdefault(disk_id, {})[seq] = size
        self.used_bytes += size

    def discard_partial(self, disk_id: str, seq: int, fd: int | None) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.batch_path(disk_id, seq, True))
        except FileNotFoundError:
            pass

    def read_batch(self, disk_id: str, seq: int) -> bytes:
        with open(self.batch_path(disk_id, seq), "rb") as f:
            return f.read()

    def rewind(self, disk_id: str, uploaded_through: int) -> list[int]:
        """Drop every cached batch and continue after uploaded_through (the receiver went back); the dropped seqs."""
        dropped = self.pending(disk_id)
        write_json_atomic(os.path.join(self.root, disk_id, STATE_FILE), {"uploaded_through": uploaded_through})
        self._uploaded[disk_id] = uploaded_through
        for seq in dropped:
            self.used_bytes -= self._pending[disk_id].pop(seq)
            try:
                os.unlink(self.batch_path(disk_id, seq))
            except FileNotFoundError:
                pass
        return dropped

    def mark_uploaded(self, disk_id: str, seq: int) -> None:
        """Record durable upload of seq, then free its file (state first: a crash between is harmless)."""
        folder = os.path.join(self.root, disk_id)
        write_json_atomic(os.path.join(folder, STATE_FILE), {"uploaded_through": seq})
        self._uploaded[disk_id] = seq
        size = self._pending[disk_id].pop(seq, 0)
        self.used_bytes -= size
        try:
            os.unlink(self.batch_path(disk_id, seq))
        except FileNotFoundError:
            pass
