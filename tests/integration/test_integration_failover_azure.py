"""Failover to an Azure page blob (Azurite): a fixed VHD whose footer parses and whose data is the point."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from disk_images import make_image, scribble
from lab import Lab, sha256_file
from lifeboat.cli.main import main
from lifeboat.repository.vhd import VHD_FOOTER_BYTES, chs_geometry, parse_footer, rounded_size
from test_integration_cli_group import GROUP, Deployment

MiB = 1024 * 1024


def download(conn: str, url: str) -> bytes:
    """The whole blob behind url (container/blob after the account in an Azurite URL)."""
    container, blob = re.match(r"http://127\.0\.0\.1:\d+/devstoreaccount1/([^/]+)/(.+)$", url).groups()
    client = BlobServiceClient.from_connection_string(conn)
    props = client.get_blob_client(container, blob).get_blob_properties()
    assert props.blob_type == "PageBlob"
    return client.get_blob_client(container, blob).download_blob().readall()


def check_vhd(blob: bytes, disk_size: int, want_sha256: str) -> None:
    """The Must-show check: the last 512 bytes are a fixed VHD footer of the rounded size with a good
    checksum (parse_footer checks it), and the data part is the point's image plus zero padding."""
    vhd_size = rounded_size(disk_size)
    assert len(blob) == vhd_size + VHD_FOOTER_BYTES
    footer = parse_footer(blob[-VHD_FOOTER_BYTES:])
    assert footer.current_size == footer.original_size == vhd_size
    assert (footer.cylinders, footer.heads, footer.sectors_per_track) == chs_geometry(vhd_size)
    assert hashlib.sha256(blob[:disk_size]).hexdigest() == want_sha256
    assert blob[disk_size:vhd_size] == bytes(vhd_size - disk_size)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} not found (install qemu-utils, listed in .ci/run)"
    if os.environ.get("LIFEBOAT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}; LIFEBOAT_REQUIRE_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def qemu_reads_as(blob: bytes, tmp_path: Path, disk_size: int, want_sha256: str) -> None:
    """An independent VHD reader: qemu-img takes the blob as a fixed VHD of the rounded size whose
    first disk_size bytes are the point's image (want_sha256) and the rest zeros."""
    vhd_size = rounded_size(disk_size)
    qemu = require_tool("qemu-img")
    vhd_path, raw = tmp_path / "downloaded.vhd", tmp_path / "downloaded.raw"
    vhd_path.write_bytes(blob)
    opts = f"driver=vpc,force_size_calc=current_size,file.filename={vhd_path}"  # as Azure: trust current_size
    info = json.loads(subprocess.run([qemu, "info", "--output=json", "--image-opts", opts], check=True,
                                     capture_output=True, text=True).stdout)
    assert (info["format"], info["virtual-size"]) == ("vpc", vhd_size)
    subprocess.run([qemu, "convert", "--image-opts", opts, "-O", "raw", str(raw)], check=True)
    data = raw.read_bytes()
    assert len(data) == vhd_size and data[disk_size:] == bytes(vhd_size - disk_size)
    assert hashlib.sha256(data[:disk_size]).hexdigest() == want_sha256


def test_failover_to_azurite_page_blob_is_a_fixed_vhd_of_the_point(tmp_path, azurite):
    lab = Lab(tmp_path / "lab")
    try:
        # Not a whole number of MiB, so the VHD needs padding; sparse, so holes are skipped.
        disk = make_image(tmp_path / "sda.img", 9, seed=5)
        disk_size = 9 * MiB - 12 * 4096
        os.truncate(disk, disk_size)
        lab.start_ps()
        expected = []
        for cycle in range(2):
            if cycle:
                scribble(disk, 30, seed=cycle)
            assert lab.run_agent("web01", {"sda": str(disk)}, cycles=1) == 0
            expected.append(sha256_file(disk))
        points = lab.wait_points(2)
        conn_file = tmp_path / "target.conn"
        conn_file.write_text(azurite)
        container = f"dr-{uuid.uuid4().hex[:12]}"
        out_dir = tmp_path / "failover"
        # The older point, with the read-back pass: the latest must not be what we get by accident.
        res = lab.failover(points[0]["point_id"], out_dir, "--to-azure", f"{container}/drill1",
                           "--to-azure-connection-string-file", str(conn_file), "--verify-upload")
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        disk_row, machine_row = rows
        assert disk_row["blob_url"].endswith(f"/{container}/drill1/web01.sda.vhd")
        assert disk_row["disk_size"] == disk_size and disk_row["vhd_size"] == 9 * MiB and disk_row["read_back"]
        # Holes and zero ranges are not sent (the image is ~30% zeros in 64 KiB runs; 4 MiB ranges).
        assert 0 < disk_row["uploaded_bytes"] <= disk_size
        blob = download(azurite, disk_row["blob_url"])
        check_vhd(blob, disk_size, expected[0])
        qemu_reads_as(blob, tmp_path, disk_size, expected[0])
        assert not (out_dir / "web01.sda.img").exists(), "the staging image is removed after the upload"

        descriptor = json.loads(Path(machine_row["machine_descriptor"]).read_text())
        assert descriptor["point_id"] == points[0]["point_id"] and descriptor["machine"] == "web01"
        assert [d["blob_url"] for d in descriptor["disks"]] == [disk_row["blob_url"]]
        assert descriptor["disks"][0]["padding_bytes"] == 9 * MiB - disk_size
        template = json.loads(Path(machine_row["arm_template"]).read_text())
        assert [r["properties"]["creationData"]["sourceUri"] for r in template["resources"]
                if r["type"] == "Microsoft.Compute/disks"] == [disk_row["blob_url"]]

        # The latest point into the same container; existing blobs are refused without --overwrite.
        res = lab.failover("latest", out_dir, "--to-azure", f"{container}/drill1",
                           "--to-azure-connection-string-file", str(conn_file))
        assert res.returncode != 0 and "exists; pass --overwrite" in res.stderr
        res = lab.failover("latest", out_dir, "--to-azure", f"{container}/drill1", "--overwrite", "--keep-staging",
                           "--to-azure-connection-string-file", str(conn_file))
        assert res.returncode == 0, res.stderr
        row = json.loads(res.stdout.splitlines()[0])
        check_vhd(download(azurite, row["blob_url"]), disk_size, expected[1])
        assert sha256_file(row["staging"]) == expected[1]
    finally:
        lab.close()


def test_group_failover_to_azurite_writes_every_members_vhd_and_template(tmp_path, capsys, azurite):
    dep = Deployment(tmp_path, capsys)

    async def fill() -> None:
        await dep.cycle("db01", "db01-g1", 100.0, "app", tag="g1")
        await dep.cycle("web01", "web01-g1", 100.5, "app", tag="g1")
    asyncio.run(fill())
    conn_file = tmp_path / "target.conn"
    conn_file.write_text(azurite)
    container = f"dr-{uuid.uuid4().hex[:12]}"
    out_dir = tmp_path / "dr"
    code = main(["failover", *dep.repo_args, "--test", "--group", GROUP, "--to", str(out_dir),
                 "--to-azure", container, "--to-azure-connection-string-file", str(conn_file), "--os-disk", "sda"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # Without -q: a progress bar per disk for the replay and for the upload (stderr is not a TTY here).
    for disk_id in ("db01.sda", "web01.sda", "web01.sdb"):
        assert f"{disk_id} segments [" in err and f"{disk_id} upload MiB [" in err, err
    rows = [json.loads(line) for line in out.splitlines()]
    disks = {r["disk_id"]: r for r in rows if "disk_id" in r}
    assert sorted(disks) == ["db01.sda", "web01.sda", "web01.sdb"]
    for disk_id, r in disks.items():
        want = hashlib.sha256(dep.expected[(r["point_id"], disk_id)]).hexdigest()
        check_vhd(download(azurite, r["blob_url"]), r["disk_size"], want)
        assert r["blob_url"].endswith(f"/{container}/{disk_id}.vhd")
    machines = {r["machine"]: r for r in rows if "arm_template" in r}
    assert sorted(machines) == ["db01", "web01"]
    web = json.loads(Path(machines["web01"]["arm_template"]).read_text())
    vm = next(r for r in web["resources"] if r["type"] == "Microsoft.Compute/virtualMachines")
    assert vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"].endswith("'-sda'))]")
    assert len(vm["properties"]["storageProfile"]["dataDisks"]) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["db01.arm.json", "db01.machine.json",
                                                         "web01.arm.json", "web01.machine.json"]


