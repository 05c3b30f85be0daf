"""`lifeboat retention apply|commit`: thin a machine's points and compact its log, or keep one point only."""

from __future__ import annotations

import json
import math
import time

from ..core.errors import LifeboatError
from ..repository.retention import HOUR, RetentionPolicy, RetentionReport, apply_retention, drop_points_except
from .repo_args import add_repo_args, open_from_args


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LifeboatError(f"{text!r} is not a number of hours") from None
    if not math.isfinite(value) or value < 0:
        raise LifeboatError(f"{text!r} hours: give a finite number >= 0 (0 keeps only the latest point)")
    return value


def _print(report: RetentionReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    saved = report.bytes_before - report.bytes_after
    print(f"machine {report.machine}: kept {len(report.kept_points)} points, dropped {len(report.dropped_points)}; "
          f"{len(report.checkpoints_written)} checkpoint(s) written, {report.segments_deleted} segment(s) and "
          f"{len(report.deleted_objects)} object(s) deleted; {report.bytes_before} -> {report.bytes_after} bytes "
          f"({saved} freed)")
    for pid in report.dropped_points:
        print(f"dropped {pid}")


async def cmd_apply(args) -> int:
    if args.checkpoint_every < 0:
        raise LifeboatError(f"--checkpoint-every {args.checkpoint_every}: give a number of segments >= 0 (0: off)")
    policy = RetentionPolicy(_hours(args.retention_hours) * HOUR, _hours(args.keep_all_hours) * HOUR,
                             args.checkpoint_every)
    now = time.time() if args.now is None else args.now
    repo = await open_from_args(args)
    try:
        report = await apply_retention(repo, args.machine, policy, now, work_dir=args.work_dir)
    finally:
        await repo.backend.close()
    _print(report, args.json)
    return 0


async def cmd_commit(args) -> int:
    repo = await open_from_args(args)
    try:
        report = await drop_points_except(repo, args.machine, args.point, work_dir=args.work_dir)
    finally:
        await repo.backend.close()
    _print(report, args.json)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("retention", help="enforce recovery-point retention (thin, checkpoint, compact)")
    cmds = p.add_subparsers(dest="retention_command", required=True)

    a = cmds.add_parser("apply", help="drop thinned points of a machine and compact its log into a checkpoint")
    add_repo_args(a)
    a.add_argument("--machine", required=True)
    a.add_argument("--retention-hours", required=True, help="how far back points are kept (0: only the latest)")
    a.add_argument("--keep-all-hours", default="2", help="every point younger than this is kept (default 2)")
    a.add_argument("--now", type=float, help="unix time to thin at (default: now); a later time previews or "
                                             "tests what retention does then")
    a.add_argument("--checkpoint-every", type=int, default=RetentionPolicy.checkpoint_interval_segments,
                   metavar="SEGMENTS", help="also checkpoint just before the newest point once this many segments "
                   "follow the newest checkpoint, so failover of recent points stays short (default "
                   f"{RetentionPolicy.checkpoint_interval_segments}; 0: off)")
    a.add_argument("--work-dir", help="where the sparse temporary image of a checkpoint is built (default $TMPDIR)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_apply)

    c = cmds.add_parser("commit", help="failover commit: keep only --point of the machine, drop the others")
    add_repo_args(c)
    c.add_argument("--machine", required=True)
    c.add_argument("--point", required=True, help="the point id the machine was failed over to")
    c.add_argument("--work-dir", help="where the sparse temporary image of a checkpoint is built (default $TMPDIR)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_commit)
