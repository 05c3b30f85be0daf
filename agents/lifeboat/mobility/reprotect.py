"""Reprotect (failback, first stage): replicate a failed-over disk back to the master target.

Original location: fetch the per-block xxh3-128 digests of the master target's current target
(the old on-prem disk), compare them with the failed-over image's, and send only the blocks that
differ, then a bookmark. Alternate location: the master target creates a new, zero-filled image
and every block that is not zero is sent (the copy is complete: the zero blocks are already there).
Batches go straight to the master target or through a (temporary) process server in forward mode.
The same call, run again with the source quiesced, is the final sync of a planned failover back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import aiohttp

from ..core import logging as log
from ..core.digest import DIGEST_BYTES
from ..core.errors import LifeboatError
from .digest_map import DigestMap, block_count
from .digest_tracker import PendingBatch, device_size, scan_disk
from .sender import API_PREFIX, BatchSender

logger = log.get("lifeboat.mobility.reprotect")
DIGEST_CHUNK_BYTES = 256 * 1024
APPLY_POLL_SECONDS = 0.2
QUEUE_BATCHES = 2  # scanned batches waiting to be sent: bounds memory to ~2 × batch_bytes


class ReprotectError(LifeboatError):
    """Reprotect of disk {}: {}."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    ca_cert: str
    token: str

    def sender(self, timeout_seconds: float = 120.0, retry_max_seconds: float = 10.0) -> BatchSender:
        return BatchSender(self.url, self.ca_cert, self.token, timeout_seconds, retry_max_seconds)


@dataclass
class ReprotectResult:
    disk_id: str
    mode: str
    disk_size: int
    block_size: int
    blocks: int
    changed_bytes: int       # data bytes of differing blocks sent as WRITE frames
    zero_bytes: int          # bytes of differing blocks sent as ZERO frames (no payload)
    read_bytes: int
    sent_body_bytes: int     # batch bodies acknowledged (what crossed the wire, without HTTP/TLS framing)
    digest_bytes: int        # digests received from the master target
    first_seq: int
    last_seq: int
    point_id: str
    applied: bool

    def as_dict(self) -> dict:
        return asdict(self)


async def _reply(resp: aiohttp.ClientResponse) -> dict:
    import json

    raw = await resp.content.read(64 * 1024)
    try:
        body = json.loads(raw)
        return body if isinstance(body, dict) else {}
    except ValueError:
        return {"message": raw[:200].decode(errors="replace")}


async def disk_info(mt: BatchSender, disk_id: str) -> dict:
    assert mt.session
    async with mt.session.get(f"{mt.url}{API_PREFIX}/disks/{disk_id}") as resp:
        body = await _reply(resp)
        if resp.status != 200:
            raise ReprotectError(disk_id, f"master target answered HTTP {resp.status}: {body.get('message', '')}")
        return body


async def fetch_digests(mt: BatchSender, disk_id: str, block_size: int, disk_size: int) -> bytearray:
    """The target's digests; exactly one per block or an error (bounded: never more than expected is read)."""
    assert mt.session
    expected = block_count(disk_size, block_size) * DIGEST_BYTES
    url = f"{mt.url}{API_PREFIX}/disks/{disk_id}/digests"
    async with mt.session.get(url, params={"block_size": str(block_size)}) as resp:
        if resp.status != 200:
            body = await _reply(resp)
            raise ReprotectError(disk_id, f"digests refused: HTTP {resp.status} {body.get('message', '')}")
        out = bytearray()
        while len(out) <= expected:
            chunk = await resp.content.read(min(DIGEST_CHUNK_BYTES, expected - len(out) + 1))
            if not chunk:
                break
            out += chunk
    if len(out) != expected:
        raise ReprotectError(disk_id, f"master target sent {len(out)} digest bytes, expected {expected} "
                             f"({expected // DIGEST_BYTES} blocks of {block_size} bytes)")
    return out


