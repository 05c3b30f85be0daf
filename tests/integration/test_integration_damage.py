"""Repository damage is found and named, never skipped: one flipped byte in one stored object."""

from __future__ import annotations

from pathlib import Path

from disk_images import make_image, scribble
from lab import sha256_file


def repo_dir(lab) -> Path:
    return Path(lab.init["repository"].removeprefix("local:"))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def replicate_three_points(lab, tmp_path):
    disk = make_image(tmp_path / "sda.img", 16)
    lab.start_ps()
    hashes = []
    for cycle in range(3):
        scribble(disk, 40, seed=100 + cycle)
        assert lab.run_agent("web01", {"sda": disk}, cycles=1) == 0
        hashes.append(sha256_file(disk))
    points = lab.wait_points(3)
    assert lab.stop_ps() == 0
    return points, hashes


def test_flipped_byte_in_segment_is_named_by_verify_and_failover(lab, tmp_path):
    points, hashes = replicate_three_points(lab, tmp_path)
    last_seq = points[-1]["disks"]["web01.sda"]["seq"]
    name = f"disks/web01.sda/log/{last_seq:020d}"
    segment = repo_dir(lab) / name
    flip_byte(segment, segment.stat().st_size // 2)

    v = lab.cli("verify", "-q")
    assert v.returncode != 0
    assert f"DAMAGED {name}" in v.stdout
    assert f"first damaged object: {name}" in v.stderr

    res = lab.failover(points[-1]["point_id"], tmp_path / "last.img")
    assert res.returncode != 0
    assert name in res.stderr and "error" in res.stderr, res.stderr
    # Points whose log ends before the damaged segment are still recoverable, byte for byte.
    res = lab.failover(points[0]["point_id"], tmp_path / "first.img")
    assert res.returncode == 0, res.stderr
    assert sha256_file(tmp_path / "first.img") == hashes[0]


def test_flipped_byte_in_segment_header_and_footer(lab, tmp_path):
    points, _ = replicate_three_points(lab, tmp_path)
    seq = points[1]["disks"]["web01.sda"]["seq"]
    name = f"disks/web01.sda/log/{seq:020d}"
    segment = repo_dir(lab) / name
    for offset in (10, segment.stat().st_size - 3):
        flip_byte(segment, offset)
        v = lab.cli("verify", "-q")
        assert v.returncode != 0 and f"DAMAGED {name}" in v.stdout, (offset, v.stdout)
        res = lab.failover(points[1]["point_id"], tmp_path / "p.img", "--overwrite")
        assert res.returncode != 0 and name in res.stderr, (offset, res.stderr)
        flip_byte(segment, offset)  # undo
    assert lab.cli("verify", "-q").returncode == 0


def test_flipped_byte_in_catalog_entry_is_named(lab, tmp_path):
    points, _ = replicate_three_points(lab, tmp_path)
    name = f"points/web01.sda/{points[1]['point_id']}"
    entry = repo_dir(lab) / name
    flip_byte(entry, entry.stat().st_size - 5)
    v = lab.cli("verify", "-q")
    assert v.returncode != 0 and f"DAMAGED {name}" in v.stdout, v.stdout
    # The listing names the damaged entry, still shows the intact points, and exits non-zero.
    listing = lab.cli("points")
    assert listing.returncode != 0 and name in listing.stderr, listing.stderr
    assert points[0]["point_id"] in listing.stdout and points[2]["point_id"] in listing.stdout
    assert points[1]["point_id"] not in listing.stdout
    res = lab.failover(points[2]["point_id"], tmp_path / "p2.img")
    assert res.returncode == 0, res.stderr
