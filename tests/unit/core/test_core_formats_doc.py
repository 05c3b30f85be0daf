"""FORMATS.md's constant tables must match the code (borg's spec drifted from its code: not ours)."""

import ast
import re
import struct
from pathlib import Path

import lifeboat.core as core
from lifeboat.core import compression, crypto, keys, sealed, segment, wire, catalog
from lifeboat.master_target import journal, registry, undo
from lifeboat.mobility import change_log, digest_map, group_wire

DOC = Path(core.__file__).with_name("FORMATS.md")
MODULES = {m.__name__.rsplit(".", 1)[1]: m for m in (compression, crypto, keys, sealed, segment, wire, catalog, digest_map,
                                                        change_log, group_wire, journal, registry, undo)}
ROW = re.compile(r"^\|\s*`(\w+)\.(\w+)`\s*\|\s*`([^`]+)`\s*\|")


def doc_constants() -> list[tuple[str, str, object]]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.append((m.group(1), m.group(2), ast.literal_eval(m.group(3))))
    return rows


def code_value(module: str, name: str):
    value = getattr(MODULES[module], name)
    if isinstance(value, re.Pattern):  # documented as the pattern string (fullmatch semantics)
        return value.pattern
    return value.format if isinstance(value, struct.Struct) else value


def test_every_documented_constant_matches_the_code():
    rows = doc_constants()
    assert len(rows) >= 40, "the constant tables were not found"
    mismatches = [(f"{m}.{n}", doc, code_value(m, n)) for m, n, doc in rows if code_value(m, n) != doc]
    assert not mismatches, f"FORMATS.md and code disagree (name, doc, code): {mismatches}"


def test_every_format_constant_in_the_code_is_documented():
    documented = {(m, n) for m, n, _ in doc_constants()}
    pattern = re.compile(r"(MAGIC|VERSION|_HEADER$|ENTRY$|TRAILER$|^FRAME_|CHECKSUM$)")
    missing = []
    for mod_name in ("wire", "segment", "sealed", "keys", "digest_map", "change_log", "group_wire", "journal",
                     "registry", "undo"):
        source = Path(MODULES[mod_name].__file__).read_text()
        for name, value in vars(MODULES[mod_name]).items():
            defined_here = re.search(rf"^{name}\s*=", source, re.M)
            if defined_here and name.isupper() and pattern.search(name) and isinstance(value, (bytes, int, str, struct.Struct)):
                if name != "FRAME_TYPES" and (mod_name, name) not in documented:
                    missing.append(f"{mod_name}.{name}")
    assert not missing, f"format constants missing from FORMATS.md: {missing}"


def test_documented_struct_sizes_are_what_the_text_says():
    # The grammar promises these fixed sizes; a format change must update the text too.
    assert wire.BATCH_HEADER.size == 32
    assert wire.FRAME_HEADER.size == 24
    assert segment.SEGMENT_HEADER.size == 32
    assert segment.INDEX_ENTRY.size == 44
    assert segment.SEGMENT_TRAILER.size == 16
    assert digest_map.DIGEST_MAP_HEADER.size <= digest_map.DIGEST_MAP_HEADER_BYTES
    assert change_log.HRL_HEADER.size == 24
    assert change_log.RECORD_HEADER.size == 8
    assert change_log.BITMAP_BODY.size == 28
    assert group_wire.GROUP_HEADER.size == group_wire.GROUP_HEADER_BYTES == 12


def test_group_frame_types_are_documented_with_their_numbers():
    text = DOC.read_text()
    section = text[text.index("## 7. Consistency-group protocol"):text.index("## Changes")]
    for kind, name in group_wire.FRAME_NAMES.items():
        assert f"| {name} ({kind}) |" in section, f"frame type {name} ({kind}) is not in FORMATS.md section 7"
    for kind, fields in group_wire._FIELDS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {group_wire.FRAME_NAMES[kind]} ("))
        for field in fields:
            assert f"`{field}`" in row, f"{group_wire.FRAME_NAMES[kind]} field {field} is not documented"
