"""Fuzz key objects and key files (core/keys.py): the master key, None, or a clean KeyUnlockError."""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzkit import bounded_allocation, mutated
from lifeboat.core import crypto, keys
from lifeboat.core.errors import KeyUnlockError

MASTER = bytes(range(100, 132))
KEYFILE = keys.Unlocker(keys.KDF_KEYFILE, bytes(range(32)))
PASS = keys.Unlocker.from_passphrase("correct horse battery")
# The smallest Argon2id parameters keep the fuzz budget for the decoder, not for key derivation.
MIN_OPS = crypto.sodium.crypto_pwhash_argon2id_OPSLIMIT_MIN
MIN_MEM = crypto.sodium.crypto_pwhash_argon2id_MEMLIMIT_MIN
VALID_KEYFILE_OBJ = keys.wrap_master_key(MASTER, "0123456789abcdef", KEYFILE)
VALID_PASS_OBJ = keys.wrap_master_key(MASTER, "fedcba9876543210", PASS, MIN_OPS, MIN_MEM)

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
                | st.sampled_from(["1e400", "-1", "0"]))


def unwrap(data: bytes, unlocker: keys.Unlocker) -> bytes | None:
    # Argon2id's own memory (up to MIN_MEM here) is outside the Python heap that tracemalloc sees.
    with bounded_allocation(8 * len(data) + 256 * 1024, "unwrap_master_key"):
        try:
            got = keys.unwrap_master_key(data, unlocker)
        except KeyUnlockError as exc:
            assert "refusing" in str(exc)
            return None
    assert got is None or got == MASTER
    return got


@given(st.binary(max_size=1024))
@example(b"[" * 50_000)
@example(b'{"format": "lifeboat-key", "version": 1, "kdf": "keyfile", "id": "x", "wrapped": 5}')
def test_random_bytes_never_unlock(data):
    assert unwrap(data, KEYFILE) is None


@given(mutated(VALID_KEYFILE_OBJ))
def test_mutated_key_objects_unlock_exactly_or_not_at_all(data):
    unwrap(data, KEYFILE)


@given(st.sampled_from(["format", "version", "id", "kdf", "wrapped", "salt", "opslimit", "memlimit"]), json_scalars)
@example("opslimit", 1e400)     # JSON 1e400 is float('inf'): int(inf) raised OverflowError
@example("memlimit", float("nan"))
@example("opslimit", "9" * 5000)
@example("id", None)
def test_key_object_fields_of_any_type_are_refused_cleanly(field, value):
    for valid, unlocker in ((VALID_KEYFILE_OBJ, KEYFILE), (VALID_PASS_OBJ, PASS)):
        obj = json.loads(valid)
        obj[field] = value
        if field in ("opslimit", "memlimit") and isinstance(value, int) and 0 < value:
            continue  # a valid-looking limit costs a real derivation; the bound itself is tested below
        unwrap(json.dumps(obj).encode(), unlocker)


def test_passphrase_object_opens_and_oversized_limits_are_refused():
    assert unwrap(VALID_PASS_OBJ, PASS) == MASTER
    obj = json.loads(VALID_PASS_OBJ)
    obj["memlimit"] = keys.ARGON2ID_MAX_MEMLIMIT + 1
    try:
        keys.unwrap_master_key(json.dumps(obj).encode(), PASS)
    except KeyUnlockError as exc:
        assert "refusing" in str(exc)
    else:
        raise AssertionError("a key object asking for more memory than SENSITIVE was derived")


@given(st.binary(max_size=300) | mutated(f"{keys.KEYFILE_HEADER}\n{'A' * 43}=\n".encode()))
@example(b"lifeboat-keyfile v1\n\xff\xfe\n")
def test_key_files_of_any_content_are_refused_cleanly(content):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "repository.key")
        with open(path, "wb") as f:
            f.write(content)
        try:
            unlocker = keys.Unlocker.from_key_file(path)
        except KeyUnlockError as exc:
            assert path in str(exc) or "key file" in str(exc)
            return
        assert len(unlocker.secret) == crypto.KEY_BYTES and "redacted" in repr(unlocker)
