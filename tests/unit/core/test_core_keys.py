"""Key files and master-key wrapping (core/keys.py)."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from nacl.bindings import crypto_pwhash_argon2id_MEMLIMIT_MIN, crypto_pwhash_argon2id_OPSLIMIT_MIN

from lifeboat.core import crypto, keys
from lifeboat.core.errors import KeyUnlockError
from lifeboat.core.keys import KEYFILE_HEADER, Unlocker, unwrap_master_key, wrap_master_key, write_key_file

# Argon2id at libsodium's minimum cost keeps these tests fast; the parameters travel in the key object.
FAST_KDF = {"opslimit": crypto_pwhash_argon2id_OPSLIMIT_MIN, "memlimit": crypto_pwhash_argon2id_MEMLIMIT_MIN}
MASTER = bytes(range(100, 132))


# -- key files -------------------------------------------------------------------------------------

def test_key_file_round_trip(tmp_path):
    path = str(tmp_path / "repository.key")
    written = write_key_file(path)
    read = Unlocker.from_key_file(path)
    assert read == written and read.kdf == keys.KDF_KEYFILE and len(read.secret) == crypto.KEY_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read().splitlines()[0] == KEYFILE_HEADER


def test_key_file_is_never_overwritten(tmp_path):
    path = str(tmp_path / "repository.key")
    first = write_key_file(path)
    with pytest.raises(FileExistsError):
        write_key_file(path)
    assert Unlocker.from_key_file(path) == first


def test_two_key_files_differ(tmp_path):
    assert write_key_file(str(tmp_path / "a")).secret != write_key_file(str(tmp_path / "b")).secret


def good_key_line() -> str:
    return base64.b64encode(bytes(crypto.KEY_BYTES)).decode()


@pytest.mark.parametrize("content,problem", [
    ("", "is not a Lifeboat key file"),
    ("lifeboat-keyfile v2\n" + good_key_line() + "\n", "is not a Lifeboat key file"),
    ("lifeboat-keyfile v1\n", "is not a Lifeboat key file"),
    ("lifeboat-keyfile v1\n" + good_key_line() + "\nextra\n", "is not a Lifeboat key file"),
    ("lifeboat-keyfile v1\nnot*base64!\n", "key is not valid base64"),
    ("lifeboat-keyfile v1\n" + base64.b64encode(b"short").decode() + "\n", "key has 5 bytes, expected 32"),
    (b"\xff\xfe\x00binary", "is not a Lifeboat key file"),
])
def test_malformed_key_file(tmp_path, content, problem):
    path = tmp_path / "bad.key"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(KeyUnlockError, match=problem) as info:
        Unlocker.from_key_file(str(path))
    assert str(path) in str(info.value)
    assert info.value.exit_code == 77


def test_missing_key_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.key")
    with pytest.raises(KeyUnlockError, match="cannot read key file") as info:
        Unlocker.from_key_file(path)
    assert path in str(info.value) and "No such file" in str(info.value)


def test_key_file_that_is_a_directory(tmp_path):
    with pytest.raises(KeyUnlockError) as info:
        Unlocker.from_key_file(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_key_file_tolerates_missing_final_newline(tmp_path):
    path = tmp_path / "k"
    path.write_text(f"{KEYFILE_HEADER}\n{good_key_line()}")
    assert Unlocker.from_key_file(str(path)).secret == bytes(crypto.KEY_BYTES)


# -- passphrases and redaction ---------------------------------------------------------------------

def test_short_passphrase_refused():
    with pytest.raises(KeyUnlockError, match="at least 8 characters"):
        Unlocker.from_passphrase("1234567")


def test_repr_never_shows_the_secret(tmp_path):
    file_unlocker = write_key_file(str(tmp_path / "k"))
    pass_unlocker = Unlocker.from_passphrase("correct horse battery staple")
    for u in (file_unlocker, pass_unlocker):
        text = repr(u) + str(u) + f"{u}" + repr([u])
        assert "redacted" in text
        assert repr(u.secret) not in text
        assert base64.b64encode(u.secret).decode() not in text
        assert u.secret.hex() not in text
    assert "horse" not in repr(pass_unlocker)


# -- wrapping the master key -----------------------------------------------------------------------

def test_wrap_unwrap_with_key_file(tmp_path):
    unlocker = write_key_file(str(tmp_path / "k"))
    blob = wrap_master_key(MASTER, "0011223344556677", unlocker)
    obj = json.loads(blob)
    assert obj["kdf"] == "keyfile" and obj["id"] == "0011223344556677" and "salt" not in obj
    assert MASTER not in blob and base64.b64encode(MASTER) not in blob
    assert unwrap_master_key(blob, Unlocker.from_key_file(str(tmp_path / "k"))) == MASTER


def test_wrap_unwrap_with_passphrase():
    blob = wrap_master_key(MASTER, "aa", Unlocker.from_passphrase("correct horse battery staple"), **FAST_KDF)
    obj = json.loads(blob)
    assert obj["kdf"] == "argon2id" and obj["opslimit"] == FAST_KDF["opslimit"]
    assert len(base64.b64decode(obj["salt"])) == crypto.ARGON2ID_SALT_BYTES
    assert unwrap_master_key(blob, Unlocker.from_passphrase("correct horse battery staple")) == MASTER


def test_wrong_passphrase_gives_none():
    blob = wrap_master_key(MASTER, "aa", Unlocker.from_passphrase("correct horse battery staple"), **FAST_KDF)
    assert unwrap_master_key(blob, Unlocker.from_passphrase("correct horse battery stapler")) is None


def test_same_passphrase_twice_uses_a_fresh_salt():
    u = Unlocker.from_passphrase("correct horse battery staple")
    a = json.loads(wrap_master_key(MASTER, "aa", u, **FAST_KDF))
    b = json.loads(wrap_master_key(MASTER, "aa", u, **FAST_KDF))
    assert a["salt"] != b["salt"] and a["wrapped"] != b["wrapped"]


def test_wrong_key_file_gives_none(tmp_path):
    blob = wrap_master_key(MASTER, "aa", write_key_file(str(tmp_path / "a")))
    assert unwrap_master_key(blob, write_key_file(str(tmp_path / "b"))) is None


def test_kdf_mismatch_gives_none(tmp_path):
    blob = wrap_master_key(MASTER, "aa", write_key_file(str(tmp_path / "a")))
    assert unwrap_master_key(blob, Unlocker.from_passphrase("correct horse battery staple")) is None


@pytest.mark.parametrize("field,value", [("id", "bb"), ("version", 2), ("format", "other"), ("kdf", "argon2id")])
def test_tampered_key_object_gives_none(tmp_path, field, value):
    unlocker = write_key_file(str(tmp_path / "a"))
    obj = json.loads(wrap_master_key(MASTER, "aa", unlocker))
    obj[field] = value
    assert unwrap_master_key(json.dumps(obj).encode(), unlocker) is None


def test_wrapped_key_of_wrong_length_gives_none(tmp_path):
    # A correctly sealed blob that is not 32 bytes is not a master key.
    unlocker = write_key_file(str(tmp_path / "a"))
    assert unwrap_master_key(wrap_master_key(MASTER[:16], "aa", unlocker), unlocker) is None


@pytest.mark.parametrize("blob", [b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"string"', b"null", b"{}",
                                  b'{"format": "lifeboat-key", "version": 1, "kdf": "keyfile"}',
                                  b'{"format": "lifeboat-key", "version": 1, "kdf": "keyfile", "id": "a", "wrapped": 5}',
                                  b'{"format": "lifeboat-key", "version": 1, "kdf": "keyfile", "id": "a", "wrapped": "!!"}'])
def test_garbage_key_objects_give_none(tmp_path, blob):
    assert unwrap_master_key(blob, write_key_file(str(tmp_path / "a"))) is None


@pytest.mark.parametrize("override", [{"salt": "AAAA"}, {"salt": 5}, {"opslimit": "x"}, {"memlimit": None}])
def test_garbage_passphrase_parameters_give_none(override):
    u = Unlocker.from_passphrase("correct horse battery staple")
    obj = json.loads(wrap_master_key(MASTER, "aa", u, **FAST_KDF)) | override
    assert unwrap_master_key(json.dumps(obj).encode(), u) is None


@pytest.mark.parametrize("field", ["opslimit", "memlimit"])
def test_key_object_asking_for_absurd_argon2_cost_is_refused_before_deriving(field):
    blob = wrap_master_key(MASTER, "aa", Unlocker.from_passphrase("correct horse battery staple"), **FAST_KDF)
    obj = json.loads(blob)
    obj[field] = 2**40  # would take hours or a terabyte: must fail fast, naming the parameter
    with pytest.raises(KeyUnlockError, match=f"{field}=1099511627776"):
        unwrap_master_key(json.dumps(obj).encode(), Unlocker.from_passphrase("correct horse battery staple"))