def test_failover_to_azure_rejects_bad_targets_before_any_work(tmp_path, capsys, azurite):
    dep = Deployment(tmp_path, capsys)
    asyncio.run(dep.cycle("solo", "solo-1", 15.0))
    conn_file = tmp_path / "target.conn"
    conn_file.write_text(azurite)
    base = ["failover", *dep.repo_args, "--test", "--to", str(tmp_path / "dr"), "-q"]
    code = main([*base, "--to-azure", "Bad_Container", "--to-azure-connection-string-file", str(conn_file)])
    assert code == 78 and "not an Azure container name" in capsys.readouterr().err
    code = main([*base, "--to-azure", "okcontainer"])
    assert code == 78 and "connection string" in capsys.readouterr().err
    (tmp_path / "garbage.conn").write_text("not a connection string")
    code = main([*base, "--to-azure", "okcontainer", "--to-azure-connection-string-file",
                 str(tmp_path / "garbage.conn")])
    assert code == 78 and "not a valid Azure Storage connection string" in capsys.readouterr().err
    code = main(["failover", *dep.repo_args, "--test", "-q"])
    assert code == 2 and "--to-azure CONTAINER" in capsys.readouterr().err
    assert not (tmp_path / "dr").exists() or not any((tmp_path / "dr").iterdir())


