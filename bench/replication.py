"""Lifeboat's side of the suite: initial replication, test failover and delta, through real daemons.

Uses demo/lab.py (lifeboat init, a process server writing to a local-directory repository, an agent
on 127.0.0.1) and bench/initial_replication.py's samplers and /metrics scraper.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass

from .common import MiB, Lab, agents_ready_wall
from .initial_replication import ProcSampler, scrape, sha256

POLL_SECONDS = 0.05
MACHINE = "bench"
DISK = "disk0"


@dataclass
class Replication:
    lab: Lab
    seconds: float          # agent ready (READY=1) → lifeboat_ps_points_published_total reaches 1
    agent_seconds: float    # agent ready → agent exit (every batch acknowledged)
    startup_seconds: float  # agent process start → agent ready (imports, TLS, reconcile with the PS)
    ps_hwm_mib: float       # process server VmHWM after the run
    agent_hwm_mib: float    # agent peak RSS (VmHWM samples)
    stored_bytes: float     # lifeboat_ps_upload_stored_bytes_total


def _published(lab: Lab) -> float:
    return scrape(lab.ps_metrics_port).get("lifeboat_ps_points_published_total", 0.0)


def _run_agent_until_point(lab: Lab, image: str, timeout: float, before: float):
    """Start `lifeboat-mobility --cycles 1` and poll until the process server publishes one more
    point. Returns (start monotonic, seconds to the point, seconds to the agent's exit, agent peak
    RSS MiB, last metrics, seconds from the start to 'agent ready'), all from the process start."""
    t0, wall0 = time.monotonic(), time.time()
    agent = lab.start_agent(MACHINE, {DISK: image}, cycles=1)
    ag_s = ProcSampler("agent", agent.pid)
    ps_s = ProcSampler("process server", lab.ps_proc.pid)
    t_point = t_exit = None
    ru = None
    metrics: dict = {}
    deadline = t0 + timeout
    while t_point is None or ru is None:
        ps_s.sample()
        if ru is None:
            ag_s.sample()
            pid, status, r = os.wait4(agent.pid, os.WNOHANG)
            if pid:
                t_exit, ru = time.monotonic(), r
                agent.returncode = os.waitstatus_to_exitcode(status)
                if agent.returncode != 0:
                    raise RuntimeError(f"agent exited with {agent.returncode}; see {lab.log_path}")
        if lab.ps_proc.poll() is not None:
            raise RuntimeError(f"process server exited with {lab.ps_proc.returncode}; see {lab.log_path}")
        if t_point is None:
            metrics = scrape(lab.ps_metrics_port)
            if metrics.get("lifeboat_ps_points_published_total", 0) > before:
                t_point = time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no point after {timeout:.0f} s; see {lab.log_path}")
        time.sleep(POLL_SECONDS)
    # VmHWM of the agent's own address space, sampled every 50 ms. Not ru_maxrss: Linux folds the
    # forked copy of the parent (this bench process) into it at exec, so it reports the bench's RSS.
    agent_hwm = ag_s.hwm_kib / 1024
    startup = agents_ready_wall(lab, {MACHINE}, wall0 - 0.01)[MACHINE] - wall0
    return t0, t_point - t0, t_exit - t0, agent_hwm, metrics, startup


def initial(work: str, image: str, timeout: float) -> Replication:
    """A fresh repository and process server (cache 4 GiB, as bench/initial_replication.py), then
    the first full replication of `image`. The caller closes the returned lab."""
    lab = Lab(work)
    try:
        lab.start_ps({"cache": {"dir": os.path.join(work, "cache"), "max_bytes": 4 << 30}})
        # The metrics listener may come up just after the ingest port: wait for it.
        deadline = time.monotonic() + 30
        while True:
            try:
                before = _published(lab)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        ps_s = ProcSampler("process server", lab.ps_proc.pid)
        _t0, seconds, agent_seconds, agent_hwm, metrics, startup = _run_agent_until_point(lab, image, timeout, before)
        ps_s.sample()
        return Replication(lab, seconds - startup, agent_seconds - startup, startup, ps_s.hwm_kib / 1024, agent_hwm,
                           metrics.get("lifeboat_ps_upload_stored_bytes_total", 0.0))
    except BaseException:
        lab.close()
        raise


def failover(lab: Lab, target: str, source_sha: str | None) -> float:
    """`lifeboat failover --test --point latest --to target`; seconds. Checks the image if asked."""
    if os.path.exists(target):
        os.unlink(target)
    t = time.monotonic()
    proc = lab.failover("latest", target)
    seconds = time.monotonic() - t
    if proc.returncode != 0:
        raise RuntimeError(f"lifeboat failover exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    if source_sha is not None and sha256(target) != source_sha:
        raise RuntimeError(f"failover image {target} differs from the source")
    return seconds


def churn(image: str, size: int, fraction: float, rng: random.Random, block: int = 64 * 1024) -> int:
    """Random aligned `block`-sized writes of random data over `fraction` of the image, fsynced.
    Returns the bytes written."""
    count = max(1, round(size * fraction / block))
    blocks = size // block
    with open(image, "r+b", buffering=0) as f:
        for _ in range(count):
            f.seek(rng.randrange(blocks) * block)
            f.write(rng.randbytes(block))
        os.fsync(f.fileno())
    return count * block


@dataclass
class Delta:
    seconds: float          # last churn write fsynced → the process server published the next point
    agent_seconds: float    # of which: the agent's run (start → exit)
    churned_bytes: int
    received_bytes: float   # what the agent sent for this point (lifeboat_ps_received_bytes_total)
    point_after_write: bool  # lifeboat_ps_last_point_timestamp_seconds ≥ the last write's time


def delta(lab: Lab, image: str, size: int, seed: int, timeout: float) -> Delta:
    """1% random 64 KiB churn, then `lifeboat-mobility --cycles 1` with the same agent state (the
    digest tracker finds the changed blocks); seconds from the last write to the durable point."""
    m0 = scrape(lab.ps_metrics_port)
    before = m0.get("lifeboat_ps_points_published_total", 0.0)
    churned = churn(image, size, 0.01, random.Random(seed))
    t_write_wall, t_write = time.time(), time.monotonic()
    t0, _seconds, agent_seconds, _hwm, metrics, _startup = _run_agent_until_point(lab, image, timeout, before)
    seconds = t0 + _seconds - t_write
    stamp = metrics.get("lifeboat_ps_last_point_timestamp_seconds", 0.0)
    received = metrics.get("lifeboat_ps_received_bytes_total", 0.0) - m0.get("lifeboat_ps_received_bytes_total", 0.0)
    return Delta(seconds, agent_seconds, churned, received, stamp >= t_write_wall - 1e-3)


def restic_backup(work: str, image: str) -> float | None:
    """`restic backup` of the image into a fresh local restic repository; seconds, or None if
    restic is not installed."""
    import shutil

    exe = shutil.which("restic")
    if not exe:
        return None
    repo = os.path.join(work, "restic-repo")
    shutil.rmtree(repo, ignore_errors=True)
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": os.path.join(work, "restic-cache")}
    subprocess.run([exe, "init", "--repo", repo], env=env, check=True, capture_output=True)
    t = time.monotonic()
    subprocess.run([exe, "backup", "--repo", repo, "--quiet", image], env=env, check=True, capture_output=True)
    seconds = time.monotonic() - t
    shutil.rmtree(repo, ignore_errors=True)
    return seconds


def drop_target(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["initial", "failover", "delta", "restic_backup", "Replication", "Delta", "MiB"]
