"""The same data path on Azure Blob Storage (Azurite on 127.0.0.1): replicate, take points, fail over, verify."""

from __future__ import annotations

import uuid

import pytest
from azure.storage.blob import BlobServiceClient

from disk_images import make_image, scribble
from lab import Lab, sha256_file
from markers import objects_with_markers, plant_markers


@pytest.fixture
def azure_lab(tmp_path, azurite):
    container = f"lifeboat-{uuid.uuid4().hex[:12]}"
    deployment = Lab(tmp_path / "lab", repo_url=f"azure://{container}", azure_connection_string=azurite)
    yield deployment
    deployment.close()


def test_replication_to_azure_recovers_each_point_and_verifies(azure_lab, azurite, tmp_path):
    lab = azure_lab
    disk = make_image(tmp_path / "sda.img", 16, seed=31)
    markers = plant_markers(disk)
    lab.start_ps({"upload": {"threads": 2}})
    expected = []
    for cycle in range(2):
        if cycle:
            scribble(disk, 40, seed=cycle)
        assert lab.run_agent("web01", {"sda": disk}, cycles=1,
                             extra={"replication": {"batch_bytes": 2 << 20}}) == 0
        expected.append(sha256_file(disk))
    points = lab.wait_points(2)
    for point, want in zip(points, expected):
        out = tmp_path / f"{point['point_id']}.img"
        res = lab.failover(point["point_id"], out)
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == want
    res = lab.cli("verify")
    assert res.returncode == 0, res.stdout + res.stderr
    # The objects really are blobs in the repository's own container, and none holds plaintext.
    container = lab.init["repository"].removeprefix("azure://")
    blobs = BlobServiceClient.from_connection_string(azurite).get_container_client(container)
    names = [b.name for b in blobs.list_blobs()]
    assert "config" in names and any(n.startswith("disks/web01.sda/log/") for n in names), names
    marker = b"the quick brown fox jumps over the lazy dog"
    stored = {name: blobs.download_blob(name).readall() for name in names}
    for name, data in stored.items():
        assert marker not in data, name
    # Unique markers inside random blocks (zstd stores those raw): none in any blob, yet every one went through
    # the repository (the first point's recovered image holds them all).
    assert objects_with_markers(stored, markers) == []
    first = (tmp_path / f"{points[0]['point_id']}.img").read_bytes()
    assert len(objects_with_markers({"point 1": first}, markers)) == len(markers)
