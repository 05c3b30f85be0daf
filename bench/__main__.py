"""`python -m bench`: generate a mixed disk image, run each benchmark several times side by side with
its same-run reference, print one table (figure | Lifeboat | reference | ratio | goal | pass/fail).

    python -m bench                  # 1 GiB image, 3 repetitions
    python -m bench --quick          # 512 MiB, 3 repetitions (about 1 minute on 2 cores)
    python -m bench --quick --smoke  # 32 MiB, 1 repetition (CI: checks the suite runs, not its speed)
    python -m bench --size 2G --reps 5

Exit status: 0 when every benchmark ran (goals missed are reported as FAIL in the table, not as an
error); 1 when something broke (a daemon error, a timeout, a recovered image differing from the source).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import traceback

from . import ceiling, replication, scale
from . import failover_log_growth
from .common import AGENT_POOL_BYTES, MB, MiB, Row, format_table, median, not_measured, read_through
from .initial_replication import generate_image, parse_size, settle, sha256

HERE = os.path.dirname(os.path.abspath(__file__))
RATIO_GOAL = 0.70
PS_RSS_GOAL_MIB = 256
AGENT_RSS_GOAL_MIB = 128 + AGENT_POOL_BYTES / MiB
FLAT_GROWTH = 1.25  # "flat": peak RSS grows by at most 25% when the disk size doubles
DELTA_GOAL_S = 5.0
RPO_GOAL_S = 10.0
RTO_GOAL_S = 30.0
RTO_SIZE = 4 << 30       # the RTO goal's point size
RPO_RATE = 20e6          # bytes/s of random 64 KiB writes
RPO_INTERVAL_S = 5.0     # seconds between points
AZURE_GOAL = 1.0
CONCURRENT_AGENTS = 8
DISK_COUNTS = (1, 4, 16)


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, help="image size (default 1G; --quick 512M; --smoke 32M)")
    ap.add_argument("--reps", type=int, help="repetitions of each benchmark (default 3; --smoke 1)")
    ap.add_argument("--quick", action="store_true", help="a 512 MiB image")
    ap.add_argument("--smoke", action="store_true", help="with --quick: 32 MiB, one repetition (CI)")
    ap.add_argument("--work", default=os.path.join(HERE, "work", "suite"), help="work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a replication is declared stuck")
    args = ap.parse_args(argv)
    size = args.size or (32 * MiB if args.smoke else 512 * MiB if args.quick else 1 << 30)
    reps = args.reps or (1 if args.smoke else 3)
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t_start = time.monotonic()
    try:
        rows = run(args, size, reps, work)
    except Exception:
        traceback.print_exc()
        log("FAIL: a benchmark broke (see above); no table")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"\n== machine: {os.cpu_count()} CPUs, {mem_gib():.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}; image {fmt_size(size)} mixed (39% zero, 29% text, 32% random); "
        f"median of {reps}; {time.monotonic() - t_start:.0f} s in all")
    log(format_table(rows))
    return 0


def mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        return 0.0


def rto_at(work: str, image: str, big: int, key: bytes, timeout: float) -> tuple[int, float, float]:
    """Replicate a `big` image (copies of `image`) once, then time one test failover of it and one
    same-run ceiling restore; both images are compared with the source. (size, seconds, ceiling seconds)."""
    src = os.path.join(work, "rto-source.img")
    with open(image, "rb") as f, open(src, "wb") as out:
        while out.tell() < big:   # in 16 MiB pieces: this process's RSS must stay small (it forks the agents)
            f.seek(0)
            while (piece := f.read(min(16 * MiB, big - out.tell()))):
                out.write(piece)
    src_sha = sha256(src)
    read_through(src)
    log(f"== RTO: {fmt_size(big)} point (the image repeated)")
    rep = replication.initial(os.path.join(work, "rto", "lab"), src, timeout * 4)
    log(f"-- RTO: initial replication of {fmt_size(big)}: {big / rep.seconds / MB:.0f} MB/s from agent ready")
    target = os.path.join(work, "rto-restored.img")
    seg_dir = os.path.join(work, "rto", "ceiling")
    try:
        read_through(src)
        ceiling.replicate(src, seg_dir, key)
        settle()
        seconds = replication.failover(rep.lab, target, src_sha)
        replication.drop_target(target)
        settle()
        ceil_s = ceiling.restore(seg_dir, target, big, key)
        if sha256(target) != src_sha:
            raise RuntimeError("the ceiling's 4 GiB restore differs from the source: the reference is wrong")
    finally:
        rep.lab.close()
        replication.drop_target(target)
        replication.drop_target(src)
        shutil.rmtree(os.path.join(work, "rto"), ignore_errors=True)
    log(f"-- RTO: Lifeboat failover {seconds:.1f} s ({big / seconds / MB:.0f} MB/s), ceiling restore {ceil_s:.1f} s "
        f"({big / ceil_s / MB:.0f} MB/s); both images bit-exact")
    return big, seconds, ceil_s


def rpo_row(work: str, args) -> Row:
    """RPO under sustained churn (bench/cycle.py): 20 MB/s of random 64 KiB writes to ext4 on a loop
    device, tracepoint tracker, reflink snapshots, a point every 5 s; p50/p99 of now − newest durable point."""
    figure, goal = "RPO under churn (20 MB/s, a point every 5 s, tracepoint, reflink)", f"p99 ≤ {RPO_GOAL_S:.0f} s"
    if os.geteuid() != 0:
        return not_measured(figure, goal, "needs root (loop devices, mount, tracefs): run as root or bench/cycle.py")
    from pathlib import Path
    from . import cycle  # imports demo/blockdev.py
    seconds, disk_mib = (10, 128) if args.smoke else (30, 512) if args.quick else (60, 1024)
    log(f"== RPO: {seconds} s of {RPO_RATE / 1e6:g} MB/s random 64 KiB writes on a {disk_mib} MiB ext4, "
        f"points every {RPO_INTERVAL_S:g} s")
    r = cycle.run_interval(Path(work) / "rpo", RPO_INTERVAL_S, seconds, RPO_RATE, disk_mib)
    if not r["verified"]:
        raise RuntimeError("RPO run: the newest point's failover differs from its reflink snapshot")
    p50, p99 = cycle.percentile(r["rpo"], 50), cycle.percentile(r["rpo"], 99)
    log(f"-- RPO: {len(r['rpo'])} samples over {r['cycles']} cycles: p50 {p50:.1f} s, p99 {p99:.1f} s; cycle p50 "
        f"{cycle.percentile(r['cycle_s'], 50):.2f} s, freeze p50 {cycle.percentile(r['freeze_ms'], 50):.0f} ms; "
        "newest point failed over bit-exact")
    return Row(figure + f", {seconds} s", f"p50 {p50:.1f} s, p99 {p99:.1f} s ({r['cycles']} points)", "—", None, goal,
               p99 <= RPO_GOAL_S)


def ratio_row(figure: str, lb: float | None, ref: float | None, unit: str, goal: float, ref_name: str) -> Row:
    r = lb / ref if lb and ref else None
    return Row(figure, f"{lb:.0f} {unit}", f"{ref:.0f} {unit} ({ref_name})", r, f"≥ {goal:.2f}",
               None if r is None else r >= goal)


def run(args, size: int, reps: int, work: str) -> list[Row]:
    image = os.path.join(work, "source.img")
    t = time.monotonic()
    counts = generate_image(image, size, args.seed)
    log(f"== image {image}: {fmt_size(size)}, 1 MiB regions {counts}, generated in {time.monotonic() - t:.1f} s")
    src_sha = sha256(image)
    key = os.urandom(32)
    target = os.path.join(work, "restored.img")
    lb_rep, ceil_rep, lb_fo, ceil_fo, restic_s = [], [], [], [], []
    ps_hwm, ag_hwm, startups = [], [], []
    last = None
    for i in range(reps):
        rep_dir = os.path.join(work, f"rep{i}")
        read_through(image)  # both sides read the image from a warm page cache
        rep = replication.initial(os.path.join(rep_dir, "lab"), image, args.timeout)
        try:
            lb_rep.append(size / rep.seconds / MB)
            startups.append(rep.startup_seconds)
            ps_hwm.append(rep.ps_hwm_mib)
            ag_hwm.append(rep.agent_hwm_mib)
            read_through(image)
            seg_dir = os.path.join(rep_dir, "ceiling")
            ceil_rep.append(size / ceiling.replicate(image, seg_dir, key) / MB)
            log(f"-- rep {i + 1}/{reps} replication: Lifeboat {lb_rep[-1]:.0f} MB/s ({rep.seconds:.2f} s from agent ready, "
                f"after {rep.startup_seconds:.2f} s of start-up; agent exit {rep.agent_seconds:.2f} s), ceiling {ceil_rep[-1]:.0f} MB/s; peak RSS PS {rep.ps_hwm_mib:.0f} MiB, "
                f"agent {rep.agent_hwm_mib:.0f} MiB")
            check = i == 0  # prove both restores right once; later repetitions are timed only
            settle()
            lb_fo.append(size / replication.failover(rep.lab, target, src_sha if check else None) / MB)
            replication.drop_target(target)
            settle()
            ceil_fo.append(size / ceiling.restore(seg_dir, target, size, key) / MB)
            if check and sha256(target) != src_sha:
                raise RuntimeError("the ceiling's restore differs from the source: the reference is wrong")
            replication.drop_target(target)
            shutil.rmtree(seg_dir, ignore_errors=True)
            log(f"-- rep {i + 1}/{reps} failover: Lifeboat {lb_fo[-1]:.0f} MB/s, ceiling {ceil_fo[-1]:.0f} MB/s")
            read_through(image)
            rs = replication.restic_backup(rep_dir, image)
            if rs is not None:
                restic_s.append(size / rs / MB)
                log(f"-- rep {i + 1}/{reps} restic backup: {restic_s[-1]:.0f} MB/s")
        finally:
            if i < reps - 1:
                rep.lab.close()
                shutil.rmtree(rep_dir, ignore_errors=True)
            else:
                last = rep

    # RTO of a 4 GiB point (full runs only): the image is the suite's image repeated, which changes
    # nothing for Lifeboat (frames are compressed one by one, nothing is deduplicated).
    rto_point = None
    if not args.quick and size < RTO_SIZE:
        rto_point = rto_at(work, image, RTO_SIZE, key, args.timeout)

    # Memory at half the size: flat means the peak does not follow the disk size.
    half = size // 2
    half_image = os.path.join(work, "half.img")
    generate_image(half_image, half, args.seed)
    read_through(half_image)
    hrep = replication.initial(os.path.join(work, "half", "lab"), half_image, args.timeout)
    hrep.lab.close()
    os.unlink(half_image)
    shutil.rmtree(os.path.join(work, "half"), ignore_errors=True)
    log(f"-- memory at {fmt_size(half)}: peak RSS PS {hrep.ps_hwm_mib:.0f} MiB, agent {hrep.agent_hwm_mib:.0f} MiB")

    # Delta on the last repetition's deployment (the image changes from here on).
    deltas = []
    try:
        for i in range(reps):
            d = replication.delta(last.lab, image, size, args.seed + 100 + i, args.timeout)
            if not d.point_after_write:
                raise RuntimeError("the point published after the churn was captured before its last write")
            deltas.append(d)
            log(f"-- delta {i + 1}/{reps}: {d.churned_bytes / MiB:.1f} MiB churned, {d.received_bytes / MiB:.1f} MiB sent; {d.seconds:.2f} s from the last "
                f"write to the durable point (agent run {d.agent_seconds:.2f} s)")
    finally:
        last.lab.close()

    # Azurite: Lifeboat into a fresh Azurite against a plain upload of the raw image into another.
    az_lb, az_plain = [], []
    for i in range(reps):
        read_through(image)
        lb_s, plain_s = scale.azure_vs_plain(os.path.join(work, f"azure{i}"), image, args.timeout)
        shutil.rmtree(os.path.join(work, f"azure{i}"), ignore_errors=True)
        az_lb.append(size / lb_s / MB)
        az_plain.append(size / plain_s / MB)
        log(f"-- azure {i + 1}/{reps}: Lifeboat to Azurite {az_lb[-1]:.0f} MB/s, plain upload_blob {az_plain[-1]:.0f} MB/s")

    # One process server, 8 agents at once (512 MiB each in a full run; smaller for --quick).
    agents_size = 512 * MiB if size >= 1 << 30 else max(8 * MiB, size // 4)
    agents_image = os.path.join(work, "agents.img")
    generate_image(agents_image, agents_size, args.seed + 7)
    read_through(agents_image)
    many = scale.many_agents(os.path.join(work, "agents"), agents_image, CONCURRENT_AGENTS, args.timeout)
    shutil.rmtree(os.path.join(work, "agents"), ignore_errors=True)
    os.unlink(agents_image)
    many_mbs = CONCURRENT_AGENTS * agents_size / many.seconds / MB
    log(f"-- {CONCURRENT_AGENTS} agents x {fmt_size(agents_size)}: {many.seconds:.1f} s ({many_mbs:.0f} MB/s in all); "
        f"peak RSS PS {many.ps_hwm_mib:.0f} MiB, largest agent {many.agent_hwm_mib:.0f} MiB")

    # 1, 4 and 16 disks of one agent, the same bytes in all (half the image, cut into n disks).
    scaling_image = os.path.join(work, "scaling.img")
    with open(image, "rb") as src, open(scaling_image, "wb") as dst:
        dst.write(src.read(half))
    scaled = scale.disks_scaling(os.path.join(work, "scaling"), scaling_image, DISK_COUNTS, args.timeout)
    os.unlink(scaling_image)
    scaled_mbs = {n: half / s / MB for n, s in scaled.items()}
    log("-- scaling: " + ", ".join(f"{n} disks {v:.0f} MB/s" for n, v in scaled_mbs.items()))

    rows: list[Row] = []
    lb, ref = median(lb_rep), median(ceil_rep)
    rows.append(ratio_row(f"initial replication, {fmt_size(size)}", lb, ref, "MB/s", RATIO_GOAL,
                          "read+zstd+AEGIS+write, 1 proc"))
    su = median(startups)
    with_su = size / (size / lb / MB + su) / MB
    rows.append(Row("agent start-up (process start → READY=1)",
                    f"{su:.2f} s (with it: {with_su:.0f} MB/s, {with_su / ref:.2f} of the ceiling)", "—", None,
                    "— (the row above is timed from READY=1)", None))
    lbf, reff = median(lb_fo), median(ceil_fo)
    rows.append(ratio_row(f"failover --test materialisation, {fmt_size(size)}", lbf, reff, "MB/s", RATIO_GOAL,
                          "read+decrypt+unzstd+write, 1 proc"))
    rto = size / lbf / MB
    if rto_point is not None:
        rto_size, rto_s, rto_ceil_s = rto_point
        rows.append(ratio_row(f"failover --test materialisation, {fmt_size(rto_size)} (once)", rto_size / rto_s / MB,
                              rto_size / rto_ceil_s / MB, "MB/s", RATIO_GOAL, "read+decrypt+unzstd+write, 1 proc"))
        rows.append(Row(f"RTO to a local image, {fmt_size(rto_size)}", f"{rto_s:.1f} s", "—", None,
                        f"≤ {RTO_GOAL_S:.0f} s", rto_s <= RTO_GOAL_S))
    else:
        rows.append(Row(f"RTO to a local image, {fmt_size(size)}", f"{rto:.1f} s", "—", None, "≤ 30 s at 4 GiB",
                        (rto <= RTO_GOAL_S) if size >= RTO_SIZE else None,
                        "" if size >= RTO_SIZE else f"— (measured at {fmt_size(size)}, goal is for 4 GiB; "
                        "a full run measures 4 GiB too)"))
    if restic_s:
        rr = median(restic_s)
        rows.append(Row(f"vs restic backup, {fmt_size(size)}", f"{lb:.0f} MB/s", f"{rr:.0f} MB/s (restic 1 repo, local)",
                        lb / rr, "> 1.0 (aim 1.5)", lb / rr > 1.0))
    else:
        rows.append(Row(f"vs restic backup, {fmt_size(size)}", f"{lb:.0f} MB/s", "n/a (restic not installed)", None,
                        "> 1.0 (aim 1.5)", None, "n/a (restic not installed)"))
    ps_full, ag_full = median(ps_hwm), median(ag_hwm)  # each run's peak; median as the half-size run is one
    for name, small, full, goal in (("process server", hrep.ps_hwm_mib, ps_full, PS_RSS_GOAL_MIB),
                                    ("agent", hrep.agent_hwm_mib, ag_full, AGENT_RSS_GOAL_MIB)):
        flat = full <= small * FLAT_GROWTH
        goal_text = f"≤ {goal:.0f} MiB" + (" (128 + 64 pool)" if name == "agent" else "") + ", flat"
        rows.append(Row(f"{name} peak RSS, {fmt_size(half)} → {fmt_size(size)}", f"{small:.0f} → {full:.0f} MiB",
                        f"{goal:.0f} MiB", full / goal, goal_text, full <= goal and flat))
    dm = median([d.seconds for d in deltas])
    rows.append(Row(f"delta: 1% 64 KiB churn → durable point, {fmt_size(size)}", f"{dm:.2f} s", "—", None,
                    f"≤ {DELTA_GOAL_S:.0f} s", dm <= DELTA_GOAL_S))
    rows.append(ratio_row(f"Azurite vs plain blob upload, {fmt_size(size)}", median(az_lb), median(az_plain), "MB/s",
                          AZURE_GOAL, f"upload_blob, max_concurrency {scale.PLAIN_UPLOAD_CONCURRENCY}"))
    rows.append(rpo_row(work, args))
    rows.append(Row(f"PS peak RSS, {CONCURRENT_AGENTS} agents × {fmt_size(agents_size)} at once",
                    f"{many.ps_hwm_mib:.0f} MiB ({many_mbs:.0f} MB/s in all)", f"{PS_RSS_GOAL_MIB} MiB",
                    many.ps_hwm_mib / PS_RSS_GOAL_MIB, f"≤ {PS_RSS_GOAL_MIB} MiB", many.ps_hwm_mib <= PS_RSS_GOAL_MIB))
    rows.append(Row(f"scaling 1/4/16 disks, {fmt_size(half)} in all", " / ".join(f"{v:.0f}" for v in scaled_mbs.values())
                    + " MB/s", f"{scaled_mbs[1]:.0f} MB/s (1 disk)", scaled_mbs[16] / scaled_mbs[1],
                    "— (16 disks / 1 disk)", None))
    # Replay time with and without a checkpoint (bench/failover_log_growth.py; its own small disk).
    rows.append(failover_log_growth.row(os.path.join(work, "log-growth"), 8 * MiB if args.smoke else 64 * MiB,
                                        4 if args.smoke else 50, reps))
    return rows


if __name__ == "__main__":
    sys.exit(main())
