"""Consistency-group protocol frames (port 20004): length-prefixed, versioned, JSON bodies, bounded."""

from __future__ import annotations

import asyncio
import json
import re
import struct

from ..core.errors import FormatError

GROUP_MAGIC = b"LBGP"
GROUP_VERSION = 1
GROUP_HEADER = struct.Struct(">4sBBHI")   # magic, version, type, reserved (0), body length
GROUP_HEADER_BYTES = GROUP_HEADER.size    # 12
GROUP_MAX_BODY_BYTES = 64 * 1024

HELLO, HOLD, HELD, MARK, MARKED, ABORT, REFUSED = 1, 2, 3, 4, 5, 6, 7
FRAME_NAMES = {HELLO: "HELLO", HOLD: "HOLD", HELD: "HELD", MARK: "MARK", MARKED: "MARKED", ABORT: "ABORT",
               REFUSED: "REFUSED"}

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")          # group and machine names
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")   # goes into point ids and snapshot names
MAX_MEMBERS = 16

# Required fields per frame type: name -> (type, check)
_FIELDS: dict[int, dict[str, tuple[type, object]]] = {
    HELLO: {"group": (str, NAME_RE), "member": (str, NAME_RE)},
    HOLD: {"group": (str, NAME_RE), "tag": (str, TAG_RE), "deadline_ms": (int, (1, 600_000)), "app": (bool, None)},
    HELD: {"tag": (str, TAG_RE)},
    MARK: {"tag": (str, TAG_RE)},
    MARKED: {"tag": (str, TAG_RE), "point_id": (str, TAG_RE), "frozen_at": (float, None), "thawed_at": (float, None)},
    ABORT: {"tag": (str, TAG_RE), "reason": (str, None)},
    REFUSED: {"reason": (str, None)},
}


class GroupFrameError(FormatError):
    """Malformed group frame: {}."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = "malformed"


def encode(kind: int, **body) -> bytes:
    data = json.dumps(validate(kind, body), separators=(",", ":")).encode()
    if len(data) > GROUP_MAX_BODY_BYTES:
        raise GroupFrameError(f"{FRAME_NAMES[kind]} body of {len(data)} bytes exceeds {GROUP_MAX_BODY_BYTES}")
    return GROUP_HEADER.pack(GROUP_MAGIC, GROUP_VERSION, kind, 0, len(data)) + data


def decode_header(header: bytes) -> tuple[int, int]:
    """(frame type, body length) of a 12-byte header; the length is checked before any body is read."""
    magic, version, kind, reserved, length = GROUP_HEADER.unpack(header)
    if magic != GROUP_MAGIC:
        raise GroupFrameError(f"bad magic {magic!r} (not a Lifeboat group peer)")
    if version != GROUP_VERSION:
        raise GroupFrameError(f"protocol version {version} is not supported (this agent speaks {GROUP_VERSION})")
    if kind not in FRAME_NAMES or reserved:
        raise GroupFrameError(f"unknown frame type {kind} (reserved field {reserved})")
    if length > GROUP_MAX_BODY_BYTES:
        raise GroupFrameError(f"declared body of {length} bytes exceeds {GROUP_MAX_BODY_BYTES}")
    return kind, length


def decode_body(kind: int, body: bytes) -> dict:
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except RecursionError:  # 64 KiB of "[" nests deeper than the parser's stack
        raise GroupFrameError(f"{FRAME_NAMES[kind]} body nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise GroupFrameError(f"{FRAME_NAMES[kind]} body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise GroupFrameError(f"{FRAME_NAMES[kind]} body is not a JSON object")
    return validate(kind, obj)


def _no_constant(name: str):
    # NaN and Infinity are not JSON; Python accepts them unless told otherwise.
    raise ValueError(f"{name} is not a JSON number")


def validate(kind: int, obj: dict) -> dict:
    name = FRAME_NAMES.get(kind, str(kind))
    for field, (typ, check) in _FIELDS[kind].items():
        value = obj.get(field)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 2**53:  # not a plausible timestamp, and float() of a huge int overflows
                raise GroupFrameError(f"{name} field {field!r} is out of range")
            value = obj[field] = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise GroupFrameError(f"{name} field {field!r} is missing or not {typ.__name__}")
        if isinstance(check, re.Pattern) and not check.fullmatch(value):
            raise GroupFrameError(f"{name} field {field!r}={value!r} must match {check.pattern}")
        if isinstance(check, tuple) and not check[0] <= value <= check[1]:
            raise GroupFrameError(f"{name} field {field!r}={value} is outside {check[0]}..{check[1]}")
        if typ is str and check is None and len(value) > 1024:
            raise GroupFrameError(f"{name} field {field!r} is longer than 1024 characters")
    return obj


async def read_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict]:
    """One frame, header first: a peer cannot make us buffer more than GROUP_MAX_BODY_BYTES."""
    async def read() -> tuple[int, dict]:
        kind, length = decode_header(await reader.readexactly(GROUP_HEADER_BYTES))
        return kind, decode_body(kind, await reader.readexactly(length))
    return await asyncio.wait_for(read(), timeout)


async def write_frame(writer: asyncio.StreamWriter, kind: int, **body) -> None:
    writer.write(encode(kind, **body))
    await writer.drain()
