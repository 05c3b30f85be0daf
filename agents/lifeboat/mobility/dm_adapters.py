"""Change-tracking adapters for LVM thin (`thin_delta`) and dm-era (`era_invalidate`) output.

Both tools (Debian package thin-provisioning-tools) print XML. The parsers turn it into merged
(first_block, count) ranges in units of the tracker's ``block_size`` bytes, rounding outward: a
partly covered block is dirty (over-reporting is safe, under-reporting loses data). Anything
unexpected — an unknown element or attribute value, a DOCTYPE or entity declaration, a block size
that contradicts the metadata — raises AdapterError instead of guessing.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.parsers.expat

from ..core.errors import LifeboatError
from .change_log import merge_ranges

SECTOR_BYTES = 512
MAX_XML_BYTES = 256 * 1024 * 1024
TOOL_TIMEOUT_SECONDS = 600


class AdapterError(LifeboatError):
    """Change-tracking adapter error: {}."""


def _elements(xml_text: str, what: str) -> list[tuple[str, str, dict[str, str], int]]:
    """(parent path, tag, attributes, line) for every element; DOCTYPE and entities are refused."""
    if len(xml_text) > MAX_XML_BYTES:
        raise AdapterError(f"{what} output of {len(xml_text)} characters exceeds {MAX_XML_BYTES}")
    parser = xml.parsers.expat.ParserCreate()
    out: list[tuple[str, str, dict[str, str], int]] = []
    stack: list[str] = []

    def refuse(*_args) -> None:
        raise AdapterError(f"{what} output contains a DOCTYPE or entity declaration (line {parser.CurrentLineNumber})")

    def start(tag: str, attrs: dict[str, str]) -> None:
        out.append(("/".join(stack), tag, attrs, parser.CurrentLineNumber))
        stack.append(tag)

    def end(_tag: str) -> None:
        stack.pop()

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = lambda *a: refuse()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(xml_text, True)
    except xml.parsers.expat.ExpatError as e:
        raise AdapterError(f"{what} output is not well-formed XML: {e}") from None
    if not out:
        raise AdapterError(f"{what} output is empty")
    return out


def _int(attrs: dict[str, str], name: str, tag: str, line: int, what: str) -> int:
    value = attrs.get(name)
    if value is None or not value.strip().isdigit():
        raise AdapterError(f"{what} <{tag}> on line {line}: attribute {name}={value!r} is not a non-negative integer")
    return int(value)


def _to_blocks(byte_ranges: list[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    out = []
    for start, end in byte_ranges:
        if end > start:
            first = start // block_size
            out.append((first, -(-end // block_size) - first))
    return merge_ranges(out)


def _check_sizes(unit_bytes: int, block_size: int, what: str) -> None:
    if unit_bytes <= 0 or block_size <= 0:
        raise AdapterError(f"{what}: block sizes must be positive (got {unit_bytes} and {block_size})")


_THIN_DIRTY = {"different", "left_only", "right_only"}
_THIN_KINDS = _THIN_DIRTY | {"same"}


def parse_thin_delta(xml_text: str, data_block_bytes: int, block_size: int) -> list[tuple[int, int]]:
    """Dirty block ranges from ``thin_delta --snap1 A --snap2 B <metadata>`` (terse or --verbose).

    <different>, <left_only> and <right_only> ranges (begin/length in thin data blocks of
    ``data_block_bytes``) are dirty; <same> is not.
    """
    what = "thin_delta"
    _check_sizes(data_block_bytes, block_size, what)
    byte_ranges: list[tuple[int, int]] = []
    diffs = 0
    for parent, tag, attrs, line in _elements(xml_text, what):
        if parent == "" and tag == "superblock":
            if "data_block_size" in attrs:
                sectors = _int(attrs, "data_block_size", tag, line, what)
                if sectors * SECTOR_BYTES != data_block_bytes:
                    raise AdapterError(f"{what}: the pool's data block size is {sectors} sectors "
                                       f"({sectors * SECTOR_BYTES} bytes), not {data_block_bytes} bytes")
        elif parent == "superblock" and tag == "diff":
            diffs += 1
        elif parent == "superblock/diff" and tag in _THIN_KINDS:
            if "begin" in attrs or "length" in attrs:  # terse: <different begin=.. length=../>
                begin, length = _int(attrs, "begin", tag, line, what), _int(attrs, "length", tag, line, what)
                if tag in _THIN_DIRTY:
                    byte_ranges.append((begin * data_block_bytes, (begin + length) * data_block_bytes))
        elif parent.startswith("superblock/diff/") and parent.count("/") == 2 and tag == "range":
            kind = parent.rsplit("/", 1)[1]  # --verbose: <different><range begin=.. length=../></different>
            begin, length = _int(attrs, "begin", tag, line, what), _int(attrs, "length", tag, line, what)
            if kind in _THIN_DIRTY:
                byte_ranges.append((begin * data_block_bytes, (begin + length) * data_block_bytes))
        else:
            where = f"inside <{parent.replace('/', '><')}>" if parent else "at the top level"
            raise AdapterError(f"{what}: unexpected element <{tag}> {where} on line {line}")
    if diffs != 1:
        raise AdapterError(f"{what}: expected one <diff> element in <superblock>, found {diffs}")
    return _to_blocks(byte_ranges, block_size)


def parse_era_invalidate(xml_text: str, era_block_bytes: int, block_size: int) -> list[tuple[int, int]]:
    """Dirty block ranges from ``era_invalidate --written-since N <metadata>``.

    <block block=B/> is one era block, <range begin=B end=E/> the era blocks [B, E).
    """
    what = "era_invalidate"
    _check_sizes(era_block_bytes, block_size, what)
    byte_ranges: list[tuple[int, int]] = []
    roots = 0
    for parent, tag, attrs, line in _elements(xml_text, what):
        if parent == "" and tag == "blocks":
            roots += 1
        elif parent == "blocks" and tag == "block":
            b = _int(attrs, "block", tag, line, what)
            byte_ranges.append((b * era_block_bytes, (b + 1) * era_block_bytes))
        elif parent == "blocks" and tag == "range":
            begin, end = _int(attrs, "begin", tag, line, what), _int(attrs, "end", tag, line, what)
            if end < begin:
                raise AdapterError(f"{what}: <range> on line {line} ends ({end}) before it begins ({begin})")
            byte_ranges.append((begin * era_block_bytes, end * era_block_bytes))
        else:
            where = f"inside <{parent.replace('/', '><')}>" if parent else "at the top level"
            raise AdapterError(f"{what}: unexpected element <{tag}> {where} on line {line}")
    if roots != 1:
        raise AdapterError(f"{what}: expected a <blocks> root element")
    return _to_blocks(byte_ranges, block_size)


def _run(argv: list[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise AdapterError(f"{argv[0]} is not installed (Debian package thin-provisioning-tools)")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise AdapterError(f"{what} did not finish within {TOOL_TIMEOUT_SECONDS} s") from None
    if proc.returncode != 0:
        raise AdapterError(f"{' '.join(argv)} failed with exit code {proc.returncode}: {proc.stderr.strip()[:500]}")
    return proc.stdout


def run_thin_delta(metadata: str, snap1: int, snap2: int, *, metadata_snap: bool = False) -> str:
    """XML of ``thin_delta --snap1 A --snap2 B`` (with ``-m`` to read a live pool's metadata snapshot)."""
    argv = ["thin_delta", "--snap1", str(int(snap1)), "--snap2", str(int(snap2))]
    if metadata_snap:
        argv.append("-m")
    return _run(argv + [metadata], "thin_delta")


def run_era_invalidate(metadata: str, written_since: int, *, metadata_snapshot: bool = False) -> str:
    """XML of ``era_invalidate --written-since N``."""
    argv = ["era_invalidate", "--written-since", str(int(written_since))]
    if metadata_snapshot:
        argv.append("--metadata-snapshot")
    return _run(argv + [metadata], "era_invalidate")
