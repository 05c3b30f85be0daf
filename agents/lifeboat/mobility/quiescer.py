"""Pre/post scripts around a cycle's reads (the reference's --pre/--post convention), with timeouts."""

from __future__ import annotations

import asyncio
import os
import time

from ..core import logging as log

logger = log.get("lifeboat.mobility.quiescer")


async def run_script(path: str, phase: str, timeout: float, env: dict[str, str]) -> tuple[bool, str]:
    """Run a pre or post script; (ok, reason). A script that times out is killed with its group."""
    if not path:
        return True, "no script"
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            path, phase, env={**os.environ, **env, "LIFEBOAT_PHASE": phase},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"cannot run {path}: {exc.strerror}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        await proc.wait()
        return False, f"{phase} script {path} timed out after {timeout:.0f} s"
    seconds = round(time.monotonic() - t0, 3)
    tail = out[-500:].decode(errors="replace").strip()
    if proc.returncode != 0:
        return False, f"{phase} script {path} exited with {proc.returncode}: {tail}"
    logger.debug("script done", phase=phase, script=path, seconds=seconds)
    return True, "ok"
