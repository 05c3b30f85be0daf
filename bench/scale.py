"""Suite rows beyond one disk: initial replication to Azurite against a plain blob upload, one
process server with 8 concurrent agents, and throughput with 1, 4 and 16 concurrent disks.

Each case starts its own process server (and, for Azure, a fresh in-memory Azurite: one reused
for long slows down, shared/PERF-LIMITS.md), and every replication is checked by SHA-256 of a
test failover of one of its points against the source image.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass

from .common import ROOT, Lab, MiB, agents_ready_wall
from .initial_replication import ProcSampler, scrape, sha256

# Azurite's fixed development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING_RE = re.compile(r"Blob service (?:is )?successfully listen\w* (?:on|at) http://127\.0\.0\.1:(\d+)")
PLAIN_UPLOAD_CONCURRENCY = 4   # the reference: azure-storage-blob upload_blob(max_concurrency=4)
POLL_SECONDS = 0.05
CACHE_BYTES = 4 << 30


class Azurite:
    """A fresh in-memory Azurite blob service on 127.0.0.1 (node_modules, as the tests use)."""

    def __init__(self, work: str) -> None:
        os.makedirs(work, exist_ok=True)
        binary = os.environ.get("LIFEBOAT_AZURITE") or os.path.join(ROOT, "node_modules", ".bin", "azurite-blob")
        if not os.access(binary, os.X_OK):
            binary = shutil.which("azurite-blob") or shutil.which("azurite") or ""
        if not binary:
            raise RuntimeError("Azurite not found: run ./scripts/setup (node_modules) or set LIFEBOAT_AZURITE")
        self.log = os.path.join(work, "azurite.log")
        args = [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--disableTelemetry",
                "--skipApiVersionCheck", "--silent", "--inMemoryPersistence"]
        if os.path.basename(binary) != "azurite-blob":
            args += ["--queuePort", "0", "--tablePort", "0"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.port = self._wait_port()
        self.connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                  f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};")

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Azurite exited with {self.proc.returncode}; see {self.log}")
            with open(self.log, errors="replace") as f:
                found = _LISTENING_RE.search(f.read())
            if found:
                try:
                    with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=1):
                        return int(found.group(1))
                except OSError:
                    pass
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"Azurite did not listen within 30 s; see {self.log}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def plain_upload_seconds(connection_string: str, image: str) -> float:
    """The reference: the raw image as one block blob, azure-storage-blob with max_concurrency 4."""
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection_string)
    container = service.create_container(f"plain-{uuid.uuid4().hex[:8]}")
    size = os.path.getsize(image)
    t = time.monotonic()
    with open(image, "rb") as f:
        container.get_blob_client("image.raw").upload_blob(f, length=size, overwrite=True,
                                                             max_concurrency=PLAIN_UPLOAD_CONCURRENCY)
    seconds = time.monotonic() - t
    service.close()
    return seconds


@dataclass
class Run:
    seconds: float        # the first agent ready (READY=1) → the process server published one point per disk
    ps_hwm_mib: float     # process server peak RSS (VmHWM) over the run
    agent_hwm_mib: float  # the largest agent peak RSS


def _start_ps(lab: Lab, work: str) -> None:
    lab.start_ps({"cache": {"dir": os.path.join(work, "cache"), "max_bytes": CACHE_BYTES}})
    deadline = time.monotonic() + 30
    while True:  # the metrics listener may come up just after the ingest port
        try:
            scrape(lab.ps_metrics_port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def replicate(lab: Lab, agents: dict[str, dict[str, str]], timeout: float) -> Run:
    """Start one `lifeboat-mobility --cycles 1` per machine at once ({machine: {disk: path}}) and wait
    until every disk has a published point and every agent has exited 0."""
    want = sum(len(d) for d in agents.values())
    before = scrape(lab.ps_metrics_port).get("lifeboat_ps_points_published_total", 0.0)
    ps = ProcSampler("process server", lab.ps_proc.pid)
    t0, wall0 = time.monotonic(), time.time()
    procs = {m: lab.start_agent(m, disks, cycles=1) for m, disks in agents.items()}
    samplers = {m: ProcSampler(m, p.pid) for m, p in procs.items()}
    peaks = {m: 0.0 for m in procs}
    running = dict(procs)
    t_points = None
    while running or t_points is None:
        ps.sample()
        for m, p in list(running.items()):
            samplers[m].sample()
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                peaks[m] = samplers[m].hwm_kib / 1024   # not ru_maxrss: see replication.py
                del running[m]
                if p.returncode != 0:
                    raise RuntimeError(f"agent {m} exited with {p.returncode}; see {lab.log_path}")
        if lab.ps_proc.poll() is not None:
            raise RuntimeError(f"process server exited with {lab.ps_proc.returncode}; see {lab.log_path}")
        if t_points is None:
            published = scrape(lab.ps_metrics_port).get("lifeboat_ps_points_published_total", 0.0)
            if published - before >= want:
                t_points = time.monotonic()
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"not every disk had a point after {timeout:.0f} s; see {lab.log_path}")
        time.sleep(POLL_SECONDS)
    ps.sample()
    # Timed from the first READY=1, as the single-agent rows: start-up is not replication (bench/common.py).
    first_ready = min(agents_ready_wall(lab, set(agents), wall0 - 0.01).values()) - wall0
    return Run(t_points - t0 - first_ready, ps.hwm_kib / 1024, max(peaks.values()))


def check_one(lab: Lab, work: str, source_sha: str, machine: str, disk: str) -> None:
    """Test-fail-over the newest point of machine's disk and compare SHA-256 with the source."""
    target = os.path.join(work, f"check-{machine}-{disk}.img")
    res = lab.cli("failover", "--test", "--point", "latest", "--machine", machine, "--disk", disk, "--to", target, "-q")
    if res.returncode != 0:
        raise RuntimeError(f"lifeboat failover of {machine}/{disk} exited with {res.returncode}: "
                           f"{res.stderr.strip()[-2000:]}")
    try:
        if sha256(target) != source_sha:
            raise RuntimeError(f"{machine}/{disk}: the recovered image differs from the source")
    finally:
        os.unlink(target)


