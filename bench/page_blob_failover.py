"""Page-blob failover to Azurite: `failover --to-azure` MB/s, against the SDK's own page-blob upload.

    .venv/bin/python -m bench.page_blob_failover                 # 256 MiB mixed image, 3 repetitions
    .venv/bin/python -m bench.page_blob_failover --size 1G --reps 3

Per repetition, each case on a fresh Azurite (it slows when reused, PERF-LIMITS.md):
  1. upload stage: PageBlobTarget.upload (4 MiB ranges, 4 in flight, MD5 per range, holes and zero
     ranges skipped, footer last) vs the SDK's BlobClient.upload_blob(blob_type=PageBlob,
     max_concurrency=4) of the same file (which also skips all-zero 4 MiB chunks, writes no footer);
  2. end to end: `lifeboat failover --test --to-azure` (materialise to a staging image, upload,
     descriptors) vs `lifeboat failover --test --to img` (materialise only), from one replicated point.
The first repetition downloads the blob and compares its data part with the source (SHA-256).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid

from azure.storage.blob import BlobServiceClient
from azure.storage.blob.aio import BlobClient

from lifeboat.repository.page_blob_target import PageBlobTarget
from lifeboat.repository.vhd import parse_footer, rounded_size

from .common import MB, MiB, Lab, Row, format_table, median
from .initial_replication import generate_image, parse_size, sha256
from .replication import initial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING_RE = re.compile(r"Blob service (?:is )?successfully listen\w* (?:on|at) http://127\.0\.0\.1:(\d+)")
RATIO_GOAL = 0.70


class Azurite:
    """A fresh in-memory Azurite blob service on 127.0.0.1 (node_modules, as ./scripts/setup installs it)."""

    def __init__(self, work: str) -> None:
        binary = os.path.join(ROOT, "node_modules", ".bin", "azurite-blob")
        os.makedirs(work, exist_ok=True)
        self.log = os.path.join(work, "azurite.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--silent",
                                          "--disableTelemetry", "--skipApiVersionCheck", "--inMemoryPersistence"],
                                         cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (m := _LISTENING_RE.search(open(self.log, errors="replace").read())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Azurite did not start; see {self.log}")
            time.sleep(0.05)
        self.conn = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                     f"BlobEndpoint=http://127.0.0.1:{m.group(1)}/devstoreaccount1;")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_blob(conn: str, container: str, blob: str, size: int, want_sha: str) -> None:
    data = BlobServiceClient.from_connection_string(conn).get_blob_client(container, blob).download_blob().readall()
    parse_footer(data[-512:])
    if len(data) != rounded_size(size) + 512 or hashlib.sha256(data[:size]).hexdigest() != want_sha:
        raise RuntimeError(f"{container}/{blob} differs from the source image")


async def lifeboat_upload(conn: str, image: str) -> float:
    t = time.monotonic()
    async with PageBlobTarget(conn, "bench") as target:
        await target.upload(image, "disk.vhd")
    return time.monotonic() - t


async def sdk_upload(conn: str, image: str, size: int) -> float:
    service = BlobServiceClient.from_connection_string(conn)
    service.create_container("sdk")
    service.close()
    t = time.monotonic()
    async with BlobClient.from_connection_string(conn, "sdk", "disk.raw") as blob:
        with open(image, "rb") as f:
            await blob.upload_blob(f, blob_type="PageBlob", length=size, max_concurrency=4)
    return time.monotonic() - t


def run(args) -> list[Row]:
    size, work = args.size, os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    image = os.path.join(work, "disk.img")
    generate_image(image, size, args.seed)
    want = sha256(image)
    up_lb, up_sdk, e2e_azure, e2e_local = [], [], [], []
    rep_work = os.path.join(work, "lab")
    replication = initial(rep_work, image, args.timeout)
    lab: Lab = replication.lab
    try:
        for rep in range(args.reps):
            az = Azurite(os.path.join(work, f"az-{rep}-lb"))
            try:
                up_lb.append(asyncio.run(lifeboat_upload(az.conn, image)))
                if rep == 0:
                    check_blob(az.conn, "bench", "disk.vhd", size, want)
            finally:
                az.close()
            az = Azurite(os.path.join(work, f"az-{rep}-sdk"))
            try:
                up_sdk.append(asyncio.run(sdk_upload(az.conn, image, -(-size // 512) * 512)))
            finally:
                az.close()
            az = Azurite(os.path.join(work, f"az-{rep}-e2e"))
            try:
                conn_file = os.path.join(work, "target.conn")
                with open(conn_file, "w") as f:
                    f.write(az.conn)
                container = f"e2e-{uuid.uuid4().hex[:8]}"
                out = os.path.join(work, f"e2e-{rep}")
                t = time.monotonic()
                proc = lab.failover("latest", out, "--to-azure", container, "--to-azure-connection-string-file",
                                    conn_file)
                e2e_azure.append(time.monotonic() - t)
                if proc.returncode != 0:
                    raise RuntimeError(f"failover --to-azure exited with {proc.returncode}: {proc.stderr[-2000:]}")
                if rep == 0:
                    check_blob(az.conn, container, _blob_of(proc.stdout), size, want)
            finally:
                az.close()
            local = os.path.join(work, f"local-{rep}.img")
            t = time.monotonic()
            proc = lab.failover("latest", local)
            e2e_local.append(time.monotonic() - t)
            if proc.returncode != 0 or (rep == 0 and sha256(local) != want):
                raise RuntimeError(f"local failover failed or differs: {proc.stderr[-2000:]}")
            os.unlink(local)
            print(f"rep {rep + 1}: upload {size / MB / up_lb[-1]:.0f} (SDK {size / MB / up_sdk[-1]:.0f}) MB/s; "
                  f"failover --to-azure {e2e_azure[-1]:.2f} s, --to img {e2e_local[-1]:.2f} s", flush=True)
    finally:
        lab.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    size_txt = f"{size / MiB:g} MiB"
    lb, sdk = size / MB / median(up_lb), size / MB / median(up_sdk)
    az_s, loc_s = median(e2e_azure), median(e2e_local)
    return [
        Row(f"page-blob upload to Azurite, {size_txt}", f"{lb:.0f} MB/s", f"{sdk:.0f} MB/s (SDK upload_blob PageBlob)",
            lb / sdk, f"≥ {RATIO_GOAL:.2f}", lb / sdk >= RATIO_GOAL),
        Row(f"failover --to-azure end to end, {size_txt}", f"{size / MB / az_s:.0f} MB/s ({az_s:.2f} s)",
            f"{size / MB / loc_s:.0f} MB/s (--to img, {loc_s:.2f} s)", loc_s / az_s, "—", None),
    ]


def _blob_of(stdout: str) -> str:
    """The blob name in the first JSON line's URL (http://host:port/account/container/blob)."""
    return json.loads(stdout.splitlines()[0])["blob_url"].split("/", 5)[5]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.page_blob_failover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=256 * MiB)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", default=os.path.join(HERE, "work", "page_blob_failover"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
