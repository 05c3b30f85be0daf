"""Benchmark: initial replication of one disk image through a real process server, then a test failover.

Generates a deterministic image of mixed content (per 1 MiB region: ~39% zero, ~29% word text that
zstd -1 compresses ~4x, ~32% random, the mix of shared/PERF-LIMITS.md), runs `lifeboat init`,
starts `lifeboat-process-server` (local-directory repository) and `lifeboat-mobility --cycles 1`,
and measures the wall time from the agent's start until the process server has uploaded the
point (its /metrics counter lifeboat_ps_points_published_total reaches 1; uploads are strictly in
sequence order and the bookmark rides in the last batch). Samples RSS and CPU of both daemons
every 100 ms, times `zstd -1` on the same image for comparison, test-fails-over the point and
compares SHA-256 of the recovered image with the source.

Prints figures; asserts nothing about speed. Exit status is non-zero only if something failed
(a daemon error, a timeout, or a recovered image that differs from the source).

Units: MB = 10^6 bytes (throughput, sizes), MiB = 2^20 bytes (RSS). --size takes binary suffixes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.1
METRICS_EVERY = 2  # poll the process server's /metrics every N samples (0.2 s)


# ---------------------------------------------------------------------------------------------
# helpers


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    size = int(float(num) * mult)
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be a positive multiple of 512 bytes")
    return size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def du_bytes(path: str) -> tuple[int, int]:
    """(allocated bytes on disk, apparent bytes) of a directory tree."""
    alloc = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def drop_caches() -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as exc:
        return f"NOT dropped ({exc.strerror or exc}): reads may come from the page cache"


def read_through(path: str) -> float:
    """Read a file once (to warm the page cache), then settle(); returns seconds."""
    t0 = time.monotonic()
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    settle()
    return time.monotonic() - t0


def settle() -> None:
    """Write back every dirty page before a timed step, so that no step pays in its fsyncs for the
    previous one's writes (a freshly generated image's writeback cut the first failover after it to
    0.4 of the ceiling, and not the ceiling's restore after it: measured, bench/RESULTS.md)."""
    os.sync()


# ---------------------------------------------------------------------------------------------
# image generation


def make_text_source(seed: int):
    """A fixed vocabulary of 2000 pseudo-words with Zipf(1.2) frequencies: zstd -1 ratio ~4.1."""
    rng = random.Random(seed ^ 0x7E47)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    freq = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.7, 2.4, 2.2, 2, 1.9, 1.9, 1.5, 1, 0.8,
            0.15, 0.15, 0.1, 0.1, 0.07]
    vocab: set[str] = set()
    while len(vocab) < 2000:
        n = min(12, int(rng.expovariate(1 / 5.0)) + 1)
        vocab.add("".join(rng.choices(letters, freq, k=n)))
    words = sorted(vocab)
    rng.shuffle(words)
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 1.2 for i in range(len(words))))
    ends = [". ", ".\n", "\n", ", "]

    def text(rng: random.Random, size: int) -> bytes:
        out, n = [], 0
        while n < size:
            s = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(4, 40))) + rng.choice(ends)
            out.append(s)
            n += len(s)
        return "".join(out).encode()[:size]

    return text