def test_repository_on_azure_and_target_default_to_the_same_account(tmp_path, azurite):
    """Without --to-azure-connection-string-file the repository's account is the target (another container)."""
    lab = Lab(tmp_path / "lab", repo_url=f"azure://repo-{uuid.uuid4().hex[:12]}", azure_connection_string=azurite)
    try:
        disk = make_image(tmp_path / "sda.img", 3, seed=9)
        lab.start_ps()
        assert lab.run_agent("db01", {"sda": str(disk)}, cycles=1) == 0
        want = sha256_file(disk)
        lab.wait_points(1)
        container = f"dr-{uuid.uuid4().hex[:12]}"
        res = lab.failover("latest", tmp_path / "out", "--to-azure", f"{container}/a/b")
        assert res.returncode == 0, res.stderr
        row = json.loads(res.stdout.splitlines()[0])
        assert f"/{container}/a/b/db01.sda.vhd" in row["blob_url"] and row["vhd_size"] == 3 * MiB
        check_vhd(download(azurite, row["blob_url"]), 3 * MiB, want)
    finally:
        lab.close()


def test_failover_to_azure_checks_os_disk_and_existing_blobs_before_uploading(tmp_path, capsys, azurite):
    dep = Deployment(tmp_path, capsys)

    async def fill() -> None:
        await dep.cycle("db01", "db01-g1", 100.0, "app", tag="g1")
        await dep.cycle("web01", "web01-g1", 100.5, "app", tag="g1")
    asyncio.run(fill())
    conn_file = tmp_path / "target.conn"
    conn_file.write_text(azurite)
    container = f"dr-{uuid.uuid4().hex[:12]}"
    out_dir = tmp_path / "dr"
    base = ["failover", *dep.repo_args, "--test", "--group", GROUP, "--to", str(out_dir), "-q",
            "--to-azure", container, "--to-azure-connection-string-file", str(conn_file)]
    blobs = BlobServiceClient.from_connection_string(azurite).get_container_client(container)

    # db01 has only sda: --os-disk sdb is refused before anything is written.
    assert main([*base, "--os-disk", "sdb"]) == 2
    assert "--os-disk 'sdb' is not a disk of db01 at point db01-g1 (it has sda)" in capsys.readouterr().err
    assert not blobs.exists()

    # A blob in the way of the last disk stops the failover before the first disk is materialised.
    blobs.create_container()
    blobs.upload_blob("web01.sdb.vhd", b"someone else's")
    assert main(base) == 2
    assert f"azure://{container}/web01.sdb.vhd exists; pass --overwrite" in capsys.readouterr().err
    assert [b.name for b in blobs.list_blobs()] == ["web01.sdb.vhd"]
    assert not out_dir.exists() or not any(out_dir.iterdir())

    # A failure after some disks were uploaded names the blobs that stay (complete VHDs).
    out_dir.mkdir(exist_ok=True)
    (out_dir / "web01.sda.img").write_bytes(b"a staging image left from another run")
    blobs.delete_blob("web01.sdb.vhd")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "web01.sda.img exists; pass --overwrite" in err
    assert re.search(r"1 disk\(s\) were uploaded before the failure and stay \(complete VHDs\): "
                     rf"http://\S+/{container}/db01\.sda\.vhd; run again with --overwrite", err), err
    check_vhd(blobs.download_blob("db01.sda.vhd").readall(), len(dep.expected[("db01-g1", "db01.sda")]),
              hashlib.sha256(dep.expected[("db01-g1", "db01.sda")]).hexdigest())
