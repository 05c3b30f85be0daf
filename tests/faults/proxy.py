"""Loopback TCP fault proxy: pass, delay, throttle, cut-after, reset (RST) or black-hole, switchable at runtime."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass

from loop_server import LoopThreadServer

CHUNK_BYTES = 64 * 1024
MODES = ("pass", "delay", "throttle", "cut", "reset", "blackhole")


@dataclass(frozen=True)
class Mode:
    """What the proxy does to traffic: `name` is one of MODES; `value` is ms (delay), bytes/s
    (throttle) or bytes per connection (cut); `jitter` is the seeded spread of delay in ms."""

    name: str = "pass"
    value: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"unknown proxy mode {self.name!r}: use one of {', '.join(MODES)}")


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy(LoopThreadServer):
    """Forwards 127.0.0.1:<port> to an upstream port in a thread of its own; mode() switches the
    fault for new and open connections. Delay jitter comes from Random(seed): same seed, same delays."""

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self._mode = Mode()
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self.connections = 0
        self.faulted_connections = 0
        self.faulted_chunks = 0  # chunks a delay, throttle or cut acted on
        super().__init__(f"fault-proxy-{upstream_port}", CHUNK_BYTES)

    # --- control (any thread) ---------------------------------------------------------------

    @property
    def landed(self) -> int:
        """How often a fault acted on traffic (connections refused/reset/swallowed/cut, chunks slowed)."""
        return self.faulted_connections + self.faulted_chunks

    @property
    def current(self) -> Mode:
        return self._mode

    def mode(self, name: str = "pass", value: float = 0.0, jitter: float = 0.0) -> None:
        new = Mode(name, value, jitter)
        self._mode = new
        if name == "reset":  # open connections are reset too, as a failing middlebox would
            self._loop.call_soon_threadsafe(self._reset_all, True)

    def heal(self) -> None:
        self.mode("pass")

    def set_upstream(self, port: int) -> None:
        self.upstream_port = port

    # --- the loop thread --------------------------------------------------------------------

    def _before_shutdown(self) -> None:
        self._reset_all()

    def _reset_all(self, count: bool = False) -> None:
        for client, upstream in list(self._conns):
            self.faulted_connections += count
            _abort_with_rst(client)
            if upstream is not None:
                _abort_with_rst(upstream)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        entry = (c_writer, None)
        self._conns.add(entry)
        try:
            mode = self._mode
            if mode.name == "reset":
                self.faulted_connections += 1
                _abort_with_rst(c_writer)
                return
            if mode.name == "blackhole":
                self.faulted_connections += 1
                await self._swallow(c_reader)
                return
            try:
                u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=CHUNK_BYTES)
            except OSError:
                _abort_with_rst(c_writer)  # upstream down: the client sees a refused/reset connection
                return
            self._conns.discard(entry)
            entry = (c_writer, u_writer)
            self._conns.add(entry)
            budget = [None]  # bytes left before a cut, shared by both directions of this connection
            await asyncio.gather(self._pipe(c_reader, u_writer, c_writer, budget),
                                 self._pipe(u_reader, c_writer, u_writer, budget), return_exceptions=True)
        finally:
            self._conns.discard(entry)
            for w in entry:
                if w is not None and not w.is_closing():
                    w.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """Black-hole: read and drop everything, answer nothing, until the client gives up."""
        while await reader.read(CHUNK_BYTES):
            pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    other: asyncio.StreamWriter, budget: list) -> None:
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                mode = self._mode
                if mode.name == "reset":
                    _abort_with_rst(writer)
                    _abort_with_rst(other)
                    return
                if mode.name == "blackhole":  # switched mid-connection: keep reading, forward nothing
                    self.faulted_connections += 1
                    await self._swallow(reader)
                    return
                if mode.name != "pass":
                    self.faulted_chunks += 1
                if mode.name == "delay":
                    await asyncio.sleep(max(0.0, mode.value + self.rng.uniform(-mode.jitter, mode.jitter)) / 1000)
                elif mode.name == "throttle":
                    await asyncio.sleep(len(data) / max(1.0, mode.value))
                elif mode.name == "cut":
                    if budget[0] is None:
                        budget[0] = int(mode.value)
                    if len(data) >= budget[0]:
                        # The link drops here: what came before the cut is delivered, nothing after.
                        writer.write(data[:budget[0]])
                        self.faulted_connections += 1
                        other.transport.abort()
                        writer.close()
                        await writer.wait_closed()
                        return
                    budget[0] -= len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            # One side failed: fail the other too (a half-open client would wait for its read timeout).
            writer.transport.abort()
            other.transport.abort()
