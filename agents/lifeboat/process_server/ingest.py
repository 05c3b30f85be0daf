"""HTTPS ingest API on 9443: authenticated, size-capped, streamed to the cache and verified per frame."""

from __future__ import annotations

import asyncio
import os
import hmac
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import xxhash
from aiohttp import web

from ..core import logging as log
from ..core.http_reject import BodyLimits, Reject as _Reject, reject_response
from ..core.errors import FrameError, LifeboatError
from ..core.wire import DISK_ID_RE, BatchParser
from .cache import DiskCache
from .metrics import ProcessServerMetrics

logger = log.get("lifeboat.process_server.ingest")
API_PREFIX = "/api/v1"
MEDIA_TYPE = "application/vnd.lifeboat.batch.v1"
READ_CHUNK_BYTES = 256 * 1024
# Body bytes handed to a worker at once (parse, hash, write): one executor hop per chunk cost a
# thread switch and a future per 256 KiB or less.
HOP_BYTES = 1024 * 1024
_SEQ_RE = re.compile(r"^[1-9][0-9]{0,18}$")
CREDENTIAL_PREFIX = "lbt_"   # per-machine credentials of the configuration server (control/auth.py TOKEN_PREFIX)
# Digests of the last acknowledged batches per disk: a resend of one of them is compared with what was
# stored, so a replayed seq with other content is refused (409 replay_mismatch), not silently "duplicate".
REPLAY_WINDOW_BATCHES = 64
# Batches of one disk received at once: seq may be up to acknowledged + RECEIVE_WINDOW. They are
# received and fsynced side by side but published and acknowledged strictly in seq order, so an
# agent keeps a window in flight instead of waiting a round trip and an fsync per batch.
RECEIVE_WINDOW = 8
# How long a batch waits for its predecessors' requests to arrive (they travel on other
# connections and may be a little late) before it is refused as out of order.
PREDECESSOR_WAIT_SECONDS = 2.0


