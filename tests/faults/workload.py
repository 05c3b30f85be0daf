"""Seeded guest writes to an image file, paused through the demo's ctl files while a point is taken."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

WRITE_SIZES = (4096, 16384, 65536)
WRITE_GAP_SECONDS = 0.01  # ~100 writes/s: every cycle has a delta, and deltas stay small


class Writer:
    """The in-process twin of demo/writer.py: same ctl protocol (pause → paused; stop), seeded content."""

    def __init__(self, image: Path, ctl: Path, seed: int) -> None:
        self.image, self.ctl = Path(image), Path(ctl)
        self.ctl.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-writer", daemon=True)

    def start(self) -> "Writer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        pause, paused = self.ctl / "pause", self.ctl / "paused"
        fd = os.open(self.image, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            while not self._stop.is_set():
                if pause.exists():
                    paused.touch()
                    while pause.exists() and not self._stop.is_set():
                        time.sleep(0.005)
                    paused.unlink(missing_ok=True)
                    continue
                n = self.rng.choice(WRITE_SIZES)
                off = self.rng.randrange(0, size - n) // 4096 * 4096
                os.pwrite(fd, self.rng.randbytes(n) if self.rng.random() < 0.7 else bytes(n), off)
                self.writes += 1
                time.sleep(WRITE_GAP_SECONDS)
        finally:
            os.close(fd)
