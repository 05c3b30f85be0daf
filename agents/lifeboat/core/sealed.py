"""Sealed repository objects (config, catalog entries): typed envelope, JSON body, AEAD with the name as AAD."""

from __future__ import annotations

import json
import struct

from . import crypto
from .errors import IntegrityError

SEALED_MAGIC = b"LBOB"
SEALED_VERSION = 1
# magic, version, object type, reserved
SEALED_HEADER = struct.Struct("<4sBBH")
OBJECT_CONFIG = 1
OBJECT_POINT = 2
MAX_SEALED_BYTES = 1024 * 1024


def seal_object(key: bytes, name: str, obj_type: int, body: dict) -> bytes:
    header = SEALED_HEADER.pack(SEALED_MAGIC, SEALED_VERSION, obj_type, 0)
    plain = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    # The object's name is part of the AAD: a catalog entry copied under another name fails.
    return header + crypto.seal(key, plain, header + name.encode())


def open_object(key: bytes, name: str, obj_type: int, data: bytes) -> dict:
    if len(data) > MAX_SEALED_BYTES:
        raise IntegrityError(name, f"object of {len(data)} bytes exceeds {MAX_SEALED_BYTES}")
    if len(data) < SEALED_HEADER.size:
        raise IntegrityError(name, f"object of {len(data)} bytes is shorter than its header")
    magic, version, typ, _ = SEALED_HEADER.unpack_from(data)
    if magic != SEALED_MAGIC:
        raise IntegrityError(name, f"magic {magic!r} is not {SEALED_MAGIC!r}")
    if version != SEALED_VERSION:
        raise IntegrityError(name, f"sealed-object version {version} is not supported")
    if typ != obj_type:
        raise IntegrityError(name, f"object type {typ}, expected {obj_type}")
    header = data[: SEALED_HEADER.size]
    try:
        plain = crypto.open_sealed(key, data[SEALED_HEADER.size:], header + name.encode())
    except crypto.AuthenticationFailed as exc:
        raise IntegrityError(name, str(exc)) from None
    try:
        body = json.loads(plain)
    except (ValueError, RecursionError) as exc:  # RecursionError: a deeply nested body exhausts the parser
        raise IntegrityError(name, f"body is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise IntegrityError(name, "body is not a JSON object")
    return body
