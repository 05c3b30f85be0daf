"""LVM thin (thin_delta) and dm-era (era_invalidate) adapters: parsers on literal output, and on
the real tools' output for metadata built from XML fixtures with thin_restore / era_restore."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lifeboat.mobility.dm_adapters import (
    AdapterError,
    parse_era_invalidate,
    parse_thin_delta,
    run_era_invalidate,
    run_thin_delta,
)

FIXTURES = Path(__file__).with_name("fixtures")
KIB = 1024
THIN_BLOCK = 128 * 512   # data_block_size="128" sectors in thin_metadata.xml
ERA_BLOCK = 128 * 512    # block_size="128" sectors in era_metadata.xml
TOOLS = ("thin_restore", "thin_delta", "era_restore", "era_invalidate")


def _tools_or_skip() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        message = f"{', '.join(missing)} missing: install the Debian package thin-provisioning-tools"
        if os.environ.get("LIFEBOAT_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _metadata(tmp_path, restore: str, fixture: str) -> str:
    meta = tmp_path / (fixture + ".bin")
    with open(meta, "wb") as f:
        f.truncate(4 * 1024 * KIB)  # zero-filled metadata device of 4 MiB
    subprocess.run([restore, "-i", str(FIXTURES / fixture), "-o", str(meta)], check=True, capture_output=True)
    return str(meta)


# ---------------------------------------------------------------- the real tools


@pytest.fixture
def thin_meta(tmp_path) -> str:
    _tools_or_skip()
    return _metadata(tmp_path, "thin_restore", "thin_metadata.xml")


@pytest.fixture
def era_meta(tmp_path) -> str:
    _tools_or_skip()
    return _metadata(tmp_path, "era_restore", "era_metadata.xml")


# Device 1 is the older snapshot, device 2 the newer one: thin blocks 4-5 differ, 30-34 exist only
# in 1, 40 only in 2; 0-3, 6-9 and 20 are shared.
THIN_DIRTY_4K = [(4 * 16, 2 * 16), (30 * 16, 5 * 16), (40 * 16, 16)]


@pytest.mark.parametrize("verbose", [False, True])
def test_thin_delta_output_of_the_real_tool(thin_meta, verbose):
    if verbose:
        xml_text = subprocess.run(["thin_delta", "--verbose", "--snap1", "1", "--snap2", "2", thin_meta],
                                  check=True, capture_output=True, text=True).stdout
        assert "<range " in xml_text
    else:
        xml_text = run_thin_delta(thin_meta, 1, 2)
        assert "<different " in xml_text
    assert parse_thin_delta(xml_text, THIN_BLOCK, 4 * KIB) == THIN_DIRTY_4K
    assert parse_thin_delta(xml_text, THIN_BLOCK, THIN_BLOCK) == [(4, 2), (30, 5), (40, 1)]
    # Blocks larger than the thin block: rounded outward, merged.
    assert parse_thin_delta(xml_text, THIN_BLOCK, 1024 * KIB) == [(0, 3)]


def test_thin_delta_reverse_direction_and_identical(thin_meta):
    assert parse_thin_delta(run_thin_delta(thin_meta, 2, 1), THIN_BLOCK, 4 * KIB) == THIN_DIRTY_4K
    assert parse_thin_delta(run_thin_delta(thin_meta, 1, 1), THIN_BLOCK, 4 * KIB) == []


def test_thin_delta_wrong_data_block_size_is_refused(thin_meta):
    with pytest.raises(AdapterError, match="128 sectors"):
        parse_thin_delta(run_thin_delta(thin_meta, 1, 2), 4 * KIB, 4 * KIB)


@pytest.mark.parametrize("since, era_blocks", [
    (0, [(0, 64)]),
    (1, [(0, 8), (10, 1), (20, 1)]),
    (3, [(2, 3), (6, 2), (10, 1), (20, 1)]),   # block 10 only from the era-3 writeset
    (5, [(6, 1)]),
    (6, []),
])
def test_era_invalidate_output_of_the_real_tool(era_meta, since, era_blocks):
    xml_text = run_era_invalidate(era_meta, since)
    assert parse_era_invalidate(xml_text, ERA_BLOCK, ERA_BLOCK) == era_blocks
    assert parse_era_invalidate(xml_text, ERA_BLOCK, 4 * KIB) == [(f * 16, n * 16) for f, n in era_blocks]


def test_run_reports_tool_failure(tmp_path):
    _tools_or_skip()
    bad = tmp_path / "zero.bin"
    bad.write_bytes(bytes(1024 * KIB))
    with pytest.raises(AdapterError, match="exit code"):
        run_era_invalidate(str(bad), 1)


# ---------------------------------------------------------------- parsers on literal output

THIN_TERSE = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <same begin="0" length="4"/>
    <different begin="4" length="2"/>
    <left_only begin="30" length="5"/>
    <right_only begin="40" length="1"/>
  </diff>
</superblock>
"""