class CredentialRefused(Exception):
    """An agent credential the configuration server does not accept (or cannot check now: status 503)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class IngestService:
    def __init__(self, cache: DiskCache, token: str, max_batch_bytes: int, retry_after_seconds: int,
                 metrics: ProcessServerMetrics, pool: ThreadPoolExecutor, on_stored, on_new_disk,
                 machine_of=None) -> None:
        self.cache = cache
        self._token = token.encode()        # the shared agent token; b"" = not accepted
        # async machine_of(token) -> machine name, or CredentialRefused: per-machine agent credentials
        # of the configuration server (control role); None = only the shared token.
        self.machine_of = machine_of
        self.max_batch_bytes = max_batch_bytes
        self.retry_after_seconds = retry_after_seconds
        self.metrics = metrics
        self.pool = pool
        self.on_stored = on_stored          # callback(disk_id, seq) -> None
        self.on_new_disk = on_new_disk      # async callback(disk_id) -> None, adopts a disk's repo state
        self._receiving: dict[str, set[int]] = {}     # disk -> seqs whose bodies are being received
        self._changes: dict[str, asyncio.Event] = {}  # disk -> set when its receiving/acked state changes
        self._acked_digests: dict[str, OrderedDict[int, bytes]] = {}
        self.body_idle_timeout_seconds = 30.0   # set from ingest.body_idle_timeout_seconds
        self.body_min_bytes_per_second = 65536  # set from ingest.body_min_bytes_per_second

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)  # only bounds request.read(); bodies are streamed
        app.router.add_get(API_PREFIX + "/disks/{disk}", self.get_disk)
        app.router.add_put(API_PREFIX + "/disks/{disk}/batches/{seq}", self.put_batch)
        return app

    def _reject(self, exc: _Reject, request: web.Request) -> web.Response:
        return reject_response(exc, request, self.metrics.rejections, logger)

    async def _authenticate(self, request: web.Request, disk: str) -> None:
        auth = request.headers.get("Authorization", "")
        presented = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if self._token and presented and hmac.compare_digest(presented.encode(), self._token):
            return
        if self.machine_of is not None and presented.startswith(CREDENTIAL_PREFIX):
            try:
                machine = await self.machine_of(presented)
            except CredentialRefused as exc:
                headers = {"Retry-After": str(self.retry_after_seconds)} if exc.status == 503 else {
                    "WWW-Authenticate": "Bearer"}
                code = {503: "auth_unavailable", 409: exc.reason}.get(exc.status, "unauthenticated")
                raise _Reject(exc.status, code,
                              exc.message, headers) from None
            # Disk ids are <machine>.<disk>: an agent's credential covers its own machine's disks only.
            if "." not in disk or disk.split(".", 1)[0] != machine:
                raise _Reject(403, "forbidden", f"agent {machine} may not send or query disk {disk}, which belongs "
                              f"to machine {disk.split('.', 1)[0]}: use that machine's own credential")
            return
        raise _Reject(401, "unauthenticated", "missing or wrong bearer token: use this machine's credential from "
                      "'lifeboat register' (or the shared agent token from 'lifeboat init')",
                      {"WWW-Authenticate": "Bearer"})

    def _disk(self, request: web.Request) -> str:
        disk = request.match_info["disk"]
        if not DISK_ID_RE.fullmatch(disk):
            raise _Reject(400, "bad_request", f"disk id {disk!r} must match {DISK_ID_RE.pattern}")
        return disk

    async def _adopt(self, disk: str) -> None:
        """A disk new to this cache continues from the repository's log; if that cannot be read, throttle."""
        if self.cache.known(disk):
            return
        try:
            await self.on_new_disk(disk)
        except (LifeboatError, OSError) as exc:
            raise _Reject(503, "repository_unavailable",
                          f"cannot read disk {disk}'s log from the repository to continue it: {exc}; retry later",
                          {"Retry-After": str(self.retry_after_seconds)}) from None

    async def get_disk(self, request: web.Request) -> web.Response:
        try:
            disk = self._disk(request)
            await self._authenticate(request, disk)
            await self._adopt(disk)
        except _Reject as exc:
            return self._reject(exc, request)
        return web.json_response({"disk_id": disk, "acked_seq": self.cache.acked_seq(disk),
                                  "uploaded_seq": self.cache.uploaded_seq(disk)})

    async def put_batch(self, request: web.Request) -> web.Response:
        try:
            disk = self._disk(request)
            await self._authenticate(request, disk)
            seq_text = request.match_info["seq"]
            if not _SEQ_RE.fullmatch(seq_text):
                raise _Reject(400, "bad_request", f"sequence {seq_text!r} is not a positive integer")
            seq = int(seq_text)
            length = request.content_length
            if length is None:
                raise _Reject(411, "bad_request", "Content-Length is required (batches are not sent chunked)")
            if length > self.max_batch_bytes:
                raise _Reject(413, "too_large", f"batch of {length} bytes exceeds the limit of {self.max_batch_bytes}; "
                              "lower the agent's replication.batch_bytes")
            await self._adopt(disk)
            acked = self.cache.acked_seq(disk)
            if seq <= acked:
                # Idempotent resend of something already durable: acknowledged, never applied again. Within
                # the replay window the body must be the one stored; older ones are not read at all.
                stored = self._acked_digests.get(disk, {}).get(seq)
                if stored is not None and stored != await self._body_digest(request, length):
                    raise _Reject(409, "replay_mismatch", f"batch {seq} of disk {disk} was already stored with "
                                  "other content; a resend must be byte-identical", expected_seq=acked + 1)
                self.metrics.batches.labels("duplicate").inc()
                return web.json_response({"status": "duplicate", "seq": seq, "acked_seq": acked})
            if seq > acked + RECEIVE_WINDOW:
                raise _Reject(409, "out_of_order", f"expected sequence {acked + 1} (at most {RECEIVE_WINDOW} "
                              f"batches in flight), got {seq}", expected_seq=acked + 1)
            receiving = self._receiving.setdefault(disk, set())
            if seq in receiving:
                raise _Reject(409, "busy", f"batch {seq} of disk {disk} is being received", expected_seq=acked + 1)
            if not await self._predecessors_arrive(disk, seq):
                acked = self.cache.acked_seq(disk)
                raise _Reject(409, "out_of_order", f"expected sequence {acked + 1}, got {seq}", expected_seq=acked + 1)
            if seq <= self.cache.acked_seq(disk) or seq in receiving:  # another attempt came first
                raise _Reject(409, "busy", f"batch {seq} of disk {disk} is being received",
                              expected_seq=self.cache.acked_seq(disk) + 1)
            if not self.cache.can_accept(length):
                raise _Reject(503, "cache_full",
                              f"cache above its high-water mark ({self.cache.free_ratio:.0%} free); retry later",
                              {"Retry-After": str(self.retry_after_seconds)})
            return await self._receive(request, disk, seq, length)
        except _Reject as exc:
            return self._reject(exc, request)
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away; nothing was acknowledged
        except Exception as exc:  # noqa: BLE001 - e.g. the cache disk failed: answer, count, keep serving
            logger.exception("batch not stored", path=request.path)
            return self._reject(_Reject(500, "internal", f"batch not stored: {type(exc).__name__}: {exc}; "
                                        "the sender will retry"), request)

    def _body_deadline(self, length: int) -> float:
        return self._limits().deadline(length)

    def _limits(self) -> BodyLimits:
        return BodyLimits(self.body_idle_timeout_seconds, self.body_min_bytes_per_second)

    async def _read_chunk(self, request: web.Request, size: int, deadline: float) -> bytes:
        """One bounded read with an idle timeout and the body's overall deadline (slowloris)."""
        return await self._limits().read(request, size, deadline)

    async def _body_digest(self, request: web.Request, length: int) -> bytes:
        h = xxhash.xxh3_128()
        received = 0
        deadline = self._body_deadline(length)
        while chunk := await self._read_chunk(request, min(READ_CHUNK_BYTES, length - received + 1), deadline):
            received += len(chunk)
            if received > length:
                raise _Reject(400, "bad_request", f"body is longer than its Content-Length {length}")
            h.update(chunk)
        return h.digest() if received == length else b""

    def _changed(self, disk: str) -> None:
        event = self._changes.pop(disk, None)
        if event is not None:
            event.set()

    async def _wait_change(self, disk: str, timeout: float | None) -> None:
        event = self._changes.setdefault(disk, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _predecessors_arrive(self, disk: str, seq: int) -> bool:
        """True once every batch between the acknowledged one and seq is acknowledged or being received."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PREDECESSOR_WAIT_SECONDS
        while True:
            receiving = self._receiving.setdefault(disk, set())
            if all(s in receiving for s in range(self.cache.acked_seq(disk) + 1, seq)):
                return True
            if loop.time() >= deadline:
                return False
            await self._wait_change(disk, deadline - loop.time())

    async def _turn(self, disk: str, seq: int) -> bool:
        """Wait until seq - 1 is acknowledged (True) or has failed without being stored (False)."""
        while True:
            if self.cache.acked_seq(disk) >= seq - 1:
                return True
            if seq - 1 not in self._receiving.get(disk, ()):
                return False
            await self._wait_change(disk, None)

    def _remember_digest(self, disk: str, seq: int, digest: bytes) -> None:
        # Recorded before seq leaves the receiving set, so a resend that sees it acknowledged is checked.
        recent = self._acked_digests.setdefault(disk, OrderedDict())
        recent[seq] = digest
        while len(recent) > REPLAY_WINDOW_BATCHES:
            recent.popitem(last=False)

    async def _receive(self, request: web.Request, disk: str, seq: int, length: int) -> web.Response:
        self._receiving.setdefault(disk, set()).add(seq)
        self._changed(disk)
        self.cache.reserved_bytes += length
        loop = asyncio.get_running_loop()
        # Verify only: payloads are hashed as they stream through, never copied (the uploader re-reads them).
        parser = BatchParser(expected_disk_id=disk, expected_seq=seq, keep_payloads=False)
        fd = None
        received = 0
        digest = xxhash.xxh3_128()
        deadline = self._body_deadline(length)
        try:
            fd = await loop.run_in_executor(self.pool, self.cache.open_partial, disk, seq)

            def consume(chunks: list[bytes]) -> None:
                # Parse (verify checksums) and write in one worker hop, off the event loop.
                for chunk in chunks:
                    parser.feed(chunk)
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]

            # Chunks go to the pool HOP_BYTES at a time, and the next ones are read while a hop runs
            # (hops stay in order: one at a time per batch). Memory: two hops per batch received.
            hop: asyncio.Future | None = None
            pending: list[bytes] = []
            pending_bytes = 0
            try:
                while True:
                    # Bounded read: never more than READ_CHUNK_BYTES past what Content-Length allows.
                    chunk = await self._read_chunk(request, min(READ_CHUNK_BYTES, length - received + 1), deadline)
                    if chunk:
                        received += len(chunk)
                        if received > length:
                            raise _Reject(400, "bad_request", f"body is longer than its Content-Length {length}")
                        pending.append(chunk)
                        pending_bytes += len(chunk)
                    if pending and (pending_bytes >= HOP_BYTES or not chunk):
                        if hop is not None:
                            await hop
                        hop = loop.run_in_executor(self.pool, consume, pending)
                        pending, pending_bytes = [], 0
                    if not chunk:
                        break
                if hop is not None:
                    await hop
            finally:
                if hop is not None and not hop.done():
                    # Never close or discard the file while a worker may still be writing to it.
                    await asyncio.gather(hop, return_exceptions=True)
            if received < length:
                raise _Reject(400, "truncated", f"body ended after {received} of {length} bytes")
            header = parser.finish()
            await loop.run_in_executor(self.pool, self.cache.sync_partial, fd)
            fd = None
            if not await self._turn(disk, seq):
                raise _Reject(409, "out_of_order", f"batch {seq - 1} of disk {disk} was not stored; resend from it",
                              expected_seq=self.cache.acked_seq(disk) + 1)
            await asyncio.shield(loop.run_in_executor(self.pool, self.cache.publish_partial, disk, seq))
            # Counted before this seq leaves the receiving set: a successor must never see neither.
            self.cache.published(disk, seq, received)
            self._remember_digest(disk, seq, digest.digest())
        except FrameError as exc:
            await loop.run_in_executor(self.pool, self.cache.discard_partial, disk, seq, fd)
            reason = "truncated" if "truncated" in str(exc) else "malformed"
            return self._reject(_Reject(400, reason, str(exc)), request)
        except _Reject as exc:
            await loop.run_in_executor(self.pool, self.cache.discard_partial, disk, seq, fd)
            return self._reject(exc, request)
        except BaseException:
            # Client went away (ConnectionResetError, CancelledError) or the disk failed: nothing was acknowledged.
            await asyncio.shield(loop.run_in_executor(self.pool, self.cache.discard_partial, disk, seq, fd))
            raise
        finally:
            self.cache.reserved_bytes -= length
            self._receiving[disk].discard(seq)
            self._changed(disk)
        self.metrics.received_bytes.inc(received)
        self.metrics.batches.labels("stored").inc()
        self.on_stored(disk, seq)
        logger.info("batch stored", DISK=disk, BATCH=seq, bytes=received, frames=header.frame_count)
        return web.json_response({"status": "stored", "seq": seq, "acked_seq": seq})
