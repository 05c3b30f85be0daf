"""Read and authenticate every repository object; report each damaged one, and each missing one a point needs."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from ..core import checkpoint as ckfmt
from ..core.errors import IntegrityError, LifeboatError
from ..core.wire import FRAME_BOOKMARK
from .checkpoints import read_chunk, read_manifest
from .repo import CONFIG_NAME, Repository, segment_name


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (object name, what is wrong)
    unreferenced: list[str] = field(default_factory=list)   # chunks no manifest refers to (interrupted pass)


def _missing_ranges(seqs: list[int]) -> str:
    runs, start = [], None
    for i, s in enumerate(seqs):
        if start is None:
            start = s
        if i + 1 == len(seqs) or seqs[i + 1] != s + 1:
            runs.append(f"{start}" if start == s else f"{start}..{s}")
            start = None
    return ", ".join(runs)


async def verify_repository(repo: Repository, progress=None) -> VerifyReport:
    report = VerifyReport()
    backend = repo.backend
    names = await backend.list("")
    known_segments: set[str] = set()
    checkpoints: dict[str, set[int]] = {}      # disk -> seqs of intact checkpoints
    chunk_names = [n for n in names if (p := ckfmt.parse_object_name(n)) and p[0] == "chunk"]
    referenced: set[str] = set()
    opened: dict[str, bool] = {}   # chunk name -> damaged (chunks shared by checkpoints are opened once)
    points = []
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
            elif (parsed := ckfmt.parse_object_name(name)) is not None:
                if parsed[0] != "manifest":
                    continue   # authenticated through the manifests that refer to it
                _, disk_id, seq = parsed
                manifest = await read_manifest(repo, disk_id, seq)
                bad = False
                for i, cid in manifest.refs:
                    chunk = ckfmt.chunk_name(disk_id, cid)
                    referenced.add(chunk)
                    if chunk in opened:
                        bad = bad or opened[chunk]
                        continue
                    try:
                        await read_chunk(repo, manifest, i, cid)
                        opened[chunk] = False
                    except IntegrityError as exc:
                        report.problems.append((exc.object_name, str(exc)))
                        opened[chunk] = bad = True
                if not bad:
                    checkpoints.setdefault(disk_id, set()).add(seq)
            elif name.startswith("points/"):
                entry = await repo.read_point(name)
                seg = segment_name(entry.disk_id, entry.seq)
                if seg not in names:
                    raise LifeboatError(f"refers to {seg}, which does not exist")
                points.append((name, entry))
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
    # A log whose early segments were compacted away is complete when a checkpoint before the point covers them.
    present = set(names)
    for name, entry in points:
        base = max((c for c in checkpoints.get(entry.disk_id, ()) if c < entry.seq), default=0)
        missing = [s for s in range(base + 1, entry.seq + 1) if segment_name(entry.disk_id, s) not in present]
        if missing:
            report.problems.append((name, f"needs segment(s) {_missing_ranges(missing)} of {entry.disk_id}, which are "
                                          f"gone, and no checkpoint covers them"))
    report.unreferenced = sorted(set(chunk_names) - referenced)
    return report
