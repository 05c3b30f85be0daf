"""HTTPS receiver on 9444: the process server's batch protocol, journaled before acknowledgement; digests; new images.

Endpoints (FORMATS.md sections 1 and 12), all with `Authorization: Bearer <registered sender token>`:
- `GET  /api/v1/disks/<disk>`: acked_seq, applied_seq, disk_size and the failback points.
- `PUT  /api/v1/disks/<disk>/batches/<seq>`: the batch wire format and idempotency rules of the
  process server's ingest, verified frame by frame with the same parser while it streams to the journal.
- `GET  /api/v1/disks/<disk>/digests?block_size=N`: the target's per-block xxh3-128 digests once
  everything acknowledged is applied (reprotect, original location).
- `POST /api/v1/disks/<disk>` `{"size": N}`: create a new zero-filled image for an unregistered
  disk id in the alternate directory (reprotect, alternate location).
- `POST /api/v1/disks/<disk>/failback` `{"action": "hold" | "switch" | "cancel" | "rollback"}`:
  failover back. hold: journal but do not apply; switch: apply what is journaled (the disk moves
  to the final point); cancel: drop the held entries, the disk stays where it was (only before
  switch); rollback `{"point_id": P}`: switch the disk back to an earlier retained point (undo records).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

from ..core import logging as log
from ..core.http_reject import BodyLimits, Reject as _Reject, reject_response
from ..core.digest import DIGEST_BYTES, block_digest
from ..core.errors import FrameError
from ..core.wire import DISK_ID_RE, SECTOR_BYTES, BatchParser
from ..process_server.ingest import API_PREFIX, READ_CHUNK_BYTES
from .journal import Journal, JournalError
from .metrics import MasterTargetMetrics
from .registry import Registry, RegistryError, TargetDisk
from .undo import UndoError

logger = log.get("lifeboat.master_target.receiver")
_SEQ_RE = re.compile(r"^[1-9][0-9]{0,18}$")
MAX_JSON_BYTES = 64 * 1024
DIGEST_READ_BYTES = 4 * 1024 * 1024
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 4096, 4 * 1024 * 1024
APPLIED_WAIT_SECONDS = 60.0


class Receiver:
    def __init__(self, registry: Registry, journal: Journal, metrics: MasterTargetMetrics, pool: ThreadPoolExecutor,
                 max_batch_bytes: int, journal_max_bytes: int, retry_after_seconds: int, alternate_dir: str,
                 on_stored: Callable[[str], None], wait_applied, limits: BodyLimits | None = None) -> None:
        self.registry = registry
        self.journal = journal
        self.metrics = metrics
        self.pool = pool
        self.max_batch_bytes = max_batch_bytes
        self.journal_max_bytes = journal_max_bytes
        self.retry_after_seconds = retry_after_seconds
        self.alternate_dir = alternate_dir
        self.on_stored = on_stored          # callback(disk_id): wake the disk's applier
        self.wait_applied = wait_applied    # async (disk_id, timeout) -> bool: everything acked is applied
        self._receiving: set[str] = set()
        self.limits = limits or BodyLimits()   # a stalled or trickling body gets 408, as at the ingest

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_JSON_BYTES)  # bounds request.read(); batches are streamed
        app.router.add_get(API_PREFIX + "/disks/{disk}", self.get_disk)
        app.router.add_post(API_PREFIX + "/disks/{disk}", self.create_disk)
        app.router.add_put(API_PREFIX + "/disks/{disk}/batches/{seq}", self.put_batch)
        app.router.add_get(API_PREFIX + "/disks/{disk}/digests", self.get_digests)
        app.router.add_post(API_PREFIX + "/disks/{disk}/failback", self.failback)
        return app

    # --- common checks ----------------------------------------------------------------------

    def _reject(self, exc: _Reject, request: web.Request) -> web.Response:
        return reject_response(exc, request, self.metrics.rejections, logger)

    def _sender(self, request: web.Request) -> str:
        try:
            self.registry.reload()
        except RegistryError as exc:
            raise _Reject(500, "internal", str(exc)) from None
        auth = request.headers.get("Authorization", "")
        name = self.registry.sender_for(auth[7:].strip()) if auth.startswith("Bearer ") else None
        if name is None:
            raise _Reject(401, "unauthenticated", "missing bearer token or a token no sender is registered with: "
                          "register the sender with 'lifeboat master-target add-sender'", {"WWW-Authenticate": "Bearer"})
        return name

    def _disk_id(self, request: web.Request) -> str:
        disk = request.match_info["disk"]
        if not DISK_ID_RE.fullmatch(disk):
            raise _Reject(400, "bad_request", f"disk id {disk!r} must match {DISK_ID_RE.pattern}")
        return disk

    def _target(self, disk: str) -> TargetDisk:
        target = self.registry.disks.get(disk)
        if target is None:
            raise _Reject(404, "unknown_disk", f"disk {disk} is not registered on this master target: register its "
                          "target with 'lifeboat master-target add-disk', or create one (alternate location)")
        return target

    # --- handlers ---------------------------------------------------------------------------

    async def get_disk(self, request: web.Request) -> web.Response:
        try:
            self._sender(request)
            disk = self._disk_id(request)
            target = self._target(disk)
        except _Reject as exc:
            return self._reject(exc, request)
        return web.json_response(self._disk_state(disk, target))

    def _disk_state(self, disk: str, target: TargetDisk) -> dict:
        dj = self.journal.disk(disk)
        return {"disk_id": disk, "disk_size": target.size, "acked_seq": dj.acked_seq, "applied_seq": dj.applied_seq,
                "applied_bytes": dj.applied_bytes, "lag_bytes": dj.lag_bytes, "held": dj.held, "points": dj.points}

    async def failback(self, request: web.Request) -> web.Response:
        try:
            sender = self._sender(request)
            disk = self._disk_id(request)
            target = self._target(disk)
            try:
                doc = json.loads(await request.read())
                action = doc["action"]
            except (ValueError, KeyError, TypeError):
                raise _Reject(400, "bad_request", 'body must be JSON {"action": "hold" | "switch" | "cancel" | '
                              '"rollback", "point_id": …}') from None
            dj = self.journal.disk(disk)
            loop = asyncio.get_running_loop()
            dropped: list[int] = []
            if action == "hold":
                await loop.run_in_executor(self.pool, self.journal.hold, disk)
            elif action == "switch":
                await loop.run_in_executor(self.pool, self.journal.release, disk)
                self.on_stored(disk)
            elif action == "cancel":
                if not dj.held:
                    raise _Reject(409, "bad_request", f"disk {disk} has no failover back in preparation (or it "
                                  "has switched already: applying cannot be undone)")
                dropped = await loop.run_in_executor(self.pool, self.journal.cancel, disk)
                self.metrics.acked_seq.labels(disk).set(dj.acked_seq)
                self.metrics.lag.labels(disk).set(dj.lag_bytes)
            elif action == "rollback":
                point_id = doc.get("point_id")
                if not isinstance(point_id, str):
                    raise _Reject(400, "bad_request", "rollback needs a point_id (a retained failback point)")
                if not dj.held and not await self.wait_applied(disk, APPLIED_WAIT_SECONDS):
                    raise _Reject(503, "busy", f"disk {disk} still applies journaled batches; retry later",
                                  {"Retry-After": str(self.retry_after_seconds)})
                if disk in self._receiving:
                    raise _Reject(409, "busy", f"a batch for disk {disk} is being received; retry")
                self._receiving.add(disk)  # no batch is taken while the disk is rewound (sequence numbers change)
                try:
                    done = await loop.run_in_executor(self.pool, self.journal.rollback, target, point_id)
                except (JournalError, UndoError) as exc:
                    raise _Reject(409, "bad_request", str(exc)) from None
                finally:
                    self._receiving.discard(disk)
                self.metrics.applied_seq.labels(disk).set(dj.applied_seq)
                self.metrics.acked_seq.labels(disk).set(dj.acked_seq)
                logger.warning("disk switched back to an earlier failback point", DISK=disk, POINT=point_id,
                               restored_bytes=done["restored_bytes"], applied_seq=dj.applied_seq)
            else:
                raise _Reject(400, "bad_request", f"action {action!r} is not hold, switch, cancel or rollback")
        except _Reject as exc:
            return self._reject(exc, request)
        logger.info("failover back", DISK=disk, action=action, sender=sender, dropped=len(dropped),
                    acked_seq=dj.acked_seq, applied_seq=dj.applied_seq)
        return web.json_response({**self._disk_state(disk, target), "dropped": dropped})

    async def create_disk(self, request: web.Request) -> web.Response:
        try:
            sender = self._sender(request)
            disk = self._disk_id(request)
            if disk in self.registry.disks:
                raise _Reject(409, "disk_exists", f"disk {disk} is already registered ({self.registry.disks[disk].path});"
                              " an alternate-location reprotect needs a new disk id")
            try:
                doc = json.loads(await request.read())
                size = doc["size"]
            except (ValueError, KeyError, TypeError):
                raise _Reject(400, "bad_request", 'body must be JSON {"size": <bytes>}') from None
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % SECTOR_BYTES:
                raise _Reject(400, "bad_request", f"size {size!r} must be a positive multiple of {SECTOR_BYTES}")
            os.makedirs(self.alternate_dir, exist_ok=True)
            path = os.path.join(self.alternate_dir, f"{disk}.img")
            if os.path.exists(path):
                raise _Reject(409, "disk_exists", f"{path} already exists; remove it or use another disk id")
            try:
                target = self.registry.add_disk(disk, path, size, create=True)
            except (RegistryError, OSError) as exc:
                raise _Reject(400, "bad_request", f"cannot create {path}: {exc}") from None
        except _Reject as exc:
            return self._reject(exc, request)
        logger.info("alternate-location image created", DISK=disk, path=target.path, size=size, sender=sender)
        return web.json_response({"disk_id": disk, "path": target.path, "disk_size": size}, status=201)

    async def put_batch(self, request: web.Request) -> web.Response:
        try:
            sender = self._sender(request)
            disk = self._disk_id(request)
            seq_text = request.match_info["seq"]
            if not _SEQ_RE.fullmatch(seq_text):
                raise _Reject(400, "bad_request", f"sequence {seq_text!r} is not a positive integer")
            seq = int(seq_text)
            length = request.content_length
            if length is None:
                raise _Reject(411, "bad_request", "Content-Length is required (batches are not sent chunked)")
            if length > self.max_batch_bytes:
                raise _Reject(413, "too_large", f"batch of {length} bytes exceeds the limit of {self.max_batch_bytes}")
            target = self._target(disk)
            dj = self.journal.disk(disk)
            acked = dj.acked_seq
            if seq <= acked:
                self.metrics.batches.labels("duplicate").inc()
                return web.json_response({"status": "duplicate", "seq": seq, "acked_seq": acked})
            if seq != acked + 1:
                raise _Reject(409, "out_of_order", f"expected sequence {acked + 1}, got {seq}", expected_seq=acked + 1)
            if disk in self._receiving:
                raise _Reject(409, "busy", f"another batch for disk {disk} is being received", expected_seq=acked + 1)
            if self.journal.lag_bytes + length > self.journal_max_bytes:
                raise _Reject(503, "journal_full", f"{self.journal.lag_bytes} journaled bytes wait to be applied; "
                              "retry later", {"Retry-After": str(self.retry_after_seconds)})
            return await self._receive(request, target, seq, length, sender)
        except _Reject as exc:
            return self._reject(exc, request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the journal disk failed: answer, count, keep serving
            logger.exception("batch not journaled", path=request.path)
            return self._reject(_Reject(500, "internal", f"batch not journaled: {type(exc).__name__}: {exc}; "
                                        "the sender will retry"), request)

    async def _receive(self, request: web.Request, target: TargetDisk, seq: int, length: int,
                       sender: str) -> web.Response:
        disk = target.disk_id
        self._receiving.add(disk)
        loop = asyncio.get_running_loop()
        # Verify only (compressed frames included): the journal re-reads the entry to apply it.
        parser = BatchParser(expected_disk_id=disk, expected_seq=seq, keep_payloads=False)
        fd = None
        received = 0
        deadline = self.limits.deadline(length)
        try:
            fd = await loop.run_in_executor(self.pool, self.journal.open_partial, disk, seq, length)

            def consume(chunk: bytes) -> None:
                parser.feed(chunk)
                if parser.header is not None and parser.header.disk_size != target.size:
                    # Before a byte of this batch is journaled past the header: nothing changes.
                    raise _Reject(409, "wrong_size", f"batch is for a disk of {parser.header.disk_size} bytes, "
                                  f"the target of {disk} ({target.path}) holds {target.size}: register a target "
                                  "of the source's size (or reprotect to an alternate location)")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

            while True:
                chunk = await self.limits.read(request, min(READ_CHUNK_BYTES, length - received + 1), deadline)
                if not chunk:
                    break
                received += len(chunk)
                if received > length:
                    raise _Reject(400, "bad_request", f"body is longer than its Content-Length {length}")
                await loop.run_in_executor(self.pool, consume, chunk)
            if received < length:
                raise _Reject(400, "truncated", f"body ended after {received} of {length} bytes")
            header = parser.finish()
            size = await loop.run_in_executor(self.pool, self.journal.commit, disk, seq, fd)
            fd = None
        except FrameError as exc:
            await loop.run_in_executor(self.pool, self.journal.discard_partial, disk, seq, fd)
            return self._reject(_Reject(400, "truncated" if "truncated" in str(exc) else "malformed", str(exc)), request)
        except _Reject as exc:
            await loop.run_in_executor(self.pool, self.journal.discard_partial, disk, seq, fd)
            return self._reject(exc, request)
        except BaseException:
            await asyncio.shield(loop.run_in_executor(self.pool, self.journal.discard_partial, disk, seq, fd))
            raise
        finally:
            self._receiving.discard(disk)
        self.journal.published(disk, seq, size)
        self.metrics.received_bytes.inc(received)
        self.metrics.batches.labels("stored").inc()
        self.metrics.acked_seq.labels(disk).set(seq)
        self.metrics.lag.labels(disk).set(self.journal.disk(disk).lag_bytes)
        self.on_stored(disk)
        logger.info("batch journaled", DISK=disk, BATCH=seq, bytes=received, frames=header.frame_count, sender=sender)
        return web.json_response({"status": "stored", "seq": seq, "acked_seq": seq})

    async def get_digests(self, request: web.Request) -> web.StreamResponse:
        try:
            self._sender(request)
            disk = self._disk_id(request)
            target = self._target(disk)
            text = request.query.get("block_size", "")
            bs = int(text) if text.isdigit() else 0
            if bs & (bs - 1) or not MIN_BLOCK_BYTES <= bs <= MAX_BLOCK_BYTES:
                raise _Reject(400, "bad_request", f"block_size {text!r} must be a power of two in "
                              f"{MIN_BLOCK_BYTES}..{MAX_BLOCK_BYTES}")
            if not await self.wait_applied(disk, APPLIED_WAIT_SECONDS):
                raise _Reject(503, "busy", f"disk {disk} still applies journaled batches; retry later",
                              {"Retry-After": str(self.retry_after_seconds)})
        except _Reject as exc:
            return self._reject(exc, request)
        blocks = -(-target.size // bs)
        applied = self.journal.disk(disk).applied_seq
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-Lifeboat-Block-Size": str(bs), "X-Lifeboat-Blocks": str(blocks),
                                           "X-Lifeboat-Applied-Seq": str(applied)})
        resp.content_length = blocks * DIGEST_BYTES
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        step = max(bs, DIGEST_READ_BYTES // bs * bs)
        fd = os.open(target.path, os.O_RDONLY)
        try:
            for offset in range(0, target.size, step):
                want = min(step, target.size - offset)
                digests = await loop.run_in_executor(self.pool, _digest_range, fd, offset, want, bs)
                await resp.write(digests)
                self.metrics.digest_bytes.inc(len(digests))
        finally:
            os.close(fd)
        await resp.write_eof()
        logger.info("digests served", DISK=disk, blocks=blocks, block_size=bs, applied_seq=applied)
        return resp


def _digest_range(fd: int, offset: int, length: int, bs: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"short read at {offset}: {len(data)} of {length} bytes (target shrank?)")
    view = memoryview(data)
    return b"".join(block_digest(view[i: i + bs]) for i in range(0, length, bs))
