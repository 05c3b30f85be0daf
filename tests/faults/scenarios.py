"""Seeded fault scenarios: replicate a live image under one fault, heal, fail over every point, compare bytes.

A scenario is (seed, fault, parameters drawn from Random(seed)). It runs real daemons (demo/lab.py)
with a TCP fault proxy between agent and process server and, for storage faults, an HTTP fault proxy
between process server and an Azurite of its own. The writer pauses for every point and the agent's
post script records the image's SHA-256 under the point's id (demo/pause.sh): the source oracle.
A point is acknowledged when the agent logs "cycle complete" for it; at the end every catalog point
is failed over and compared with its oracle, and every acknowledged point must be in the catalog.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "demo"))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "integration"))
sys.path.insert(0, str(HERE))

from azurite_proc import Azurite, connection_string  # noqa: E402
from disk_images import make_image  # noqa: E402
from http_faults import HTTPFaultProxy  # noqa: E402
from lab import DEMO_DIR, Lab, sha256_file  # noqa: E402
from proxy import FaultProxy  # noqa: E402
from small_fs import SmallFilesystem  # noqa: E402
from workload import Writer  # noqa: E402

FAULTS = ("tcp_delay", "tcp_throttle", "tcp_cut", "tcp_reset", "tcp_blackhole", "kill_process_server",
          "kill_agent", "azurite_restart", "storage_errors", "storage_stall", "storage_link", "cache_full",
          "clock_jump")
AZURE_FAULTS = {"azurite_restart", "storage_errors", "storage_stall", "storage_link", "cache_full"}
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
CYCLE_COMPLETE_RE = re.compile(r"cycle complete.*?POINT='?([^'\s]+)")
MACHINE = "web01"
RUN_TIMEOUT_SECONDS = 120.0      # one scenario's replication, faults included
CATALOG_TIMEOUT_SECONDS = 90.0   # after healing: uploads catch up with what was acknowledged
EXTRA_CYCLES_FOR_A_FAULT = 3     # cycles run beyond the scenario's when a link fault met no traffic


@dataclass
class Scenario:
    seed: int
    fault: str
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.fault}-seed{self.seed}"


@dataclass
class Result:
    scenario: Scenario
    acknowledged: list[str] = field(default_factory=list)  # point ids, in the agent's order
    verified: int = 0          # catalog points failed over and equal to their source
    divergent: list[str] = field(default_factory=list)  # point ids whose recovered bytes differ
    lost: list[str] = field(default_factory=list)       # acknowledged, missing from the catalog
    errors: list[str] = field(default_factory=list)     # anything else wrong (hang, crash, misorder)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase: where the time went
    faults_applied: int = 0

    @property
    def ok(self) -> bool:
        return not (self.divergent or self.lost or self.errors)

    def line(self) -> str:
        s = self.scenario
        status = "ok" if self.ok else "FAIL"
        extra = "" if self.ok else f" divergent={self.divergent} lost={self.lost} errors={self.errors}"
        return (f"{status} {s.name} params={json.dumps(s.params, sort_keys=True)} acknowledged={len(self.acknowledged)} "
                f"verified={self.verified} faults={self.faults_applied} seconds={self.seconds:.1f} "
                f"({' '.join(f'{k}:{v:.1f}' for k, v in self.phases.items())}){extra}")


def make_scenario(seed: int, fault: str, quick: bool = False) -> Scenario:
    """Draw the fault's parameters from Random(seed): where it lands, how long, how hard.
    quick (CI): 16 MiB and 3 cycles, so that two dozen scenarios fit in a few minutes."""
    rng = random.Random(f"{fault}/{seed}")
    p: dict = {"size_mib": rng.choice([16, 16, 24]), "cycles": rng.choice([3, 4, 5]),
               "start_after_seconds": round(rng.uniform(0.05, 1.0), 2), "hold_seconds": round(rng.uniform(1.0, 3.0), 2)}
    if fault == "tcp_delay":
        p.update(delay_ms=rng.randint(10, 60), jitter_ms=rng.randint(0, 10))
    elif fault == "tcp_throttle":
        p.update(bytes_per_second=rng.choice([1, 2, 4]) << 20)
    elif fault == "tcp_cut":
        p.update(cut_after_bytes=rng.randint(16 << 10, 1 << 20))
    elif fault == "kill_process_server":
        p.update(kills=rng.randint(1, 2), down_seconds=round(rng.uniform(0.1, 1.5), 2))
    elif fault == "kill_agent":
        p.update(kills=rng.randint(1, 2))
    elif fault == "azurite_restart":
        p.update(down_seconds=round(rng.uniform(0.5, 3.0), 2))
    elif fault == "storage_errors":
        p.update(fraction=round(rng.uniform(0.15, 0.5), 2), faults=rng.choice([["500"], ["503"], ["500", "503"]]))
    elif fault == "storage_stall":
        p.update(fraction=round(rng.uniform(0.1, 0.3), 2), stall_seconds=round(rng.uniform(1.0, 3.0), 1))
    elif fault == "storage_link":
        # The TCP proxy between process server and storage. Not a black-hole: the Azure SDK's read
        # timeout is 60 s, too long for a scenario (storage_stall covers a hung request).
        mode = rng.choice(["delay", "throttle", "cut", "reset"])
        value = {"delay": rng.randint(10, 50), "throttle": rng.choice([2, 4, 8]) << 20,
                 "cut": rng.randint(64 << 10, 4 << 20), "reset": 0}[mode]
        p.update(mode=mode, value=value)
    elif fault == "cache_full":
        # Storage refuses everything for a while, so acknowledged batches pile up in the cache until
        # it is full: a small filesystem (ENOSPC for real) or a small cache.max_bytes (throttling).
        p.update(how=("max_bytes", "enospc")[seed % 2], cache_mib=rng.choice([6, 8, 10]),
                 hold_seconds=round(rng.uniform(3.0, 6.0), 2), start_after_seconds=round(rng.uniform(0.0, 1.0), 2))
    elif fault == "clock_jump":
        # Backwards by less than the certificates' 5-minute backdating, or forwards by hours/days.
        p.update(target=rng.choice(["agent", "process_server", "both"]),
                 jumps=[rng.choice(["-%ds" % rng.randint(30, 240), "+%dh" % rng.randint(1, 48)]) for _ in range(2)])
    elif fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}: use one of {', '.join(FAULTS)}")
    if quick:
        p.update(size_mib=16, cycles=3)
    return Scenario(seed, fault, p)


class ScenarioRun:
    """Everything one scenario starts, so that it can all be stopped whatever happens."""

    def __init__(self, sc: Scenario, work: Path, shared_azurite_port: int = 0) -> None:
        self.sc, self.p, self.work = sc, sc.params, Path(work)
        self.shared_azurite_port = shared_azurite_port
        self.rng = random.Random(f"run/{sc.fault}/{sc.seed}")
        self.result = Result(sc)
        self.azurite: Azurite | None = None
        self.storage_proxy: HTTPFaultProxy | None = None
        self.storage_link: FaultProxy | None = None
        self.small_fs: SmallFilesystem | None = None
        self.lab: Lab | None = None
        self.writer: Writer | None = None
        self.link: FaultProxy | None = None
        self.agent: subprocess.Popen | None = None
        self.clock_file = self.work / "faketime"
        self.ctl = self.work / "ctl"
        self.orphan_oracles: list[str] = []
        self.replicated = threading.Event()  # no more agent runs will start

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.image = make_image(self.work / "sda.img", self.p["size_mib"], seed=self.sc.seed)
        repo_url = conn = None
        if self.sc.fault in AZURE_FAULTS:
            if self.shared_azurite_port and self.sc.fault != "azurite_restart":
                upstream = self.shared_azurite_port  # each scenario has a container of its own
            else:
                self.azurite = Azurite(self.work / "azurite")
                upstream = self.azurite.start()
            self.storage_proxy = HTTPFaultProxy(upstream, seed=self.sc.seed)
            # process server → TCP faults → HTTP faults → Azurite
            self.storage_link = FaultProxy(self.storage_proxy.port, seed=self.sc.seed + 1)
            repo_url, conn = f"azure://faults-{uuid.uuid4().hex[:12]}", connection_string(self.storage_link.port)
        self.lab = Lab(self.work / "lab", repo_url=repo_url, azure_connection_string=conn)
        self.clock_file.write_text("+0\n")
        self.start_ps()
        self.link = FaultProxy(self.lab.ps_port, seed=self.sc.seed)
        self.writer = Writer(self.image, self.ctl, seed=self.sc.seed).start()

    def ps_extra(self) -> dict:
        extra: dict = {"upload": {"retry_max_seconds": 1.0}}
        if self.sc.fault == "cache_full":
            if self.p["how"] == "enospc":  # the cache dir on a filesystem of cache_mib
                if self.small_fs is None:
                    self.small_fs = SmallFilesystem(self.work / "cache.fs", self.work / "cache", self.p["cache_mib"])
                extra["cache"] = {"dir": str(self.work / "cache")}
            else:
                extra["cache"] = {"dir": str(self.work / "lab" / "cache"), "max_bytes": self.p["cache_mib"] << 20,
                                  "retry_after_seconds": 1}
                # the cache must hold two of the largest batches; the agent sends 1 MiB ones
                extra["ingest"] = {"max_batch_bytes": 2 << 20}
        return extra

    def clock_env(self, who: str) -> dict:
        if self.sc.fault != "clock_jump" or self.p["target"] not in (who, "both"):
            return {}
        return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                # Re-read the offset file every second: without a cache every time() call reads it.
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def start_ps(self) -> None:
        env = self.clock_env("process_server")
        if env:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # Lab.start_ps inherits our environment
            try:
                self.lab.start_ps(self.ps_extra())
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            self.lab.start_ps(self.ps_extra())

    def start_agent(self, cycles: int) -> subprocess.Popen:
        extra = {
            "process_server": {"url": f"https://127.0.0.1:{self.link.port}", "timeout_seconds": 8.0,
                               "retry_max_seconds": 1.0},
            "replication": {"interval_seconds": 0.3, "batch_bytes": 1 << 20},
            "consistency": {"pre_script": str(DEMO_DIR / "pause.sh"), "post_script": str(DEMO_DIR / "pause.sh"),
                            "app_interval_seconds": 0},
        }
        env = {"DEMO_CTL": str(self.ctl), "DEMO_IMAGE": str(self.image), **self.clock_env("agent")}
        self.agent = self.lab.start_agent(MACHINE, {"sda": str(self.image)}, cycles=cycles, extra=extra, env=env)
        return self.agent

    # --- the fault --------------------------------------------------------------------------

    def acknowledged(self) -> list[str]:
        text = self.lab.log_path.read_text(errors="replace")
        return [m.group(1) for line in text.splitlines() if (m := CYCLE_COMPLETE_RE.search(line))]

    def sleep_unless_done(self, seconds: float) -> bool:
        """Sleep; False if replication is over meanwhile (no agent runs any more)."""
        return not self.replicated.wait(seconds)

    def sleep_unless_agent_exits(self, seconds: float) -> bool:
        """Sleep; False if the running agent exited meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                return False
            time.sleep(0.02)
        return True

    def inject(self) -> None:
        """Runs beside the agent: wait the seeded delay, apply the fault, hold it, heal."""
        f, p = self.sc.fault, self.p
        if f.startswith("tcp_") or f in ("kill_process_server", "storage_link"):
            # Measured from the first stored batch: the fault lands while data flows, not before
            # the agent has started or after it is done.
            while self.stored_batches() < 1 and not self.replicated.wait(0.02):
                pass
        if not self.sleep_unless_done(p["start_after_seconds"]):
            return
        if f.startswith("tcp_"):
            mode = {"tcp_delay": ("delay", p.get("delay_ms", 0), p.get("jitter_ms", 0)),
                    "tcp_throttle": ("throttle", p.get("bytes_per_second", 0), 0),
                    "tcp_cut": ("cut", p.get("cut_after_bytes", 0), 0),
                    "tcp_reset": ("reset", 0, 0), "tcp_blackhole": ("blackhole", 0, 0)}[f]
            self.link.mode(*mode)
            self.sleep_unless_done(p["hold_seconds"] * (3 if f in ("tcp_delay", "tcp_throttle") else 1))
            while not self.link.landed and not self.replicated.wait(0.05):
                pass  # the link was idle (between cycles): hold the fault until traffic meets it
            self.link.heal()
            self.result.faults_applied += self.link.landed
        elif f == "kill_process_server":
            for k in range(p["kills"]):
                if k and not self.sleep_unless_done(self.rng.uniform(0.3, 2.0)):
                    return
                self.lab.stop_ps(signal.SIGKILL)
                self.result.faults_applied += 1
                time.sleep(p["down_seconds"])
                self.start_ps()
        elif f == "azurite_restart":
            self.azurite.stop()
            self.result.faults_applied += 1
            time.sleep(p["down_seconds"])
            self.storage_proxy.set_upstream(self.azurite.start())
        elif f in ("storage_errors", "storage_stall"):
            if f == "storage_errors":
                self.storage_proxy.configure(p["fraction"], tuple(p["faults"]))
            else:
                self.storage_proxy.configure(p["fraction"], ("stall",), p["stall_seconds"])
            time.sleep(p["hold_seconds"] * 3)  # uploads go on after the agent is done
            self.storage_proxy.heal()
            self.result.faults_applied += self.storage_proxy.landed
        elif f == "storage_link":
            self.storage_link.mode(p["mode"], p["value"])
            time.sleep(p["hold_seconds"] * 2)
            while not self.storage_link.landed and not self.replicated.wait(0.05):
                pass  # no upload crossed the link yet (faster agents finish a cycle early): hold until one does
            self.storage_link.heal()
            self.result.faults_applied += self.storage_link.landed
        elif f == "cache_full":
            # Once the agent is sending (its first query needs storage: the process server reads
            # where the disk's log ends in the repository), storage goes away and the cache fills.
            while self.stored_batches() < 1 and not self.replicated.wait(0.02):
                pass
            self.storage_proxy.configure(1.0, ("503",))
            time.sleep(p["hold_seconds"])
            while not self.cache_filled() and not self.replicated.wait(0.05):
                pass  # uploads drained the cache before storage went away: hold until extra cycles fill it
            self.storage_proxy.heal()
            self.result.faults_applied += self.cache_filled()
        elif f == "clock_jump":
            for jump in p["jumps"]:
                self.clock_file.write_text(jump + "\n")
                self.result.faults_applied += 1
                if not self.sleep_unless_done(p["hold_seconds"]):
                    break
        # kill_agent is driven by replicate(): it restarts the agent itself

    def cache_filled(self) -> int:
        """Landed only if the cache really filled: ENOSPC on the small filesystem, or the process
        server throttling senders above its high-water mark (how many times, from its log)."""
        log = self.lab.log_path.read_text(errors="replace")
        return log.count("No space left on device") + log.count("process server throttling")

    def stored_batches(self) -> float:
        try:
            return self.lab.ps_metrics().get('lifeboat_ps_batches_total{result="stored"}', 0.0)
        except OSError:
            return 0.0

    def landed(self) -> bool:
        """Whether the fault has acted yet, for the faults that need the agent running to land."""
        if self.sc.fault.startswith("tcp_"):
            return bool(self.link.landed)
        if self.sc.fault == "storage_link":
            return bool(self.storage_link.landed)   # else one more cycle uploads through the faulty link
        if self.sc.fault in ("kill_agent", "kill_process_server"):
            return self.result.faults_applied > 0
        if self.sc.fault == "cache_full":
            return self.cache_filled() > 0   # else one more cycle sends into the cache while storage is away
        return True  # storage and clock faults run on their own clock, uploads go on after the agent

    def kill_agent_at_random(self) -> bool:
        """SIGKILL the agent at a seeded moment (False if it exited first); if it dies while the
        writer is paused for a point whose bookmark may already be out, record the image (unchanged
        since) as that point's source."""
        if not self.sleep_unless_agent_exits(self.rng.uniform(0.05, 1.2)):
            return False
        self.agent.kill()
        self.agent.wait()
        self.result.faults_applied += 1
        if (self.ctl / "pause").exists():
            self.orphan_oracles.append(sha256_file(self.image))
            # What the killed post script would have done; it may outlive the agent and do it itself.
            (self.ctl / "pause").unlink(missing_ok=True)
        return True

    # --- replicate, heal, verify ------------------------------------------------------------

    def replicate(self) -> None:
        cycles = self.p["cycles"]
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        kills_left = self.p.get("kills", 0) if self.sc.fault == "kill_agent" else 0
        extra_cycles = EXTRA_CYCLES_FOR_A_FAULT
        self.start_agent(cycles)
        injector = None
        if self.sc.fault != "kill_agent":
            injector = threading.Thread(target=self._inject_logged, daemon=True)
            injector.start()
        while True:
            if kills_left and self.kill_agent_at_random():
                kills_left -= 1
            while self.agent.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.agent.poll() is None:
                self.agent.kill()
                self.agent.wait()
                self.result.errors.append(f"agent did not finish {cycles} cycles within {RUN_TIMEOUT_SECONDS:.0f} s (hang)")
                break
            done = len(self.acknowledged())
            rc = self.agent.returncode
            if rc not in (0, -signal.SIGKILL):
                self.result.errors.append(f"agent exited with {rc}")
            if time.monotonic() > deadline or rc not in (0, -signal.SIGKILL):
                break
            if done >= cycles:
                if self.landed() or not extra_cycles:
                    break
                extra_cycles -= 1  # the fault met no traffic yet: one more cycle for it to land
                self.start_agent(1)
                continue
            self.start_agent(cycles - done)
        self.replicated.set()
        if injector:
            injector.join(RUN_TIMEOUT_SECONDS)
            if injector.is_alive():
                self.result.errors.append("fault injector hung")

    def _inject_logged(self) -> None:
        try:
            self.inject()
        except Exception:  # noqa: BLE001 - reported as a scenario error, not a crashed thread
            self.result.errors.append("fault injection failed: " + traceback.format_exc(limit=3))

    def heal(self) -> None:
        self.link.heal()
        if self.storage_proxy:
            self.storage_proxy.heal()
            self.storage_link.heal()
        self.clock_file.write_text("+0\n")
        self.writer.stop()
        if self.lab.ps_proc is None or self.lab.ps_proc.poll() is not None:
            self.result.errors.append(f"process server is not running (exit {self.lab.ps_proc and self.lab.ps_proc.returncode})")
            self.lab.ps_proc = None
            self.start_ps()

    def verify(self) -> None:
        lab, res = self.lab, self.result
        if self.storage_proxy:
            # The operator's commands reach storage directly: the proxies belong to the fault path.
            lab.conn_file.write_text(connection_string(self.storage_proxy.upstream_port))
        res.acknowledged = self.acknowledged()
        deadline = time.monotonic() + CATALOG_TIMEOUT_SECONDS
        while True:
            points = [p for p in lab.points() if p["machine"] == MACHINE]
            listed = {p["point_id"] for p in points if p["complete"]}
            missing = [a for a in res.acknowledged if a not in listed]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        res.lost = missing
        res.phases["catch_up"] = CATALOG_TIMEOUT_SECONDS - (deadline - time.monotonic())
        oracle_dir = self.ctl / "oracle"
        out = self.work / "recovered.img"
        for p in points:
            oracle = oracle_dir / f"{p['point_id']}.sha256"
            if p["point_id"] not in res.acknowledged and self.orphan_oracles:
                # A killed agent's last point: the image it left, paused since its pre script. Its post
                # script may outlive it and hash the image after kill_agent_at_random() resumed the
                # writer, so an oracle file for this point may be torn: the image at the kill counts.
                wanted = set(self.orphan_oracles) | ({oracle.read_text().strip()} if oracle.exists() else set())
            elif oracle.exists():
                wanted = {oracle.read_text().strip()}
            else:
                res.errors.append(f"point {p['point_id']} has no source oracle")
                continue
            got = self.failover_sha(p["point_id"], out)
            if got in wanted:
                res.verified += 1
            else:
                res.divergent.append(p["point_id"])
        # The catalog lists a machine's points in log order, whatever the clocks said (so that
        # "latest", the last complete one listed, is the newest state).
        order = [p["point_id"] for p in points if p["point_id"] in set(res.acknowledged)]
        if order != [a for a in res.acknowledged if a in order]:
            res.errors.append(f"catalog order {order} differs from the agent's order {res.acknowledged}")
        if not res.acknowledged:
            res.errors.append("no point was acknowledged")

    def failover_sha(self, point: str, out: Path) -> str | None:
        done = self.lab.failover(point, out)
        if done.returncode != 0:
            self.result.errors.append(f"failover {point} exited with {done.returncode}: {done.stderr.strip()[-300:]}")
            return None
        digest = sha256_file(out)
        out.unlink()
        return digest

    def close(self) -> None:
        for step in (lambda: self.writer and self.writer.stop(), lambda: self.lab and self.lab.close(),
                     lambda: self.link and self.link.close(), lambda: self.storage_proxy and self.storage_proxy.close(),
                     lambda: self.storage_link and self.storage_link.close(),
                     lambda: self.azurite and self.azurite.stop(), lambda: self.small_fs and self.small_fs.close()):
            try:
                step()
            except Exception:  # noqa: BLE001 - cleanup goes on; the scenario's result stands
                traceback.print_exc()


def run_scenario(sc: Scenario, work: Path, keep: bool = False, shared_azurite_port: int = 0) -> Result:
    """Run one scenario in `work` (created); the work dir is removed unless it failed or keep=True.
    Storage faults use the Azurite on shared_azurite_port if given (azurite_restart always starts
    its own), else one of their own."""
    t0 = time.monotonic()
    run = ScenarioRun(sc, work, shared_azurite_port)
    try:
        for phase in (run.setup, run.replicate, run.heal, run.verify):
            t = time.monotonic()
            phase()
            run.result.phases[phase.__name__] = time.monotonic() - t
    except Exception:  # noqa: BLE001 - a harness or daemon failure is a failed scenario, with its trace
        run.result.errors.append(traceback.format_exc(limit=5))
    finally:
        run.close()
    run.result.seconds = time.monotonic() - t0
    if run.result.ok and not keep:
        shutil.rmtree(work, ignore_errors=True)
    return run.result
