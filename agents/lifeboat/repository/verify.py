"""Read and authenticate every repository object; report each damaged one by name."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from ..core.errors import LifeboatError
from ..core.wire import FRAME_BOOKMARK
from .repo import CONFIG_NAME, Repository, segment_name


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (object name, what is wrong)


async def verify_repository(repo: Repository, progress=None) -> VerifyReport:
    report = VerifyReport()
    backend = repo.backend
    names = await backend.list("")
    known_segments: set[str] = set()
    for name in names:
        report.checked += 1
        try:
            if name == CONFIG_NAME or name.startswith("keys/"):
                continue  # opened when the repository was unlocked
            if name.startswith("disks/") and "/log/" in name:
                disk_id, _, seq = name[len("disks/"):].partition("/log/")
                reader = await repo.read_segment(disk_id, int(seq))
                report.bytes += len(reader.data)
                await asyncio.to_thread(reader.verify_all)
                known_segments.add(name)
            elif name.startswith("points/"):
                entry = await repo.read_point(name)
                seg = segment_name(entry.disk_id, entry.seq)
                if seg not in names:
                    raise LifeboatError(f"refers to {seg}, which does not exist")
                reader = await repo.read_segment(entry.disk_id, entry.seq)
                if entry.frame_index >= len(reader.entries) or reader.entries[entry.frame_index].kind != FRAME_BOOKMARK:
                    raise LifeboatError(f"frame {entry.frame_index} of {seg} is not its bookmark")
                if json.loads(reader.payload(entry.frame_index))["point_id"] != entry.point_id:
                    raise LifeboatError(f"bookmark in {seg} names another point")
            else:
                raise LifeboatError("unexpected object in the repository")
        except (LifeboatError, ValueError) as exc:
            what = str(exc)
            report.problems.append((getattr(exc, "object_name", name), what))
        if progress:
            progress(report.checked, len(names))
    return report
