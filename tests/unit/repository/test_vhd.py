"""Fixed VHD footer: layout, checksum, CHS geometry per the spec, parse errors; cross-checked with qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifeboat.repository import vhd
from lifeboat.repository.vhd import VhdFooterError, build_footer, chs_geometry, parse_footer, rounded_size

MiB, GiB = 1024 ** 2, 1024 ** 3
UID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} not found (install qemu-utils, listed in .ci/run)"
    if os.environ.get("LIFEBOAT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}; LIFEBOAT_REQUIRE_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def test_footer_fields_sit_where_the_spec_puts_them():
    footer = build_footer(GiB, uuid=UID, timestamp=vhd.VHD_EPOCH_UNIX_SECONDS + 1000)
    assert len(footer) == 512
    assert footer[0:8] == b"conectix"
    assert footer[8:12] == bytes.fromhex("00000002")                  # features
    assert footer[12:16] == bytes.fromhex("00010000")                 # version 1.0
    assert footer[16:24] == b"\xff" * 8                               # data offset: none (fixed)
    assert int.from_bytes(footer[24:28], "big") == 1000               # seconds since 2000-01-01
    assert footer[28:32] == b"lfbt" and footer[36:40] == b"Wi2k"
    assert int.from_bytes(footer[40:48], "big") == GiB                # original size
    assert int.from_bytes(footer[48:56], "big") == GiB                # current size
    assert footer[56:60] == (2080).to_bytes(2, "big") + bytes([16, 63])
    assert footer[60:64] == bytes.fromhex("00000002")                 # disk type fixed
    assert footer[68:84] == UID.bytes
    assert footer[84:] == bytes(428)                                  # saved state 0, reserved zeros


def test_checksum_is_ones_complement_of_the_byte_sum():
    footer = build_footer(64 * MiB, uuid=UID, timestamp=vhd.VHD_EPOCH_UNIX_SECONDS)
    stored = int.from_bytes(footer[64:68], "big")
    # Sum by hand over every byte except the checksum field.
    by_hand = 0
    for i, b in enumerate(footer):
        if not 64 <= i < 68:
            by_hand += b
    assert stored == (~by_hand) & 0xFFFFFFFF
    assert (stored + by_hand) & 0xFFFFFFFF == 0xFFFFFFFF


def test_round_trip_keeps_every_field():
    f = parse_footer(build_footer(3 * GiB, uuid=UID, timestamp=1_700_000_000))
    assert (f.original_size, f.current_size, f.disk_type, f.uuid, f.saved_state) == (3 * GiB, 3 * GiB, 2, UID, 0)
    assert f.created_unix == 1_700_000_000
    assert (f.cylinders, f.heads, f.sectors_per_track) == chs_geometry(3 * GiB)
    assert (f.creator_app, f.creator_host_os) == (b"lfbt", b"Wi2k")


def test_default_uuid_is_random_and_timestamp_now():
    a, b = parse_footer(build_footer(MiB)), parse_footer(build_footer(MiB))
    assert a.uuid != b.uuid
    assert a.timestamp > 26 * 365 * 86400  # after 2026


# Worked through the spec's algorithm (Appendix: CHS calculation) by hand:
#   10 MiB = 20480 sectors: spt 17, c*h = 1204, heads = ceil(1204/1024) = 2 -> 4; c = 301.
#   127 MiB = 260096 sectors: spt 17, c*h = 15299, heads = 15 (c*h < 15*1024); c = 1019.
#   1 GiB = 2097152 sectors: spt 17 gives heads 121 > 16 -> spt 31, c*h = 67650 >= 16*1024
#     -> spt 63, c*h = 33288, c = 2080 (qemu-img writes 2080/16/63 too).
#   127.5 GiB and more: clamped to 65535*16*255 sectors -> 65535/16/255.
@pytest.mark.parametrize("size,chs", [
    (10 * MiB, (301, 4, 17)),
    (127 * MiB, (1019, 15, 17)),
    (GiB, (2080, 16, 63)),
    (200 * GiB, (65535, 16, 255)),
    (4 * 1024 * GiB, (65535, 16, 255)),
])
def test_chs_geometry_follows_the_spec(size, chs):
    assert chs_geometry(size) == chs


def test_sizes_round_up_to_whole_mib():
    assert rounded_size(MiB) == MiB
    assert rounded_size(MiB + 1) == 2 * MiB
    assert rounded_size(10 * MiB - 512) == 10 * MiB
    with pytest.raises(ValueError, match="positive"):
        rounded_size(0)
    with pytest.raises(ValueError, match="whole number of MiB"):
        build_footer(MiB + 512)


def _resum(footer: bytearray) -> bytes:
    footer[64:68] = vhd.footer_checksum(bytes(footer)).to_bytes(4, "big")
    return bytes(footer)


def test_parse_failures_name_the_problem():
    good = bytearray(build_footer(GiB, uuid=UID))
    with pytest.raises(VhdFooterError, match=r"cookie.*expected b'conectix'"):
        parse_footer(_resum(bytearray(b"notavhd!") + good[8:]))
    damaged = bytearray(good)
    damaged[45] ^= 0x01
    with pytest.raises(VhdFooterError, match=r"checksum.*damaged"):
        parse_footer(bytes(damaged))
    dynamic = bytearray(good)
    dynamic[60:64] = (3).to_bytes(4, "big")
    with pytest.raises(VhdFooterError, match=r"disk type.*3 \(dynamic\).*2 \(fixed\)"):
        parse_footer(_resum(dynamic))
    offset = bytearray(good)
    offset[16:24] = (512).to_bytes(8, "big")
    with pytest.raises(VhdFooterError, match="data offset"):
        parse_footer(_resum(offset))
    version = bytearray(good)
    version[12:16] = bytes.fromhex("00020000")
    with pytest.raises(VhdFooterError, match="version"):
        parse_footer(_resum(version))
    with pytest.raises(VhdFooterError, match="512 bytes, got 511"):
        parse_footer(bytes(good[:511]))
    # The error is a FormatError: the CLI maps it to exit code 65 like every malformed input.
    assert VhdFooterError("x", "y").exit_code == 65


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 511), st.integers(0, 255))
def test_parse_never_fails_other_than_cleanly(blob, index, value):
    """Random bytes, and good footers with one byte changed, give VhdFooterError or a parsed footer."""
    mutated = bytearray(build_footer(GiB, uuid=UID))
    mutated[index] = value
    for data in (blob, bytes(mutated)):
        try:
            parsed = parse_footer(data)
        except VhdFooterError:
            continue
        assert parsed.disk_type == 2 and len(data) == 512


@pytest.mark.parametrize("size", [10 * MiB, 127 * MiB, GiB, 200 * GiB])
def test_qemu_img_footer_parses(tmp_path, size):
    """An independent writer: qemu-img's fixed VHD footer (force_size: exact size) parses with our parser."""
    qemu = require_tool("qemu-img")
    path = tmp_path / "q.vhd"
    subprocess.run([qemu, "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(path), str(size)],
                   check=True)
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        parsed = parse_footer(f.read())
    assert parsed.current_size == parsed.original_size == size
    assert parsed.creator_app == b"qem2"  # qemu's mark for "use current_size"
    # force_size makes qemu write the maximum geometry, the sign for readers to trust current_size.
    assert (parsed.cylinders, parsed.heads, parsed.sectors_per_track) == (65535, 16, 255)


def test_qemu_img_reads_our_vhd(tmp_path):
    """An independent reader: qemu-img takes our data + footer as a fixed VHD of the footer's size."""
    qemu = require_tool("qemu-img")
    size = 3 * MiB
    path = tmp_path / "ours.vhd"
    payload = os.urandom(size)
    path.write_bytes(payload + build_footer(size))
    # qemu's vpc driver trusts CHS unless told to use current_size (as Azure and Hyper-V do).
    opts = f"driver=vpc,force_size_calc=current_size,file.filename={path}"
    info = json.loads(subprocess.run([qemu, "info", "--output=json", "--image-opts", opts], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] == size
    raw = tmp_path / "back.raw"
    subprocess.run([qemu, "convert", "--image-opts", opts, "-O", "raw", str(raw)], check=True)
    assert raw.read_bytes() == payload
