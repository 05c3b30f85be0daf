"""Main job: replicate a live sample disk through a real process server, then test-fail-over and prove it.

Creates a work directory, runs `lifeboat init`, starts `lifeboat-process-server` and a writer on a
sample image, runs `lifeboat-mobility` for several cycles (its pre/post scripts pause the writer
and record the image's SHA-256 at each point), then test-fails-over to the first and the last
point and prints OK only if each recovered image's SHA-256 equals the source's at that point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def bin_(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
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
    with open(image, "wb") as f:
        f.truncate(args.size_mib << 20)
        f.write(os.urandom(8 << 20))
        f.seek((args.size_mib << 20) // 2)
        f.write(b"Lifeboat demo text block. " * (1 << 16))

    out = subprocess.run([bin_("lifeboat"), "init", "--dir", os.path.join(work, "etc")],
                         check=True, capture_output=True, text=True).stdout
    init = json.loads(out)
    print(f"== lifeboat init: repository {init['repository']}")
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
max_bytes = {1 << 30}
[repository]
url = "{init['repository']}"
key_file = "{init['key_file']}"
[metrics]
port = {ps_metrics}
[log]
format = "kv"
""")
    ag_conf = os.path.join(work, "mobility.toml")
    with open(ag_conf, "w") as f:
        f.write(f"""
machine = "demo"
state_dir = "{work}/agent-state"
[process_server]
url = "https://127.0.0.1:{ps_port}"
ca_cert = "{init['ca_cert']}"
token_file = "{init['agent_token']}"
[[disks]]
id = "disk0"
path = "{image}"
[replication]
interval_seconds = {args.interval}
[consistency]
pre_script = "{HERE}/pause.sh"
post_script = "{HERE}/pause.sh"
[metrics]
port = {ag_metrics}
[log]
format = "kv"
""")
    logs = open(os.path.join(work, "daemons.log"), "w")
    procs = []
    try:
        ps = subprocess.Popen([bin_("lifeboat-process-server"), "-c", ps_conf], stderr=logs)
        procs.append(ps)
        writer = subprocess.Popen([sys.executable, os.path.join(HERE, "writer.py"), image, ctl])
        procs.append(writer)
        print(f"== process server on 127.0.0.1:{ps_port}, writer running; agent runs {args.cycles} cycles")
        env = {**os.environ, "DEMO_CTL": ctl, "DEMO_IMAGE": image}
        t0 = time.monotonic()
        rc = subprocess.run([bin_("lifeboat-mobility"), "-c", ag_conf, "--cycles", str(args.cycles)],
                            stderr=logs, env=env).returncode
        if rc != 0:
            print(f"FAIL: agent exited with {rc}; see {work}/daemons.log")
            return 1
        print(f"== agent done in {time.monotonic() - t0:.1f} s; waiting for uploads")
        open(os.path.join(ctl, "stop"), "w").close()
        writer.wait(10)
        repo_args = ["--repo", init["repository"], "--key-file", init["key_file"]]
        deadline = time.monotonic() + 120
        while True:
            pts = json.loads(subprocess.run([bin_("lifeboat"), "points", "--json", *repo_args],
                                            check=True, capture_output=True, text=True).stdout)
            if len(pts) >= args.cycles or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        subprocess.run([bin_("lifeboat"), "points", *repo_args], check=True)
        crash = [p for p in pts if p["consistency"] == "crash" and p["complete"]]
        if len(crash) < 2:
            print(f"FAIL: expected at least 2 crash-consistent points, got {len(crash)}")
            return 1
        failures = 0
        for p in (crash[0], crash[-1]):
            target = os.path.join(work, f"testfailover-{p['point_id']}.img")
            subprocess.run([bin_("lifeboat"), "failover", "--test", "--point", p["point_id"], "--to", target,
                            "-q", *repo_args], check=True, stdout=subprocess.DEVNULL)
            expected = open(os.path.join(ctl, "oracle", f"{p['point_id']}.sha256")).read().strip()
            got = sha256(target)
            ok = got == expected
            failures += not ok
            print(f"{'OK' if ok else 'FAIL'} point {p['point_id']} sha256 recovered={got} source={expected}")
            os.unlink(target)
        v = subprocess.run([bin_("lifeboat"), "verify", "-q", *repo_args], capture_output=True, text=True)
        print(f"{'OK' if v.returncode == 0 else 'FAIL'} lifeboat verify: {v.stdout.strip().splitlines()[-1]}")
        failures += v.returncode != 0
        return 1 if failures else 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