THIN_VERBOSE = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <same>
      <range begin="0" data_begin="0" length="4"/>
    </same>
    <different>
      <range begin="4" left_data_begin="4" right_data_begin="100" length="2"/>
    </different>
    <left_only>
      <range begin="30" data_begin="11" length="5"/>
    </left_only>
    <right_only>
      <range begin="40" data_begin="101" length="1"/>
    </right_only>
  </diff>
</superblock>
"""


@pytest.mark.parametrize("text", [THIN_TERSE, THIN_VERBOSE])
def test_parse_thin_delta_literal(text):
    assert parse_thin_delta(text, THIN_BLOCK, 4 * KIB) == THIN_DIRTY_4K
    # A tracker block that does not divide the thin block: rounded outward on both ends.
    assert parse_thin_delta(text, THIN_BLOCK, 48 * KIB) == [(5, 3), (40, 7), (53, 2)]  # 256K..384K, 1920K..2240K, 2560K..2624K


def test_parse_era_invalidate_literal():
    text = '<blocks>\n  <range begin="2" end = "5"/>\n  <block block="10"/>\n  <block block="11"/>\n</blocks>\n'
    assert parse_era_invalidate(text, ERA_BLOCK, 4 * KIB) == [(32, 48), (160, 32)]
    assert parse_era_invalidate("<blocks>\n</blocks>\n", ERA_BLOCK, 4 * KIB) == []


@pytest.mark.parametrize("text, message", [
    ("<blocks><range begin='5' end='2'/></blocks>", "ends"),
    ("<blocks><range begin='x' end='2'/></blocks>", "begin='x'"),
    ("<blocks><block/></blocks>", "block=None"),
    ("<blocks><extent begin='1'/></blocks>", "unexpected element <extent> inside <blocks>"),
    ("<superblock/>", "unexpected element <superblock> at the top level"),
    ("<blocks><range begin='1' end='2'>", "not well-formed"),
    ("", "not well-formed"),
    ('<!DOCTYPE blocks [<!ENTITY a "1">]><blocks><block block="&a;"/></blocks>', "DOCTYPE"),
    ('<!DOCTYPE blocks SYSTEM "file:///etc/passwd"><blocks/>', "DOCTYPE"),
])
def test_parse_era_invalidate_rejects(text, message):
    with pytest.raises(AdapterError, match=message):
        parse_era_invalidate(text, ERA_BLOCK, 4 * KIB)


@pytest.mark.parametrize("text, message", [
    ("<superblock data_block_size='128'></superblock>", "one <diff>"),
    ("<superblock><diff/><diff/></superblock>", "one <diff>"),
    ("<superblock><diff><changed begin='1' length='1'/></diff></superblock>", "<changed>"),
    ("<superblock><diff><different begin='1'/></diff></superblock>", "length=None"),
    ("<superblock><diff><different><range begin='-1' length='1'/></different></diff></superblock>", "begin='-1'"),
    ("<superblock><device dev_id='1'/></superblock>", "<device>"),
    ('<!DOCTYPE x [<!ENTITY lol "lol">]><superblock><diff/></superblock>', "DOCTYPE"),
])
def test_parse_thin_delta_rejects(text, message):
    with pytest.raises(AdapterError, match=message):
        parse_thin_delta(text, THIN_BLOCK, 4 * KIB)


def test_missing_tool_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AdapterError, match="thin-provisioning-tools"):
        run_thin_delta("/dev/null", 1, 2)
