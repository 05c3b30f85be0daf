"""`lifeboat failover --to-azure`: materialise each disk, upload it as a fixed-VHD page blob, describe the VM."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ..core.errors import ConfigError, IntegrityError, LifeboatError
from ..repository.azure_vm import FailedOverDisk, FailedOverMachine, write_descriptors
from ..repository.materialize import materialize
from ..repository.open import _read_secret
from .points import GroupFailoverRefused, MachinePoint, group_points, machine_points, point_group, resolve, \
    resolve_group

if TYPE_CHECKING:
    from ..repository.page_blob_target import PageBlobTarget

logger = structlog.get_logger("lifeboat.cli.azure_failover")

ProgressFactory = Callable[[str], Callable[[int, int], None]]


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Azure target (instead of a local image)")
    g.add_argument("--to-azure", metavar="CONTAINER[/PREFIX]",
                   help="upload each disk as the fixed-VHD page blob CONTAINER/[PREFIX/]<disk-id>.vhd and write "
                        "<machine>.machine.json and <machine>.arm.json into the --to directory (default: .)")
    g.add_argument("--to-azure-connection-string-file", metavar="F",
                   help="connection string of the target storage account (default: the repository's "
                        "--azure-connection-string-file)")
    g.add_argument("--keep-staging", action="store_true",
                   help="keep the local staging images (<--to>/<disk-id>.img) after the upload")
    g.add_argument("--verify-upload", action="store_true",
                   help="read every uploaded page back and compare it with the staging image")
    g.add_argument("--os-disk", help="the OS disk's name (default: the first disk in name order)")


def _selected(args, entries) -> list[tuple[MachinePoint, list[str]]]:
    """The machine points and their disk ids to fail over, as plain `lifeboat failover` picks them."""
    if args.group:
        if args.machine or args.disk:
            raise LifeboatError("--group fails over every disk of every member of the group: --machine and --disk "
                                "do not apply")
        gp = resolve_group(group_points(entries, args.group), args.group, args.point)
        return [(mp, sorted(mp.disks)) for _, mp in sorted(gp.members.items())]
    point = resolve(machine_points(entries), args.point, args.machine)
    group = point_group(point)
    if group:
        raise GroupFailoverRefused(f"machine {point.machine} is in consistency group {group}: fail over the whole "
                                   f"group with --group {group} (a member alone would not match the others' instant)")
    disks = sorted(point.disks)
    if args.disk:
        wanted = f"{point.machine}.{args.disk}"
        if wanted not in point.disks:
            raise LifeboatError(f"point {point.point_id} has no disk {args.disk!r} (it has "
                                f"{', '.join(d.split('.', 1)[1] for d in disks)})")
        disks = [wanted]
    return [(point, disks)]


def _connection_string(args) -> str:
    path = args.to_azure_connection_string_file or args.azure_connection_string_file
    if not path:
        raise ConfigError("--to-azure-connection-string-file", "--to-azure needs the target storage account's "
                          "connection string in a file")
    return _read_secret(path, "--to-azure-connection-string-file")


def _mib_progress(factory: ProgressFactory | None, label: str) -> Callable[[int, int], None] | None:
    if factory is None:
        return None
    show = factory(f"{label} MiB")
    return lambda done, total: show(done >> 20, total >> 20)


async def run(args, repo, progress: ProgressFactory | None) -> int:
    # The Azure SDK and aiohttp cost ~0.3 s of start-up: only --to-azure loads them.
    from ..repository.page_blob_target import PageBlobTarget, parse_target

    container, prefix = parse_target(args.to_azure)
    conn = _connection_string(args)
    damaged: list[IntegrityError] = []
    selected = _selected(args, await repo.list_points(damaged=damaged))
    for exc in damaged:
        print(f"lifeboat: damaged catalog entry left out: {exc}", file=sys.stderr)
    out_dir = os.path.abspath(args.to or ".")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LifeboatError(f"{out_dir} is not a directory: with --to-azure, --to names the directory for the "
                            "staging images and the machine descriptors")
    os.makedirs(out_dir, exist_ok=True)
    show = None if args.quiet else progress
    if args.os_disk:
        for point, disk_ids in selected:
            if f"{point.machine}.{args.os_disk}" not in disk_ids:
                raise LifeboatError(f"--os-disk {args.os_disk!r} is not a disk of {point.machine} at point "
                                    f"{point.point_id} (it has {', '.join(d.split('.', 1)[1] for d in disk_ids)})")
    async with PageBlobTarget(conn, container) as target:
        # Before any work: a blob in the way would otherwise stop the failover after the first disks.
        if not args.overwrite:
            for point, disk_ids in selected:
                for disk_id in disk_ids:
                    if await target.exists(f"{prefix}{disk_id}.vhd"):
                        raise LifeboatError(f"azure://{container}/{prefix}{disk_id}.vhd exists; pass --overwrite "
                                            "to replace it, or choose another --to-azure prefix")
        uploaded: list[str] = []
        try:
            await _fail_over(args, repo, target, selected, prefix, out_dir, show, uploaded)
        except BaseException:
            if uploaded:
                print(f"lifeboat failover: {len(uploaded)} disk(s) were uploaded before the failure and stay "
                      f"(complete VHDs): {', '.join(uploaded)}; run again with --overwrite", file=sys.stderr)
            raise
    return 0


async def _fail_over(args, repo, target: PageBlobTarget, selected, prefix: str, out_dir: str, show,
                     uploaded: list[str]) -> None:
    """Per machine: materialise, upload and (unless kept) drop each disk's staging image, then write
    the machine's descriptor and ARM template. Each uploaded blob's URL is appended to `uploaded`."""
    for point, disk_ids in selected:
        _warn_if_short_of_space(out_dir, [point.disks[d].disk_size for d in disk_ids])
        disks = []
        for disk_id in disk_ids:
            entry = point.disks[disk_id]
            staging = os.path.join(out_dir, f"{disk_id}.img")
            # Staging: the image is materialised locally first (sparse: it takes the point's used
            # bytes), then uploaded; streaming straight into the blob is a later step.
            res = await materialize(repo, entry, staging, args.overwrite,
                                    show and show(f"{disk_id} segments"))
            try:
                up = await target.upload(staging, f"{prefix}{disk_id}.vhd", overwrite=args.overwrite,
                                         verify=args.verify_upload,
                                         progress=_mib_progress(show, f"{disk_id} upload"))
            finally:
                if not args.keep_staging:
                    os.unlink(staging)
            disks.append(FailedOverDisk(disk_id, up.url, up.disk_size, up.vhd_size, res.image_digest))
            uploaded.append(up.url)
            print(json.dumps({"point_id": point.point_id, "machine": point.machine, "disk_id": disk_id,
                              "blob_url": up.url, "disk_size": up.disk_size, "vhd_size": up.vhd_size,
                              "uploaded_bytes": up.uploaded_bytes, "image_digest": res.image_digest,
                              "staging": staging if args.keep_staging else None,
                              "verified": True, "read_back": up.verified}), flush=True)
        os_disk = f"{point.machine}.{args.os_disk}" if args.os_disk else ""
        machine = FailedOverMachine(point.machine, point.point_id, point.consistency, point.created, disks,
                                    os_disk=os_disk, hints=_hints(point, disk_ids))
        descriptor, template = write_descriptors(out_dir, machine)
        print(json.dumps({"machine": point.machine, "point_id": point.point_id, "machine_descriptor": descriptor,
                          "arm_template": template}), flush=True)


def _hints(point: MachinePoint, disk_ids: list[str]) -> dict:
    """What the source told us about itself (the agent records no OS or firmware facts yet)."""
    first = point.disks[disk_ids[0]]
    return {"block_size": first.block_size, "cycle": first.cycle, "group": first.group,
            "group_tag": first.group_tag, "group_members": list(first.group_members),
            "source_disks": {d: point.disks[d].disk_size for d in disk_ids}}


def _warn_if_short_of_space(out_dir: str, sizes: list[int]) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < max(sizes):
        # Sparse staging images need only the point's used bytes, which the catalog does not record:
        # warn, do not refuse.
        logger.warning("staging_space_low", dir=out_dir, free_bytes=free, largest_disk_bytes=max(sizes),
                       hint="a staging image needs local space for the disk's used bytes")
