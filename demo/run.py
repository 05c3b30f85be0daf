"""Main job: replicate a live sample disk through a real process server, then test-fail-over and prove it.

Runs `lifeboat init`, starts `lifeboat-process-server` and a writer on a sample image, runs
`lifeboat-mobility` for several cycles (its pre/post scripts pause the writer and record the
image's SHA-256 at each point), then test-fails-over to the first and the last point and prints
OK only if each recovered image's SHA-256 equals the source's at that point.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from lab import DEMO_DIR, Lab, sha256_file


def make_sample_image(path: str, size_mib: int) -> None:
    """Some random data, a text region, the rest zero (sparse)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        f.write(os.urandom(8 << 20))
        f.seek((size_mib << 20) // 2)
        f.write(b"Lifeboat demo text block. " * (1 << 16))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=str(DEMO_DIR / "work"))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--interval", type=float, default=2.0)
    args = ap.parse_args()

    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ctl = os.path.join(work, "ctl")
    os.makedirs(ctl)
    image = os.path.join(work, "disk0.img")
    print(f"== sample disk {image} ({args.size_mib} MiB): some data, the rest zero")
    make_sample_image(image, args.size_mib)

    lab = Lab(work)
    print(f"== lifeboat init: repository {lab.init['repository']}")
    writer = None
    try:
        lab.start_ps()
        writer = subprocess.Popen([sys.executable, str(DEMO_DIR / "writer.py"), image, ctl])
        print(f"== process server on 127.0.0.1:{lab.ps_port}, writer running; agent runs {args.cycles} cycles")
        t0 = time.monotonic()
        rc = lab.run_agent("demo", {"disk0": image}, args.cycles,
                           extra={"replication": {"interval_seconds": args.interval},
                                  # the writer is paused for every point (the scripts run each cycle)
                                  "consistency": {"pre_script": str(DEMO_DIR / "pause.sh"),
                                                  "post_script": str(DEMO_DIR / "pause.sh"),
                                                  "app_interval_seconds": 0}},
                           env={"DEMO_CTL": ctl, "DEMO_IMAGE": image})
        if rc != 0:
            print(f"FAIL: agent exited with {rc}; see {lab.log_path}")
            return 1
        print(f"== agent done in {time.monotonic() - t0:.1f} s; waiting for uploads")
        open(os.path.join(ctl, "stop"), "w").close()
        writer.wait(10)
        try:
            pts = lab.wait_points(args.cycles)
        except TimeoutError as exc:
            print(f"FAIL: {exc}")
            return 1
        print(lab.cli("points", check=True).stdout, end="")
        crash = [p for p in pts if p["consistency"] in ("crash", "app")]
        if len(crash) < 2:
            print(f"FAIL: expected at least 2 consistent points, got {len(crash)}")
            return 1
        failures = 0
        for p in (crash[0], crash[-1]):
            target = os.path.join(work, f"testfailover-{p['point_id']}.img")
            res = lab.failover(p["point_id"], target)
            if res.returncode != 0:
                print(f"FAIL point {p['point_id']}: {res.stderr.strip()}")
                failures += 1
                continue
            with open(os.path.join(ctl, "oracle", f"{p['point_id']}.sha256")) as f:
                expected = f.read().strip()
            got = sha256_file(target)
            failures += got != expected
            print(f"{'OK' if got == expected else 'FAIL'} point {p['point_id']} sha256 recovered={got} source={expected}")
            os.unlink(target)
        v = lab.cli("verify", "-q")
        print(f"{'OK' if v.returncode == 0 else 'FAIL'} lifeboat verify: {v.stdout.strip().splitlines()[-1]}")
        failures += v.returncode != 0
        return 1 if failures else 0
    finally:
        if writer and writer.poll() is None:
            open(os.path.join(ctl, "stop"), "w").close()
            try:
                writer.wait(10)
            except subprocess.TimeoutExpired:
                writer.kill()
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
