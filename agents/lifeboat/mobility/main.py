"""`lifeboat-mobility`: the agent daemon on each protected machine."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .. import __version__
from ..core import config as cfgmod
from ..core import logging as log
from ..core import sd_notify
from ..core.errors import LifeboatError
from ..core.runtime import config_reloader, run, start_metrics_server
from ..core.watchdog import StallDetector, ping_while_progressing
from .agent import Agent


# Shutdown stages, in order. SHUTDOWN_BUDGET_SECONDS must stay below TimeoutStopSec= of
# systemd/lifeboat-mobility.service (tests/unit/ops checks it against the unit file).
STOP_CYCLE_SECONDS = 90      # the cycle in flight may finish: its point is worth keeping
STOP_CANCEL_SECONDS = 70     # a cancelled cycle unwinds: it still runs the post script (60 s default)
STOP_CLOSE_SECONDS = 20      # tracker hand-over and change logs closed clean (fsync)
STOP_LISTENER_SECONDS = 5    # the metrics listener
SHUTDOWN_BUDGET_SECONDS = STOP_CYCLE_SECONDS + STOP_CANCEL_SECONDS + STOP_CLOSE_SECONDS + STOP_LISTENER_SECONDS
# Watchdog progress: a cycle in flight must read, send, or end within this long. A process server
# that stays unreachable longer also stops the pings; the unit's WatchdogSignal=SIGTERM then makes
# that a graceful restart, which keeps change tracking (no resync).
CYCLE_STALL_SECONDS = 3600.0


class AgentProgress:
    """Watchdog probe: idle between cycles is progress; a cycle in flight progresses while it
    reads blocks, gets batches acknowledged or ends (ok or failed)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stall = StallDetector(CYCLE_STALL_SECONDS)

    def _fingerprint(self) -> tuple:
        m = self.agent.metrics
        moved = sum(s.value for c in (m.cycles, m.read_bytes) for f in c.collect() for s in f.samples
                    if s.name.endswith("_total"))
        sent = self.agent.sender.sent_bytes if self.agent.sender else 0
        return self.agent.cycle, moved, sent

    def probe(self) -> tuple[bool, str]:
        stuck = self.stall.check(self.agent.cycle_lock.locked(), self._fingerprint())
        if stuck is None:
            return True, ""
        return False, f"cycle {self.agent.cycle} read, sent and ended nothing for {stuck:.0f} s"


async def _run_until_stopped(agent: Agent, stop: asyncio.Event, cycles: int | None, logger) -> None:
    """agent.run(), bounded on stop: the cycle in flight gets STOP_CYCLE_SECONDS, then is cancelled."""
    work = asyncio.create_task(agent.run(stop, cycles), name="cycles")
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            logger.info("stopping", budget_seconds=SHUTDOWN_BUDGET_SECONDS)
            await asyncio.wait({work}, timeout=STOP_CYCLE_SECONDS)
        if not work.done():
            # A cancelled cycle counts as failed; its blocks stay owed in the change log.
            logger.warning("cycle did not finish in time, cancelling it", seconds=STOP_CYCLE_SECONDS)
            work.cancel()
            await asyncio.wait({work}, timeout=STOP_CANCEL_SECONDS)
    finally:
        stopped.cancel()
    if work.done() and not work.cancelled():
        work.result()  # a LifeboatError ends the daemon with its exit code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifeboat-mobility", description=__doc__)
    ap.add_argument("-c", "--config", default="/etc/lifeboat/mobility.toml")
    ap.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--cycles", type=int, help="run this many cycles, then exit (default: run until stopped)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg = cfgmod.load(cfgmod.MobilityConfig, args.config)
    except LifeboatError as exc:
        print(f"lifeboat-mobility: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.check_config:
        print(f"{args.config}: OK")
        return 0
    log.configure(cfg.log.level, cfg.log.format, "lifeboat-mobility")
    logger = log.get("lifeboat.mobility")

    async def daemon(stop: asyncio.Event) -> int:
        agent = Agent(cfg)
        runner = None
        try:
            await agent.start()
            runner, port = await start_metrics_server(
                agent.metrics.registry, cfg.metrics.host, cfg.metrics.port,
                lambda: (True, agent.status()))
            # start() reconciled every disk with the process server and reopened the change logs.
            sd_notify.notify("READY=1")
            logger.info("agent ready", MACHINE=cfg.machine, disks=len(agent.disks), metrics_port=port)
            pinger = asyncio.create_task(ping_while_progressing(AgentProgress(agent).probe), name="watchdog")
            try:
                await _run_until_stopped(agent, stop, args.cycles, logger)
            finally:
                pinger.cancel()
            return 0
        except LifeboatError as exc:
            logger.error("agent stopped on error", error=str(exc))
            return exc.exit_code
        finally:
            sd_notify.notify("STOPPING=1")
            try:
                await asyncio.wait_for(agent.close(), STOP_CLOSE_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("agent close did not finish in time", seconds=STOP_CLOSE_SECONDS)
            if runner:
                try:
                    await asyncio.wait_for(runner.cleanup(), STOP_LISTENER_SECONDS)
                except asyncio.TimeoutError:
                    logger.warning("metrics listener did not close in time", seconds=STOP_LISTENER_SECONDS)

    return run(daemon, config_reloader(cfgmod.MobilityConfig, args.config, "lifeboat-mobility", cfg))


if __name__ == "__main__":
    sys.exit(main())
