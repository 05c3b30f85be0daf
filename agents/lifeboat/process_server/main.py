"""`lifeboat-process-server`: the replication gateway daemon."""

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
from .server import SHUTDOWN_BUDGET_SECONDS, ProcessServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifeboat-process-server", description=__doc__)
    ap.add_argument("-c", "--config", default="/etc/lifeboat/process-server.toml")
    ap.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg = cfgmod.load(cfgmod.ProcessServerConfig, args.config)
    except LifeboatError as exc:
        print(f"lifeboat-process-server: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.check_config:
        print(f"{args.config}: OK")
        return 0
    log.configure(cfg.log.level, cfg.log.format, "lifeboat-process-server")
    logger = log.get("lifeboat.process_server")

    async def daemon(stop: asyncio.Event) -> int:
        server = ProcessServer(cfg)
        try:
            await server.start()
        except LifeboatError as exc:
            logger.error("cannot start", error=str(exc))
            await server.stop()
            return exc.exit_code
        # start() recovered the cache and bound both listeners: only now is the service usable.
        sd_notify.notify("READY=1")
        pinger = asyncio.create_task(ping_while_progressing(server.progress), name="watchdog")
        await stop.wait()
        sd_notify.notify("STOPPING=1")  # also sent by the signal handler; this covers other stops
        logger.info("stopping", budget_seconds=SHUTDOWN_BUDGET_SECONDS)
        pinger.cancel()
        await server.stop()
        logger.info("stopped")
        return 0

    return run(daemon, config_reloader(cfgmod.ProcessServerConfig, args.config, "lifeboat-process-server", cfg))


if __name__ == "__main__":
    sys.exit(main())