def azure_vs_plain(work: str, image: str, timeout: float) -> tuple[float, float]:
    """(Lifeboat seconds to a durable point in Azurite, plain upload seconds), each on a fresh Azurite."""
    az = Azurite(os.path.join(work, "azurite-lb"))
    try:
        lab = Lab(os.path.join(work, "lab-azure"), repo_url=f"azure://lb-{uuid.uuid4().hex[:8]}",
                  azure_connection_string=az.connection_string)
        try:
            _start_ps(lab, work)
            run = replicate(lab, {"bench": {"disk0": image}}, timeout)
            check_one(lab, work, sha256(image), "bench", "disk0")
        finally:
            lab.close()
    finally:
        az.close()
    az = Azurite(os.path.join(work, "azurite-plain"))
    try:
        plain = plain_upload_seconds(az.connection_string, image)
    finally:
        az.close()
    return run.seconds, plain


def many_agents(work: str, image: str, agents: int, timeout: float) -> Run:
    """One process server, `agents` machines replicating one disk each at once (the same image file)."""
    lab = Lab(os.path.join(work, "lab-agents"))
    try:
        _start_ps(lab, work)
        run = replicate(lab, {f"m{i:02d}": {"disk0": image} for i in range(agents)}, timeout)
        check_one(lab, work, sha256(image), f"m{agents - 1:02d}", "disk0")  # one of them, bit for bit
        return run
    finally:
        lab.close()


def disks_scaling(work: str, image: str, counts: tuple[int, ...], timeout: float) -> dict[int, float]:
    """Seconds for one agent replicating n disks at once, for each n: the image cut into n pieces
    (one disk each), so every case moves the same bytes."""
    size = os.path.getsize(image)
    out = {}
    for n in counts:
        case = os.path.join(work, f"disks-{n}")
        os.makedirs(case, exist_ok=True)
        piece = size // n // MiB * MiB
        paths = {}
        with open(image, "rb") as src:
            for i in range(n):  # copied now: each disk is in the page cache, as in the other rows
                paths[f"d{i:02d}"] = os.path.join(case, f"d{i:02d}.img")
                with open(paths[f"d{i:02d}"], "wb") as dst:
                    dst.write(src.read(piece))
        lab = Lab(os.path.join(case, "lab"))
        try:
            _start_ps(lab, case)
            out[n] = replicate(lab, {"bench": paths}, timeout).seconds
            last = f"d{n - 1:02d}"
            check_one(lab, case, sha256(paths[last]), "bench", last)
        finally:
            lab.close()
            shutil.rmtree(case, ignore_errors=True)
    return out
