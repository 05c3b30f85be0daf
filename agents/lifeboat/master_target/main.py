"""`lifeboat-master-target`: failback receiver; this release only serves /healthz and /metrics."""

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
from ..core.watchdog import ping_while_progressing
from .metrics import MasterTargetMetrics

# Shutdown stages; SHUTDOWN_BUDGET_SECONDS must stay below TimeoutStopSec= of its unit (tested).
STOP_LISTENER_SECONDS = 5
SHUTDOWN_BUDGET_SECONDS = STOP_LISTENER_SECONDS


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
    registry = MasterTargetMetrics().registry

    async def daemon(stop: asyncio.Event) -> int:
        runner, port = await start_metrics_server(registry, cfg.metrics.host, cfg.metrics.port,
                                                  lambda: (True, {"role": "master-target", "apply": "not implemented"}))
        logger = log.get("lifeboat.master_target")
        logger.info("master target ready (health and metrics only)", metrics_port=port)
        sd_notify.notify("READY=1")
        # No pipeline yet: progress is the event loop turning, which the ping task itself proves.
        pinger = asyncio.create_task(ping_while_progressing(lambda: (True, "")), name="watchdog")
        await stop.wait()
        sd_notify.notify("STOPPING=1")
        pinger.cancel()
        try:
            await asyncio.wait_for(runner.cleanup(), STOP_LISTENER_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("listener did not close in time", seconds=STOP_LISTENER_SECONDS)
        return 0

    return run(daemon, config_reloader(cfgmod.MasterTargetConfig, args.config, "lifeboat-master-target", cfg))


if __name__ == "__main__":
    sys.exit(main())
