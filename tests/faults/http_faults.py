"""HTTP fault proxy for the process server ↔ storage link: 500, 503 or a stall for a seeded fraction of requests."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from loop_server import LoopThreadServer

MAX_HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
FAULTS = ("500", "503", "stall")
_ERRORS = {
    "500": (b"500 Internal Server Error", b"InternalError", b"The server encountered an internal error."),
    "503": (b"503 Server Busy", b"ServerBusy", b"The server is currently unable to receive requests."),
}


class HTTPFaultProxy(LoopThreadServer):
    """Forwards HTTP/1.1 on 127.0.0.1:<port> to an upstream port, one request per connection
    (it asks both ends for Connection: close, so each request is a separate decision).

    With probability `fraction` (and always the first request after configure(), so that a short
    window is never fault-free) a request gets a fault picked from `faults` by Random(seed): an
    Azure-style 500/503 error body (after the request body is read), or a stall: the request is
    read, nothing is answered for `stall_seconds`, then the connection drops.
    """

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.fraction = 0.0
        self.faults: tuple[str, ...] = ("503",)
        self.stall_seconds = 3.0
        self.counts: Counter[str] = Counter()
        self._fault_next = False
        super().__init__(f"http-fault-proxy-{upstream_port}", MAX_HEAD_BYTES)

    def configure(self, fraction: float, faults: tuple[str, ...] = ("503",), stall_seconds: float = 3.0) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown or not 0 <= fraction <= 1:
            raise ValueError(f"faults must be among {FAULTS} and 0 <= fraction <= 1, not {faults}, {fraction}")
        self.faults, self.stall_seconds, self.fraction = tuple(faults), stall_seconds, fraction
        self._fault_next = fraction > 0  # the first request after configure() always gets one

    @property
    def landed(self) -> int:
        """Requests that got a fault instead of being forwarded."""
        return sum(n for what, n in self.counts.items() if what != "pass")

    def heal(self) -> None:
        self.fraction = 0.0

    def set_upstream(self, port: int) -> None:
        self.upstream_port = port

    def _decide(self) -> str:
        if self.fraction and (self._fault_next or self.rng.random() < self.fraction):
            self._fault_next = False
            return self.rng.choice(self.faults)
        return "pass"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")  # bounded by the stream limit (64 KiB)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = [ln for ln in lines[1:] if ln]
            length = 0
            for ln in headers:
                name, _, value = ln.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            decision = self._decide()
            self.counts[decision] += 1
            if decision == "pass":
                await self._forward(lines[0], headers, reader, writer)
                return
            await self._drain_body(reader, length)
            if decision == "stall":
                await asyncio.sleep(self.stall_seconds)
                writer.transport.abort()
                return
            status, code, message = _ERRORS[decision]
            body = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>' + code + b"</Code><Message>" + message
                    + b"</Message></Error>")
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nx-ms-error-code: " + code
                         + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _drain_body(self, reader: asyncio.StreamReader, length: int) -> None:
        while length > 0:
            data = await reader.read(min(CHUNK_BYTES, length))
            if not data:
                return
            length -= len(data)

    async def _forward(self, request_line: str, headers: list[str], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        kept = [h for h in headers if h.partition(":")[0].strip().lower() not in ("connection", "keep-alive")]
        head = "\r\n".join([request_line, *kept, "Connection: close", "", ""]).encode("latin-1")
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=CHUNK_BYTES)
        except OSError:
            writer.transport.abort()  # storage down: the client sees the connection drop
            return
        u_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(CHUNK_BYTES):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass

        upload = asyncio.ensure_future(pipe(reader, u_writer))
        await pipe(u_reader, writer)  # the response ends with upstream's close (Connection: close)
        upload.cancel()
        u_writer.close()
