"""An Azurite blob service with its own --location dir, so that a stop and restart keeps its data."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
# Azurite's fixed development account key (public, documented by Microsoft; not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
_LISTENING_RE = re.compile(r"Blob service (?:is )?successfully listen\w* (?:on|at) http://127\.0\.0\.1:(\d+)")


def find_azurite() -> str | None:
    """$LIFEBOAT_AZURITE, node_modules/.bin/azurite-blob (or azurite) in the repo root, or azurite on PATH."""
    configured = os.environ.get("LIFEBOAT_AZURITE")
    candidates = [configured] if configured else [str(REPO_ROOT / "node_modules" / ".bin" / "azurite")]
    candidates.append(shutil.which("azurite") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            blob_only = Path(candidate).with_name("azurite-blob")
            return str(blob_only) if os.access(blob_only, os.X_OK) else candidate
    return None


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


class Azurite:
    """start() picks a free port (--blobPort 0) and persists to `location`; stop() is a SIGTERM."""

    def __init__(self, location: Path) -> None:
        self.binary = find_azurite()
        if self.binary is None:
            raise RuntimeError("Azurite not found: run ./scripts/setup, or set LIFEBOAT_AZURITE")
        self.location = Path(location)
        self.location.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> int:
        self.starts += 1
        log = self.location / f"azurite-{self.starts}.log"
        args = [self.binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(self.location),
                "--disableTelemetry", "--skipApiVersionCheck", "--silent"]
        if Path(self.binary).name != "azurite-blob":
            args += ["--queuePort", "0", "--tablePort", "0"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=self.location, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Azurite exited with {self.proc.returncode}: {log.read_text(errors='replace')}")
            found = _LISTENING_RE.search(log.read_text(errors="replace"))
            if found:
                try:
                    with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=1):
                        self.port = int(found.group(1))
                        return self.port
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Azurite listened on no port after {START_TIMEOUT_SECONDS:.0f} s; see {log}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