async def create_alternate(mt: BatchSender, disk_id: str, disk_size: int) -> dict:
    assert mt.session
    async with mt.session.post(f"{mt.url}{API_PREFIX}/disks/{disk_id}", json={"size": disk_size}) as resp:
        body = await _reply(resp)
        if resp.status != 201:
            raise ReprotectError(disk_id, f"master target did not create an alternate image: HTTP {resp.status} "
                                 f"{body.get('message', '')}")
        return body


async def failback_action(mt: BatchSender, disk_id: str, action: str, **extra) -> dict:
    assert mt.session
    async with mt.session.post(f"{mt.url}{API_PREFIX}/disks/{disk_id}/failback",
                               json={"action": action, **extra}) as resp:
        body = await _reply(resp)
        if resp.status != 200:
            raise ReprotectError(disk_id, f"failover back {action} refused: HTTP {resp.status} {body.get('message', '')}")
        return body


async def wait_seq(mt: BatchSender, disk_id: str, key: str, seq: int, timeout: float) -> dict:
    """Poll the master target until its `key` (acked_seq or applied_seq) reaches seq."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await disk_info(mt, disk_id)
        if int(info[key]) >= seq:
            return info
        if loop.time() > deadline:
            raise ReprotectError(disk_id, f"{key} is {info[key]}, not {seq}, after {timeout:g} s; "
                                 "check the master target's /healthz (and the process server's, when forwarding)")
        await asyncio.sleep(APPLY_POLL_SECONDS)


async def failback(source: str | None, disk_id: str, master_target: Endpoint, via: Endpoint | None = None,
                   stage: str = "all", wait_timeout: float = 600.0, rollback_point: str | None = None,
                   **reprotect_kw) -> dict:
    """Planned failover back. prepare: hold the target, final sync (journaled, not applied; cancellable);
    switch: apply it, the on-prem disk is then at the final point; cancel: drop it; all: prepare + switch;
    rollback: switch the on-prem disk back to an earlier retained failback point (`rollback_point`).
    Quiesce (or stop) the failed-over machine before prepare: the final point is what the source holds then."""
    out: dict = {"disk_id": disk_id, "stage": stage}
    async with master_target.sender() as mt:
        if stage in ("prepare", "all"):
            if not source:
                raise ReprotectError(disk_id, "--source-image is required to prepare a failover back")
            info = await disk_info(mt, disk_id)
            # Everything from before is applied first, so that a cancel drops only the final sync.
            await wait_seq(mt, disk_id, "applied_seq", int(info["acked_seq"]), wait_timeout)
            await failback_action(mt, disk_id, "hold")
            res = await reprotect(source, disk_id, master_target, via, wait=False, wait_timeout=wait_timeout,
                                  **reprotect_kw)
            await wait_seq(mt, disk_id, "acked_seq", res.last_seq, wait_timeout)
            out.update(res.as_dict())
            out["stage"] = stage
        if stage == "rollback":
            if not rollback_point:
                raise ReprotectError(disk_id, "--point is required to switch back to an earlier point")
            reply = await failback_action(mt, disk_id, "rollback", point_id=rollback_point)
            out.update(applied_seq=reply["applied_seq"], point_id=rollback_point, applied=True)
        if stage == "cancel":
            reply = await failback_action(mt, disk_id, "cancel")
            out.update(dropped=reply["dropped"], applied_seq=reply["applied_seq"], applied=False)
        if stage in ("switch", "all"):
            reply = await failback_action(mt, disk_id, "switch")
            info = await wait_seq(mt, disk_id, "applied_seq", int(reply["acked_seq"]), wait_timeout)
            out.update(applied_seq=info["applied_seq"], applied=True, point_id=(info["points"] or [{}])[-1].get(
                "point_id", out.get("point_id")))
    logger.info("failover back", DISK=disk_id, stage=stage, applied=out.get("applied"), POINT=out.get("point_id"))
    return out


async def reprotect(source: str, disk_id: str, master_target: Endpoint, via: Endpoint | None = None,
                    alternate: bool = False, block_size: int = 64 * 1024, batch_bytes: int = 16 * 1024 * 1024,
                    extent_max: int = 1024 * 1024, machine: str | None = None, point_id: str | None = None,
                    consistency: str = "none", wait: bool = True, wait_timeout: float = 600.0) -> ReprotectResult:
    """Send `source` (the failed-over image) to `disk_id` on the master target; see the module docstring."""
    # A bookmark must name the machine that owns the disk (<machine>.<disk>), or every reader refuses it.
    owner = disk_id.split(".", 1)[0]
    if machine is None:
        machine = owner
    elif machine != owner:
        raise ReprotectError(disk_id, f"--machine {machine!r} does not own disk {disk_id} (its machine is {owner!r}): "
                             "leave --machine out, or name the disk <machine>.<disk>")
    size = device_size(source)
    point_id = point_id or f"reprotect-{int(time.time())}"
    async with master_target.sender() as mt:
        if alternate:
            await create_alternate(mt, disk_id, size)
            # The master target has just created the image zero-filled: every block that is not
            # zero is sent, zero blocks already match (a sparse image stays sparse).
            digests = DigestMap.fresh("", block_size, size, replica_is_zero=True).digests
            digest_bytes = 0
        else:
            info = await disk_info(mt, disk_id)
            if int(info["disk_size"]) != size:
                raise ReprotectError(disk_id, f"the master target's disk holds {info['disk_size']} bytes, the source "
                                     f"{source} {size}: reprotect to an alternate location (--alternate) instead")
            digests = await fetch_digests(mt, disk_id, block_size, size)
            digest_bytes = len(digests)
        dmap = DigestMap("", block_size, size, digests, 0, 0)
        dest_cm = via.sender() if via else None
        dest = await dest_cm.__aenter__() if dest_cm else mt
        try:
            first_seq = await dest.acked_seq(disk_id) + 1
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[PendingBatch] = asyncio.Queue(QUEUE_BATCHES)
            stop = False

            def put(p: PendingBatch) -> None:
                asyncio.run_coroutine_threadsafe(queue.put(p), loop).result()

            def bookmark(image_digest: str) -> dict:
                return {"point_id": point_id, "machine": machine, "created": time.time(), "consistency": consistency,
                        "cycle": 0, "block_size": block_size, "image_digest": image_digest}

            scan = loop.run_in_executor(None, lambda: scan_disk(source, disk_id, dmap, first_seq, extent_max,
                                                                batch_bytes, bookmark, put, lambda: stop))
            last_seq = first_seq
            try:
                while True:
                    pending = await queue.get()
                    # The scan builds version 2 batches (flag: the agent compressed): make that true, as the
                    # agent does, so the master target (or the temporary process server) carries zstd bytes.
                    await loop.run_in_executor(None, pending.builder.compress_frames)
                    await dest.send(disk_id, pending.builder.seq, pending.builder.to_bytes())
                    last_seq = pending.builder.seq
                    if pending.last:
                        break
                result = await scan
            except BaseException:
                stop = True
                while not scan.done():  # unblock a scanner waiting on the full queue
                    try:
                        queue.get_nowait()
                    except asyncio.QueueEmpty:
                        await asyncio.sleep(0.01)
                raise
            sent = dest.sent_bytes
        finally:
            if dest_cm:
                await dest_cm.__aexit__(None, None, None)
        applied = False
        if wait:
            deadline = loop.time() + wait_timeout
            while not applied:
                info = await disk_info(mt, disk_id)
                applied = int(info["applied_seq"]) >= last_seq
                if not applied:
                    if loop.time() > deadline:
                        raise ReprotectError(disk_id, f"sequence {last_seq} not applied after {wait_timeout:g} s "
                                             f"(applied: {info['applied_seq']}); check the master target's /healthz")
                    await asyncio.sleep(APPLY_POLL_SECONDS)
    res = ReprotectResult(disk_id, "alternate" if alternate else "original", size, block_size,
                          block_count(size, block_size), result.changed_bytes, result.zero_bytes, result.read_bytes,
                          sent, digest_bytes, first_seq, last_seq, point_id, applied)
    logger.info("reprotect sent", DISK=disk_id, mode=res.mode, changed_bytes=res.changed_bytes,
                sent_bytes=res.sent_body_bytes, digest_bytes=digest_bytes, first_seq=first_seq, last_seq=last_seq,
                POINT=point_id, applied=applied)
    return res
