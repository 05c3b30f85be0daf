"""`lifeboat-master-target`: the failback receiver; journals batches on 9444 and applies them to on-prem disks."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .. import __version__
from ..core import config as cfgmod
from ..core import logging as log
from ..core import sd_notify
from ..core.errors import LifeboatError
from ..core.runtime import config_reloader, run
from ..core.watchdog import ping_while_progressing
from .server import SHUTDOWN_BUDGET_SECONDS, MasterTarget

__all__ = ["SHUTDOWN_BUDGET_SECONDS", "main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifeboat-master-target", description=__doc__)
    ap.add_argument("-c", "--config", default="/etc/lifeboat/master-target.toml")
    ap.add_argument("--check-config", action="store_true")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg = cfgmod.load(cfgmod.MasterTargetConfig, args.config)
    except LifeboatError as exc:
        print(f"lifeboat-master-target: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.check_config:
        print(f"{args.config}: OK")
        return 0
    log.configure(cfg.log.level, cfg.log.format, "lifeboat-master-target")
    logger = log.get("lifeboat.master_target")

    async def daemon(stop: asyncio.Event) -> int:
        mt = MasterTarget(cfg)
        try:
            await mt.start()
        except (LifeboatError, OSError) as exc:
            logger.error("cannot start", error=str(exc))
            await mt.stop()
            return getattr(exc, "exit_code", 1)
        # start() recovered the journal (interrupted applies resume) and bound both listeners.
        sd_notify.notify("READY=1")
        pinger = asyncio.create_task(ping_while_progressing(mt.progress), name="watchdog")
        await stop.wait()
        sd_notify.notify("STOPPING=1")
        logger.info("stopping", budget_seconds=SHUTDOWN_BUDGET_SECONDS)
        pinger.cancel()
        await mt.stop()
        logger.info("stopped")
        return 0

    return run(daemon, config_reloader(cfgmod.MasterTargetConfig, args.config, "lifeboat-master-target", cfg))


if __name__ == "__main__":
    sys.exit(main())
