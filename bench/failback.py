"""`python -m bench.failback`: reprotect speeds through a real master target (alternate = full copy; original = digest compare).

    python -m bench.failback --size 256M --changed 0.01

Prints one line per figure; every run ends by comparing the on-prem image's SHA-256 with the source.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

from .common import Lab, MiB
from .initial_replication import bin_, free_port, generate_image, parse_size, sha256, wait_healthy

BLOCK = 64 * 1024


def reprotect(mt_url: str, ca: str, token: str, source: str, disk: str, *extra: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    out = subprocess.run([bin_("lifeboat"), "reprotect", "--source-image", source, "--disk", disk, "--master-target",
                          mt_url, "--ca-cert", ca, "--token-file", token, "--json", *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.failback")
    ap.add_argument("--size", default="256M")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of blocks changed before the original pass")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="lb-bench-failback-")
    mt = None
    try:
        lab = Lab(os.path.join(work, "lab"))
        source = os.path.join(work, "failed-over.img")
        generate_image(source, size, seed=5)
        token = os.path.join(work, "sender.token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(24))
        state = os.path.join(work, "mt-state")
        cli = [bin_("lifeboat"), "master-target", "--state-dir", state]
        subprocess.run([*cli, "add-sender", "--name", "bench", "--token-file", token], check=True, capture_output=True)
        port, mport = free_port(), free_port()
        conf = os.path.join(work, "mt.toml")
        with open(conf, "w") as f:
            f.write(f'state_dir = "{state}"\n[ingest]\nhost = "127.0.0.1"\nport = {port}\n'
                    f'tls_cert = "{lab.init["server_cert"]}"\ntls_key = "{lab.init["server_key"]}"\n'
                    f'[metrics]\nhost = "127.0.0.1"\nport = {mport}\n[log]\nformat = "kv"\n')
        mt = subprocess.Popen([bin_("lifeboat-master-target"), "-c", conf], stderr=lab.log)
        wait_healthy(mport, mt)
        url, ca = f"https://127.0.0.1:{port}", lab.init["ca_cert"]

        res, secs = reprotect(url, ca, token, source, "bench.alt", "--alternate", "--new-disk", "bench.alt")
        copy = os.path.join(state, "alternate", "bench.alt.img")
        assert sha256(copy) == sha256(source), "alternate copy differs from the source"
        print(f"alternate-location reprotect (full copy, applied): {size / MiB:.0f} MiB in {secs:.2f} s = "
              f"{size / 1e6 / secs:.0f} MB/s; wire {res['sent_body_bytes'] / MiB:.1f} MiB "
              f"(zero blocks: already zero in the new image)")

        onprem = os.path.join(work, "onprem.img")
        shutil.copyfile(copy, onprem)
        subprocess.run([*cli, "add-disk", "--disk", "bench.orig", "--target", onprem], check=True, capture_output=True)
        rng = random.Random(7)
        blocks = size // BLOCK
        picked = rng.sample(range(blocks), max(1, int(blocks * args.changed)))
        with open(source, "r+b") as f:
            for b in picked:
                f.seek(b * BLOCK)
                f.write(rng.randbytes(BLOCK))
        res, secs = reprotect(url, ca, token, source, "bench.orig")
        assert sha256(onprem) == sha256(source), "original-location reprotect left the images different"
        changed = len(picked) * BLOCK
        print(f"original-location reprotect ({len(picked)} of {blocks} blocks changed): {secs:.2f} s for "
              f"{size / MiB:.0f} MiB compared = {size / 1e6 / secs:.0f} MB/s; wire {res['sent_body_bytes']} bytes "
              f"for {changed} changed ({res['sent_body_bytes'] / changed:.3f}x), digests {res['digest_bytes']} bytes")
        return 0
    finally:
        if mt and mt.poll() is None:
            mt.terminate()
            mt.wait(30)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
