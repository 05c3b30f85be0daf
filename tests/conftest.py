"""Fixtures shared by every test: the Azurite emulator for the Azure backend."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Azurite's fixed development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_START_TIMEOUT_SECONDS = 30.0
AZURITE_STOP_TIMEOUT_SECONDS = 10.0
# "Azurite Blob service successfully listens on http://127.0.0.1:36837" (azurite-blob) or
# "... is successfully listening at http://..." (azurite): the port it bound for --blobPort 0.
_LISTENING_RE = re.compile(r"Blob service (?:is )?successfully listen\w* (?:on|at) http://127\.0\.0\.1:(\d+)")


def _require(what: str) -> bool:
    return os.environ.get(f"LIFEBOAT_REQUIRE_{what}") == "1"


def _skip_or_fail(what: str, reason: str) -> None:
    """Skip, unless CI set LIFEBOAT_REQUIRE_<what>=1 to forbid the skip (restic's SkipDisallowed)."""
    if _require(what):
        pytest.fail(f"{reason} (LIFEBOAT_REQUIRE_{what}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def find_azurite() -> str | None:
    """$LIFEBOAT_AZURITE, else node_modules/.bin/azurite in the repo root, else azurite on PATH.

    The blob-only launcher next to it (azurite-blob) is preferred: it does not open the queue and
    table ports.
    """
    configured = os.environ.get("LIFEBOAT_AZURITE")
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"LIFEBOAT_AZURITE={configured} is not an executable file", pytrace=False)
        candidate = configured
    else:
        local = REPO_ROOT / "node_modules" / ".bin" / "azurite"
        candidate = str(local) if os.access(local, os.X_OK) else shutil.which("azurite")
    if candidate is None:
        return None
    blob_only = Path(candidate).with_name("azurite-blob")
    if Path(candidate).name == "azurite" and os.access(blob_only, os.X_OK):
        return str(blob_only)
    return candidate


def _wait_for_port(proc: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + AZURITE_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        found = _LISTENING_RE.search(log.read_text(errors="replace"))
        if found:
            port = int(found.group(1))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return port
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"no listening blob port after {AZURITE_START_TIMEOUT_SECONDS:.0f} s")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Azurite blob service on 127.0.0.1 for the whole session; yields its connection string."""
    binary = find_azurite()
    if binary is None:
        _skip_or_fail("AZURITE", "Azurite not found: run ./scripts/setup, or set LIFEBOAT_AZURITE")
    workdir = tmp_path_factory.mktemp("azurite")
    log = workdir / "azurite.log"
    # Port 0 lets the kernel pick a free port (no race with other runs); Azurite prints the one it got.
    args = [binary, "--blobHost", "127.0.0.1", "--blobPort", "0",
            "--disableTelemetry", "--skipApiVersionCheck", "--silent", "--inMemoryPersistence"]
    if Path(binary).name != "azurite-blob":
        args += ["--queuePort", "0", "--tablePort", "0"]
    # --location cannot be combined with --inMemoryPersistence: the temp dir is the cwd instead.
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            port = _wait_for_port(proc, log)
        except RuntimeError as exc:
            pytest.fail(f"Azurite ({binary}) did not start: {exc}; its output:\n{log.read_text(errors='replace')}",
                        pytrace=False)
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=AZURITE_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
