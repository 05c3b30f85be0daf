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
from ..core.runtime import run, start_metrics_server
from .agent import Agent


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
            sd_notify.notify("READY=1")
            logger.info("agent ready", MACHINE=cfg.machine, disks=len(agent.disks), metrics_port=port)
            await agent.run(stop, args.cycles)
            return 0
        except LifeboatError as exc:
            logger.error("agent stopped on error", error=str(exc))
            return exc.exit_code
        finally:
            sd_notify.notify("STOPPING=1")
            await agent.close()
            if runner:
                await runner.cleanup()

    return run(daemon)


if __name__ == "__main__":
    sys.exit(main())
