"""Consistency groups on port 20004: the member listener and the coordinator's HOLD → MARK rounds.

Every member listens (mutual TLS, certificates from the deployment's CA, CN = machine name).
Only the configured coordinator may start a round: HOLD makes a member run its cycle up to the
freeze and answer HELD; MARK lets it snapshot, rotate its epoch and thaw, then answer MARKED;
it then sends its data as usual, with the group tag in its bookmark. Anything else — a timeout,
a refusal, a lost connection — aborts: every member thaws at once and keeps no point for the tag.
A member never waits for MARK past its own deadline, and the external thaw watchdog covers a
member that dies while frozen.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from ..core import logging as log
from ..core import tls
from ..core.config import GroupConfig
from ..core.errors import LifeboatError
from .group_wire import (ABORT, FRAME_NAMES, HELD, HELLO, HOLD, MARK, MARKED, REFUSED, GroupFrameError,
                         read_frame, write_frame)

logger = log.get("lifeboat.mobility.group")
HELLO_TIMEOUT_SECONDS = 10.0       # a connection that says nothing is dropped (cannot pin a member)
CONNECT_TIMEOUT_SECONDS = 5.0
REJECT_REASONS = ("malformed", "unauthenticated", "not_coordinator", "wrong_group", "busy", "protocol", "timeout")


class GroupAborted(LifeboatError):
    """Group round aborted: {}."""


def coordinator_of(cfg: GroupConfig) -> str:
    return cfg.coordinator or sorted(m.machine for m in cfg.members)[0]


class GroupMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.hold_seconds = Histogram(
            "lifeboat_group_hold_seconds", "Hold window of a group round: first member freeze to last member thaw "
            "(coordinator)", buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.rounds = Counter("lifeboat_group_rounds_total", "Group rounds started by this coordinator, by result",
                              ["result"], registry=r)
        self.rejected = Counter("lifeboat_group_rejected_total", "Connections or frames refused on the group port, "
                                "by reason", ["reason"], registry=r)
        for result in ("marked", "aborted"):
            self.rounds.labels(result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


@dataclass
class Hold:
    """A member's side of one round, handed to the agent's cycle."""
    tag: str
    app: bool
    deadline: float                    # monotonic
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop
    members: list[str]
    group: str

    def wait_for_mark(self) -> None:
        """Called from the capture thread while frozen: answer HELD, then block until MARK.
        Raises GroupAborted on ABORT, a lost coordinator or the deadline (the caller then thaws)."""
        future = asyncio.run_coroutine_threadsafe(self._held_then_mark(), self.loop)
        try:
            future.result(max(0.0, self.deadline - time.monotonic()) + 1.0)
        except TimeoutError:
            future.cancel()
            raise GroupAborted(f"no MARK for {self.tag} before the member's deadline") from None

    async def _held_then_mark(self) -> None:
        try:
            await write_frame(self.writer, HELD, tag=self.tag)
            kind, body = await read_frame(self.reader, max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise GroupAborted(f"no MARK for {self.tag} before the member's deadline") from None
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise GroupAborted(f"the coordinator went away during the hold of {self.tag} ({type(exc).__name__})") \
                from None
        if kind == MARK and body["tag"] == self.tag:
            return
        reason = body.get("reason", FRAME_NAMES[kind]) if kind == ABORT else f"unexpected {FRAME_NAMES[kind]}"
        raise GroupAborted(f"{self.tag}: {reason}")

    async def marked(self, point_id: str, frozen_at: float, thawed_at: float) -> None:
        await write_frame(self.writer, MARKED, tag=self.tag, point_id=point_id, frozen_at=frozen_at,
                          thawed_at=thawed_at)


class GroupMember:
    """The listener every member runs; it turns the coordinator's HOLD into a cycle of the agent."""

    def __init__(self, agent, cfg: GroupConfig, machine: str, metrics: GroupMetrics) -> None:
        self.agent = agent
        self.cfg = cfg
        self.machine = machine
        self.metrics = metrics
        self.coordinator = coordinator_of(cfg)
        self.members = sorted(m.machine for m in cfg.members)
        self.server: asyncio.AbstractServer | None = None
        self.cycles_done = 0
        self.last_point = time.monotonic()   # of the last group point (or of the start)

    async def start(self) -> int:
        ctx = tls.mutual_server_context(self.cfg.cert, self.cfg.key, self.cfg.ca_cert)
        self.server = await asyncio.start_server(self._serve, self.cfg.listen_host, self.cfg.port, ssl=ctx,
                                                 ssl_handshake_timeout=HELLO_TIMEOUT_SECONDS)
        port = self.server.sockets[0].getsockname()[1]
        logger.info("group listener ready", GROUP=self.cfg.name, port=port, coordinator=self.coordinator)
        return port

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    def _reject(self, reason: str, detail: str, peer) -> None:
        self.metrics.rejected.labels(reason).inc()
        logger.warning("group connection refused", reason=reason, detail=detail, peer=peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            cn = tls.peer_common_name(writer.get_extra_info("ssl_object"))
            if cn is None:
                return self._reject("unauthenticated", "no client certificate", peer)
            try:
                kind, hello = await read_frame(reader, HELLO_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                return self._reject("timeout", "no HELLO", peer)
            if kind != HELLO:
                return self._reject("protocol", f"{FRAME_NAMES[kind]} before HELLO", peer)
            if hello["group"] != self.cfg.name:
                await write_frame(writer, REFUSED, reason=f"this member is in group {self.cfg.name}")
                return self._reject("wrong_group", f"HELLO for group {hello['group']!r}", peer)
            if cn != hello["member"] or cn != self.coordinator:
                await write_frame(writer, REFUSED, reason=f"only {self.coordinator} coordinates {self.cfg.name}")
                return self._reject("not_coordinator", f"certificate {cn!r}, HELLO {hello['member']!r}", peer)
            kind, hold = await read_frame(reader, HELLO_TIMEOUT_SECONDS)
            if kind != HOLD or hold["group"] != self.cfg.name:
                return self._reject("protocol", f"expected HOLD for {self.cfg.name}, got {FRAME_NAMES[kind]}", peer)
            await self._hold(hold, reader, writer)
        except GroupFrameError as exc:
            self._reject("malformed", str(exc), peer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.TimeoutError) as exc:
            logger.info("group connection lost", peer=peer, error=type(exc).__name__)
        except asyncio.CancelledError:
            # The agent is stopping; a capture already running in its thread still thaws on its own.
            logger.info("group connection closed: the agent is stopping", peer=peer)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    async def _hold(self, hold: dict, reader, writer) -> None:
        own_limit = self.cfg.hold_deadline_seconds
        deadline = time.monotonic() + min(hold["deadline_ms"] / 1000, own_limit)
        if self.agent.cycle_lock.locked():
            await write_frame(writer, REFUSED, reason="busy: the previous cycle is still sending")
            return self._reject("busy", hold["tag"], None)
        h = Hold(hold["tag"], hold["app"], deadline, reader, writer, asyncio.get_running_loop(), self.members,
                 self.cfg.name)
        logger.info("group hold received", TAG=h.tag, app=h.app, deadline_s=round(deadline - time.monotonic(), 3))
        try:
            await self.agent.run_cycle(group_hold=h)
            self.cycles_done += 1
            self.last_point = time.monotonic()
        except GroupAborted as exc:
            logger.warning("group round aborted: thawed, no point for this tag", TAG=h.tag, reason=str(exc))
            try:
                await write_frame(writer, ABORT, tag=h.tag, reason=str(exc.args[0])[:1000])
            except (ConnectionError, ssl.SSLError):
                pass
        except LifeboatError as exc:
            logger.error("group cycle failed", TAG=h.tag, error=str(exc))


class GroupCoordinator:
    """Runs rounds every interval: HOLD all, MARK all when all held, else ABORT all."""

    def __init__(self, cfg: GroupConfig, machine: str, metrics: GroupMetrics) -> None:
        self.cfg = cfg
        self.machine = machine
        self.metrics = metrics
        self.ctx = tls.mutual_client_context(cfg.cert, cfg.key, cfg.ca_cert)
        self.ctx.check_hostname = False  # members are identified by their certificate's CN below
        self.rounds = 0
        self._last_app = float("-inf")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            await self.round()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, self.cfg.interval_seconds - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    async def round(self) -> bool:
        self.rounds += 1
        tag = f"{self.cfg.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.rounds:06d}"
        app = self.cfg.app_interval_seconds == 0 or time.monotonic() - self._last_app >= self.cfg.app_interval_seconds
        deadline = time.monotonic() + self.cfg.hold_deadline_seconds
        conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            # Reach every member before anyone freezes: an unreachable member costs no hold at all.
            await self._all_or_none([self._connect(m.machine, m.address, deadline, conns) for m in self.cfg.members])
            await self._all_or_none([self._hold(m.machine, tag, app, deadline, conns) for m in self.cfg.members])
            await asyncio.gather(*(write_frame(w, MARK, tag=tag) for _, w in conns.values()))
            marks = await asyncio.gather(*(self._expect(r, MARKED, tag, deadline + 30) for r, _ in conns.values()))
        except (GroupAborted, GroupFrameError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError,
                asyncio.TimeoutError, OSError) as exc:
            reason = (exc.args[0] if isinstance(exc, GroupAborted) else str(exc)) or type(exc).__name__
            await asyncio.gather(*(self._abort(w, tag, reason) for _, w in conns.values()))
            self.metrics.rounds.labels("aborted").inc()
            logger.warning("group round aborted: every member thaws, no group point", TAG=tag, reason=reason)
            return False
        finally:
            for _, w in conns.values():
                w.close()
        window = max(m["thawed_at"] for m in marks) - min(m["frozen_at"] for m in marks)
        self.metrics.hold_seconds.observe(window)
        self.metrics.rounds.labels("marked").inc()
        if app:
            self._last_app = time.monotonic()
        logger.info("group round marked", TAG=tag, hold_ms=round(window * 1000, 1), app=app,
                    points={m: body["point_id"] for m, body in zip(conns, marks)})
        return True

    @staticmethod
    async def _all_or_none(coros) -> None:
        """Run the HOLDs concurrently; on the first failure stop the others (so no member is left
        holding for a round that is already lost) and raise it."""
        tasks = [asyncio.create_task(c) for c in coros]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception():
                raise t.exception()

    async def _connect(self, machine: str, address: str, deadline: float, conns: dict) -> None:
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), ssl=self.ctx, server_hostname=host),
                min(CONNECT_TIMEOUT_SECONDS, max(0.1, deadline - time.monotonic())))
        except (asyncio.TimeoutError, OSError) as exc:
            raise GroupAborted(f"member {machine} at {address} unreachable: {exc or type(exc).__name__}") from None
        conns[machine] = (reader, writer)
        cn = tls.peer_common_name(writer.get_extra_info("ssl_object"))
        if cn != machine:
            raise GroupAborted(f"{address} presented certificate {cn!r}, expected member {machine}")
        await write_frame(writer, HELLO, group=self.cfg.name, member=self.machine)

    async def _hold(self, machine: str, tag: str, app: bool, deadline: float, conns: dict) -> None:
        reader, writer = conns[machine]
        await write_frame(writer, HOLD, group=self.cfg.name, tag=tag, app=app,
                          deadline_ms=max(1, int((deadline - time.monotonic()) * 1000)))
        await self._expect(reader, HELD, tag, deadline, machine)

    async def _expect(self, reader, kind: int, tag: str, deadline: float, machine: str = "") -> dict:
        try:
            got, body = await read_frame(reader, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise GroupAborted(f"member {machine or '?'} did not answer {FRAME_NAMES[kind]} in time") from None
        if got != kind or body.get("tag", tag) != tag:
            raise GroupAborted(f"member {machine or '?'} answered {FRAME_NAMES[got]}: {body.get('reason', '')}")
        return body

    async def _abort(self, writer, tag: str, reason: str) -> None:
        try:
            await asyncio.wait_for(write_frame(writer, ABORT, tag=tag, reason=reason[:1000]), 2.0)
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError, GroupFrameError):
            pass
