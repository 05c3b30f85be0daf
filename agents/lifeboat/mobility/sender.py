"""Batch sender: PUT each batch until the process server acknowledges it durably (idempotent by sequence)."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import aiohttp.payload

from ..core import logging as log
from ..core import tls
from ..core.errors import LifeboatError

logger = log.get("lifeboat.mobility.sender")
API_PREFIX = "/api/v1"
MEDIA_TYPE = "application/vnd.lifeboat.batch.v1"
MAX_RESPONSE_BYTES = 64 * 1024


class SendRejected(LifeboatError):
    """The process server refused batch {} of disk {}: HTTP {} {}."""


class ResyncRequired(LifeboatError):
    """Disk {} needs a resync: {}."""


class _ServerError(Exception):
    """A 5xx other than 503: the server failed this attempt (e.g. its cache disk); retried with backoff."""


# Small parts (frame headers, checksums) are joined up to this size before a write; payloads
# (1 MiB frames) go to the transport as they are. One 16 MiB write made aiohttp join the headers
# and the whole body into a copy (Python < 3.12.9 skips writelines) and TLS-encrypt it in one go.
COALESCE_BYTES = 64 * 1024


class BatchPayload(aiohttp.payload.Payload):
    """A batch body sent from its builder's parts: no joined copy of the batch, one write per frame."""

    def __init__(self, parts: list) -> None:
        super().__init__(parts, content_type=MEDIA_TYPE)
        self._size = sum(len(p) for p in parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a batch body is binary")

    async def write(self, writer) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer, content_length: int | None) -> None:
        small: list = []
        small_bytes = 0
        for part in self._value:
            if len(part) < COALESCE_BYTES:
                small.append(part)
                small_bytes += len(part)
                if small_bytes < COALESCE_BYTES:
                    continue
            if small:
                await writer.write(b"".join(small))
                small, small_bytes = [], 0
            if len(part) >= COALESCE_BYTES:
                await writer.write(part)
        if small:
            await writer.write(b"".join(small))


class SendWindow:
    """One disk's batches in flight. The process server acknowledges them in seq order, so
    `acked` is the highest seq it has acknowledged to us: an out_of_order reply expecting a seq
    above it names a batch we are still sending (transient), one at or below it means the
    server lost batches it had acknowledged (resync)."""

    def __init__(self, acked: int) -> None:
        self.acked = acked


class BatchSender:
    def __init__(self, url: str, ca_cert: str, token: str, timeout_seconds: float, retry_max_seconds: float) -> None:
        self.url = url.rstrip("/")
        self.ssl = tls.client_context(ca_cert)
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds, sock_connect=10)
        self.retry_max_seconds = retry_max_seconds
        self.session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Task] = set()   # replaced sessions still closing (referenced until done)
        self.sent_bytes = 0

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=8),
                                     timeout=self.timeout, headers=self._headers)

    async def __aenter__(self) -> "BatchSender":
        self.session = self._new_session()
        return self

    def _replace_session(self) -> None:
        """Start over with a fresh connection pool; the old one closes once its requests have failed over."""
        old, self.session = self.session, self._new_session()
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def __aexit__(self, *exc) -> None:
        if self.session:
            await self.session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _json(self, resp: aiohttp.ClientResponse) -> dict:
        raw = await resp.content.read(MAX_RESPONSE_BYTES)  # bounded: a hostile server cannot flood us
        try:
            import json

            body = json.loads(raw)
            return body if isinstance(body, dict) else {}
        except ValueError:
            return {"message": raw[:200].decode(errors="replace")}

    async def _retrying(self, what: str, attempt_fn):
        delay = 0.2
        while True:
            try:
                return await attempt_fn()
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, _ServerError) as exc:
                logger.warning("process server unreachable, retrying", what=what, error=str(exc) or type(exc).__name__,
                               retry_in_seconds=round(delay, 2))
            except RuntimeError as exc:
                # uvloop can hand a connect a file descriptor it still maps to a closed transport when
                # connects race with a server going away (MagicStack/uvloop#653): the attempt failed
                # before anything was sent, so retry on a fresh connection pool instead of dying.
                if "is used by transport" not in str(exc):
                    raise
                logger.warning("connection attempt hit a stale file descriptor, retrying on new connections",
                               what=what, error=str(exc), retry_in_seconds=round(delay, 2))
                self._replace_session()
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, self.retry_max_seconds)

    async def _throttled(self, resp: aiohttp.ClientResponse, reply: dict, disk_id: str, what) -> None:
        """503: wait as the server asks (capped), then try again."""
        try:
            wait = max(0.1, float(resp.headers.get("Retry-After", "1")))
        except ValueError:  # an HTTP-date or garbage: fall back to a short wait
            wait = 1.0
        logger.info("process server throttling", DISK=disk_id, BATCH=what, retry_after=wait,
                    reason=reply.get("error"), detail=reply.get("message"))
        await asyncio.sleep(min(wait, self.retry_max_seconds))

    async def acked_seq(self, disk_id: str) -> int:
        async def attempt() -> int:
            assert self.session
            while True:
                async with self.session.get(f"{self.url}{API_PREFIX}/disks/{disk_id}") as resp:
                    body = await self._json(resp)
                    if resp.status == 200:
                        return int(body["acked_seq"])
                    if resp.status == 503:
                        await self._throttled(resp, body, disk_id, "query")
                        continue
                    if resp.status >= 500:
                        raise _ServerError(f"HTTP {resp.status}: {body.get('message', '')}")
                    raise SendRejected("query", disk_id, resp.status, body.get("message", ""))

        return await self._retrying(f"query {disk_id}", attempt)

    async def send(self, disk_id: str, seq: int, body: bytes | list, window: SendWindow | None = None) -> dict:
        """Send until stored or duplicate; 503 honours Retry-After; other 4xx are permanent.

        `body` is the batch as bytes or as a builder's parts (sent without joining them).
        `window`: other batches of this disk are in flight (see SendWindow)."""
        url = f"{self.url}{API_PREFIX}/disks/{disk_id}/batches/{seq}"
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
        body_len = sum(len(p) for p in parts)

        async def attempt():
            assert self.session
            while True:
                # A fresh payload per attempt: a resend writes the same parts again.
                async with self.session.put(url, data=BatchPayload(parts)) as resp:
                    reply = await self._json(resp)
                    if resp.status == 200:
                        self.sent_bytes += body_len
                        if window is not None:
                            window.acked = max(window.acked, seq)
                        return reply
                    if resp.status == 503:
                        await self._throttled(resp, reply, disk_id, seq)
                        continue
                    if resp.status == 409 and reply.get("error") == "busy":
                        await asyncio.sleep(0.5)  # an earlier attempt of ours is still being received
                        continue
                    expected = reply.get("expected_seq")
                    if (resp.status == 409 and reply.get("error") == "out_of_order" and window is not None
                            and isinstance(expected, int) and window.acked < expected < seq):
                        await asyncio.sleep(0.05)  # an earlier batch of ours is still in flight or being resent
                        continue
                    if resp.status == 409 and reply.get("error") == "out_of_order":
                        raise ResyncRequired(disk_id, f"process server expects sequence {reply.get('expected_seq')}, "
                                             f"agent sent {seq}: it lost batches it had not uploaded")
                    if resp.status >= 500 or resp.status == 408:  # 408: our body was too slow; retry
                        raise _ServerError(f"HTTP {resp.status}: {reply.get('message', '')}")
                    raise SendRejected(seq, disk_id, resp.status, reply.get("message", ""))

        return await self._retrying(f"batch {disk_id}/{seq}", attempt)