def generate_image(path: str, size: int, seed: int) -> dict[str, int]:
    """Write the image region by region (zeros are written, not left sparse: a real disk's zeros
    are on the medium and must be read)."""
    rng = random.Random(seed)
    text = make_text_source(seed)
    regions = -(-size // MiB)
    n_zero, n_text = round(0.39 * regions), round(0.29 * regions)
    kinds = ["zero"] * n_zero + ["text"] * n_text + ["random"] * (regions - n_zero - n_text)
    rng.shuffle(kinds)  # exact proportions, seeded order
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        for i, kind in enumerate(kinds):
            n = min(MiB, size - i * MiB)
            if kind == "zero":
                f.write(zeros[:n])
            elif kind == "text":
                f.write(text(rng, n))
            else:
                f.write(rng.randbytes(n))
    return {k: kinds.count(k) for k in ("zero", "text", "random")}


# ---------------------------------------------------------------------------------------------
# process sampling


def read_stat(pid: int) -> tuple[int, int] | None:
    """(utime, stime) in clock ticks from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB from /proc/<pid>/status (empty once the process is a zombie)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


class ProcSampler:
    """RSS peak and per-thread CPU ticks of one process, sampled from /proc."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.rss_peak_kib = 0     # max VmRSS seen while sampling
        self.hwm_kib = 0          # latest VmHWM (the kernel's own peak)
        self.threads: dict[int, int] = {}   # tid -> utime+stime ticks (latest)
        self.base_threads: dict[int, int] = {}
        self.cpu_ticks = 0
        self.base_cpu_ticks = 0

    def sample(self) -> None:
        st = read_status(self.pid)
        if "VmRSS" in st:
            self.rss_peak_kib = max(self.rss_peak_kib, st["VmRSS"])
        if "VmHWM" in st:
            self.hwm_kib = max(self.hwm_kib, st["VmHWM"])
        s = read_stat(self.pid)
        if s:
            self.cpu_ticks = sum(s)
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                self.threads[int(tid)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass

    def mark_baseline(self) -> None:
        self.sample()
        self.base_cpu_ticks = self.cpu_ticks
        self.base_threads = dict(self.threads)

    def cpu_seconds(self) -> float:
        return (self.cpu_ticks - self.base_cpu_ticks) / CLK_TCK

    def thread_report(self, wall: float, top: int = 6) -> list[str]:
        rows = []
        for tid, ticks in self.threads.items():
            used = (ticks - self.base_threads.get(tid, 0)) / CLK_TCK
            if used > 0:
                label = "main thread (event loop)" if tid == self.pid else f"thread {tid}"
                rows.append((used, label))
        rows.sort(reverse=True)
        return [f"    {label:<26} {used:7.2f} CPU s  {100 * used / wall:5.1f}% of the wall time"
                for used, label in rows[:top]]


# ---------------------------------------------------------------------------------------------
# metrics


def scrape(port: int) -> dict[str, float]:
    """Prometheus text → {name: value}, summing over label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process server exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"process server not healthy after {timeout:.0f} s")
        time.sleep(0.1)


def run_json(cmd: list[str]):
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


# ---------------------------------------------------------------------------------------------
# zstd reference


def time_zstd(image: str, size: int, threads: int) -> tuple[float, float] | None:
    exe = shutil.which("zstd")
    if not exe:
        return None
    t0 = time.monotonic()
    subprocess.run([exe, "-1", f"-T{threads}", "-q", "-c", image], check=True, stdout=subprocess.DEVNULL)
    dt = time.monotonic() - t0
    return dt, size / dt / MB


def zstd_ratio(image: str, size: int) -> float | None:
    exe = shutil.which("zstd")
    if not exe:
        return None
    p = subprocess.Popen([exe, "-1", "-T2", "-q", "-c", image], stdout=subprocess.PIPE)
    total = 0
    assert p.stdout
    while chunk := p.stdout.read(4 * MiB):
        total += len(chunk)
    p.wait()
    return size / total if total else None


# ---------------------------------------------------------------------------------------------


def stop_process(p: subprocess.Popen, timeout: float = 30.0) -> None:
    if p.returncode is not None:
        return
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size, e.g. 2G, 512M (default 2G)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work directory (default bench/work)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=1, help="seed of the image content (default 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="give up if the upload takes longer (s)")
    args = ap.parse_args()
    size = args.size
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    procs: list[subprocess.Popen] = []
    logs: dict[str, str] = {}
    try:
        return run(args, size, work, procs, logs)
    except Exception as exc:
        print(f"FAIL: {type(exc).__name__}: {exc}")
        for name, path in logs.items():
            text = tail(path)
            if text:
                print(f"--- last lines of {name} ({path}) ---\n{text}", end="")
        return 1
    finally:
        for p in reversed(procs):
            stop_process(p)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")


def run(args, size: int, work: str, procs: list, logs: dict) -> int:
    image = os.path.join(work, "source.img")
    print(f"== generating {image}: {size / MB:.1f} MB ({size / MiB:.0f} MiB), seed {args.seed}")
    t = time.monotonic()
    counts = generate_image(image, size, args.seed)
    total = sum(counts.values())
    print("   regions of 1 MiB: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in counts.items())
          + f"; generated in {time.monotonic() - t:.1f} s (not measured)")

    init = run_json([bin_("lifeboat"), "init", "--dir", os.path.join(work, "etc")])
    repo_dir = init["repository"].removeprefix("local:")
    repo_args = ["--repo", init["repository"], "--key-file", init["key_file"]]
    ps_port, ps_metrics, ag_metrics = free_port(), free_port(), free_port()
    ps_conf = os.path.join(work, "process-server.toml")
    with open(ps_conf, "w") as f:
        f.write(f"""
[ingest]
host = "127.0.0.1"
port = {ps_port}
tls_cert = "{init['server_cert']}"
tls_key = "{init['server_key']}"
agent_token_file = "{init['agent_token']}"
[cache]
dir = "{work}/cache"
max_bytes = {4 << 30}
[repository]
url = "{init['repository']}"
key_file = "{init['key_file']}"
[metrics]
host = "127.0.0.1"
port = {ps_metrics}
[log]
format = "kv"
""")
    ag_conf = os.path.join(work, "mobility.toml")
    with open(ag_conf, "w") as f:
        f.write(f"""
machine = "bench"
state_dir = "{work}/agent-state"
[process_server]
url = "https://127.0.0.1:{ps_port}"
ca_cert = "{init['ca_cert']}"
token_file = "{init['agent_token']}"
[[disks]]
id = "disk0"
path = "{image}"
[metrics]
host = "127.0.0.1"
port = {ag_metrics}
[log]
format = "kv"
""")
    logs["process server log"] = ps_log_path = os.path.join(work, "process-server.log")
    logs["agent log"] = ag_log_path = os.path.join(work, "agent.log")
    ps_log = open(ps_log_path, "w")
    ag_log = open(ag_log_path, "w")

    ps = subprocess.Popen([bin_("lifeboat-process-server"), "-c", ps_conf], stdout=ps_log, stderr=ps_log)
    procs.append(ps)
    wait_healthy(ps_metrics, ps)
    print(f"== process server pid {ps.pid} on 127.0.0.1:{ps_port} (metrics :{ps_metrics}), "
          f"repository {repo_dir}, cache max 4 GiB")

    cache_state = drop_caches()
    print(f"== page cache before the run: {cache_state}")

    ps_s = ProcSampler("process server", ps.pid)
    ps_s.mark_baseline()
    t0 = time.monotonic()
    agent = subprocess.Popen([bin_("lifeboat-mobility"), "-c", ag_conf, "--cycles", "1"], stdout=ag_log, stderr=ag_log)
    procs.append(agent)
    ag_s = ProcSampler("agent", agent.pid)
    agent_ru = None
    t_agent = t_done = None
    metrics: dict[str, float] = {}
    deadline = t0 + args.timeout
    tick = 0
    last_report = t0
    print(f"== agent pid {agent.pid} started: lifeboat-mobility --cycles 1 (initial replication)")
    while True:
        ps_s.sample()
        if agent_ru is None:
            ag_s.sample()
            pid, status, ru = os.wait4(agent.pid, os.WNOHANG)
            if pid:
                t_agent = time.monotonic()
                agent.returncode = os.waitstatus_to_exitcode(status)
                agent_ru = ru
                if agent.returncode != 0:
                    raise RuntimeError(f"agent exited with status {agent.returncode}")
                print(f"   agent exited 0 after {t_agent - t0:.2f} s (every batch acknowledged by the process server)")
        if ps.poll() is not None:
            raise RuntimeError(f"process server exited with {ps.returncode} during the run")
        if tick % METRICS_EVERY == 0:
            metrics = scrape(ps_metrics)
            if metrics.get("lifeboat_ps_points_published_total", 0) >= 1:
                t_done = time.monotonic()
                break
        now = time.monotonic()
        if now - last_report >= 5:
            last_report = now
            print(f"   t={now - t0:5.1f} s  received {metrics.get('lifeboat_ps_received_bytes_total', 0) / MB:8.1f} MB"
                  f"  uploaded source {metrics.get('lifeboat_ps_upload_source_bytes_total', 0) / MB:8.1f} MB"
                  f"  backlog {metrics.get('lifeboat_ps_backlog_bytes', 0) / MB:7.1f} MB"
                  f"  PS RSS {read_status(ps.pid).get('VmRSS', 0) / 1024:6.0f} MiB")
        if now > deadline:
            raise RuntimeError(f"upload not finished after {args.timeout:.0f} s")
        tick += 1
        time.sleep(SAMPLE_SECONDS)
    wall = t_done - t0
    # Final readings of the process server before it is stopped: VmHWM is the true peak.
    ps_s.sample()
    ps_hwm = ps_s.hwm_kib
    ps_cpu = ps_s.cpu_seconds()
    ps_cpu_total = ps_s.cpu_ticks / CLK_TCK
    if agent_ru is None:  # finished uploading before we saw the agent exit: wait for it
        ag_s.sample()
        _pid, status, agent_ru = os.wait4(agent.pid, 0)
        t_agent = time.monotonic()
        agent.returncode = os.waitstatus_to_exitcode(status)
        if agent.returncode != 0:
            raise RuntimeError(f"agent exited with status {agent.returncode}")
        print(f"   agent exited 0 after {t_agent - t0:.2f} s (reaped after the upload finished)")
    ag_cpu = agent_ru.ru_utime + agent_ru.ru_stime
    ag_hwm = max(ag_s.hwm_kib, agent_ru.ru_maxrss)
    print(f"   point uploaded after {wall:.2f} s (lifeboat_ps_points_published_total = 1)")

    points = run_json([bin_("lifeboat"), "points", "--json", *repo_args])
    if len(points) != 1 or not points[0]["complete"]:
        raise RuntimeError(f"expected one complete point, the catalog lists {points}")
    point = points[0]
    cycle_s = None
    with open(ag_log_path, errors="replace") as f:
        for line in f:
            if "cycle complete" in line:
                print(f"   agent log: {line.strip()}")
                m = re.search(r"\bseconds=([0-9.]+)", line)
                cycle_s = float(m.group(1)) if m else None
    print(f"== threads by CPU during the run ({wall:.2f} s wall)")
    print(f"  process server (pid {ps.pid}):")
    print("\n".join(ps_s.thread_report(wall)))
    print(f"  agent (pid {agent.pid}, last sample before exit):")
    print("\n".join(ag_s.thread_report(wall)))

    stop_process(ps)
    if ps.returncode not in (0, None):
        print(f"WARNING: process server exited with {ps.returncode} on SIGTERM")

    stored_alloc, stored_apparent = du_bytes(repo_dir)
    src_up = metrics.get("lifeboat_ps_upload_source_bytes_total", 0)
    st_up = metrics.get("lifeboat_ps_upload_stored_bytes_total", 0)
    segs = metrics.get("lifeboat_ps_upload_seconds_count", 0)
    up_sum = metrics.get("lifeboat_ps_upload_seconds_sum", 0)
    print(f"== repository: {stored_alloc / MB:.1f} MB on disk (du), {stored_apparent / MB:.1f} MB apparent; "
          f"{segs:.0f} segments; wire bytes received {metrics.get('lifeboat_ps_received_bytes_total', 0) / MB:.1f} MB; "
          f"non-zero payload {src_up / MB:.1f} MB -> {st_up / MB:.1f} MB stored"
          + (f" (ratio {src_up / st_up:.2f})" if st_up else "")
          + f"; uploader busy {up_sum:.2f} s of {wall:.2f} s")

    # zstd reference on the same image (page cache warm: the agent just read it).
    warm = read_through(image)
    z1 = z2 = zr = None
    if shutil.which("zstd"):
        z1 = time_zstd(image, size, 1)
        z2 = time_zstd(image, size, 2)
        zr = zstd_ratio(image, size)
        print(f"== zstd -1 on the same image, warm page cache (re-read took {warm:.2f} s): "
              f"-T1 {z1[0]:.2f} s = {z1[1]:.0f} MB/s; -T2 {z2[0]:.2f} s = {z2[1]:.0f} MB/s; "
              f"whole-file ratio {zr:.2f}")
    else:
        print("== zstd not installed: no reference figure (Debian: apt-get install zstd)")

    # Test failover of the point, repository read from disk if the cache can be dropped.
    target = os.path.join(work, "restored.img")
    cache_state2 = drop_caches()
    t = time.monotonic()
    out = subprocess.run([bin_("lifeboat"), "failover", "--test", "--point", point["point_id"], "--to", target,
                          "-q", *repo_args], check=True, capture_output=True, text=True).stdout
    restore_s = time.monotonic() - t
    restore_mbs = size / restore_s / MB
    res = json.loads(out.strip().splitlines()[-1])
    print(f"== test failover of {point['point_id']} to {target}: {restore_s:.2f} s = {restore_mbs:.0f} MB/s "
          f"(page cache {cache_state2.split(':')[0]}; includes the materializer's own digest check; "
          f"verified={res.get('verified')})")
    src_sha, dst_sha = sha256(image), sha256(target)
    ok = src_sha == dst_sha
    print(f"{'OK' if ok else 'FAIL'} sha256 source={src_sha} recovered={dst_sha}")

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    rows = [
        ("source MB", f"{size / MB:.1f}"),
        ("seconds (agent start -> point uploaded)", f"{wall:.2f}"),
        ("  of which agent run (start -> exit)", f"{t_agent - t0:.2f}" if t_agent else "n/a"),
        ("  of which the agent's cycle (its log)", f(cycle_s, ".2f")),
        ("MB/s of source data", f"{size / MB / wall:.1f}"),
        ("PS peak RSS MiB (VmHWM)", f"{ps_hwm / 1024:.0f}"),
        ("agent peak RSS MiB (VmHWM)", f"{ag_hwm / 1024:.0f}"),
        ("PS CPU s (during the run; since start)", f"{ps_cpu:.2f}; {ps_cpu_total:.2f}"),
        ("agent CPU s (whole process)", f"{ag_cpu:.2f}"),
        ("stored MB (du of repository)", f"{stored_alloc / MB:.1f}"),
        ("ratio source/stored", f"{size / stored_alloc:.2f}" if stored_alloc else "n/a"),
        ("zstd -1 -T1 MB/s (warm)", f(z1 and z1[1], ".0f") if z1 else "zstd missing"),
        ("zstd -1 -T2 MB/s (warm)", f(z2 and z2[1], ".0f") if z2 else "zstd missing"),
        ("zstd -1 whole-file ratio", f(zr, ".2f")),
        ("restore MB/s (test failover)", f"{restore_mbs:.0f}"),
        ("sha256 match", "OK" if ok else "FAIL"),
        ("page cache dropped before run / restore", f"{cache_state.split(' ')[0]} / {cache_state2.split(' ')[0]}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n== summary")
    print(f"| {'figure':<{width}} | value")
    print(f"|{'-' * (width + 2)}|{'-' * 24}")
    for k, v in rows:
        print(f"| {k:<{width}} | {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
