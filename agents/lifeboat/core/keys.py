"""Repository master key wrapping: key files and Argon2id passphrases; key file on-disk format."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

from . import crypto
from .errors import KeyUnlockError

KEY_OBJECT_FORMAT = "lifeboat-key"
KEY_OBJECT_VERSION = 1
KEYFILE_HEADER = "lifeboat-keyfile v1"
KDF_KEYFILE = "keyfile"
KDF_ARGON2ID = "argon2id"
# Upper bounds on Argon2id parameters read from a key object: libsodium's SENSITIVE preset.
ARGON2ID_MAX_OPSLIMIT = crypto.sodium.crypto_pwhash_argon2id_OPSLIMIT_SENSITIVE
ARGON2ID_MAX_MEMLIMIT = crypto.sodium.crypto_pwhash_argon2id_MEMLIMIT_SENSITIVE


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


@dataclass(frozen=True)
class Unlocker:
    """Secret that unwraps a key object: a key file's key-encryption key or a passphrase."""

    kdf: str
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"Unlocker(kdf={self.kdf!r}, secret=**redacted**)"

    @classmethod
    def from_key_file(cls, path: str) -> "Unlocker":
        try:
            with open(path) as f:
                lines = f.read().split()
        except OSError as exc:
            raise KeyUnlockError(f"cannot read key file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyUnlockError(f"{path} is not a Lifeboat key file (not UTF-8 text)") from None
        if len(lines) != 3 or " ".join(lines[:2]) != KEYFILE_HEADER:
            raise KeyUnlockError(f"{path} is not a Lifeboat key file (first line must be '{KEYFILE_HEADER}')")
        try:
            kek = _unb64(lines[2])
        except ValueError:
            raise KeyUnlockError(f"{path}: key is not valid base64") from None
        if len(kek) != crypto.KEY_BYTES:
            raise KeyUnlockError(f"{path}: key has {len(kek)} bytes, expected {crypto.KEY_BYTES}")
        return cls(KDF_KEYFILE, kek)

    @classmethod
    def from_passphrase(cls, passphrase: str) -> "Unlocker":
        if len(passphrase) < 8:
            raise KeyUnlockError("the passphrase must have at least 8 characters")
        return cls(KDF_ARGON2ID, passphrase.encode())


def write_key_file(path: str) -> Unlocker:
    kek = crypto.new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{KEYFILE_HEADER}\n{_b64(kek)}\n")
        f.flush()
        os.fsync(f.fileno())
    return Unlocker(KDF_KEYFILE, kek)


def _aad(key_id: str, kdf: str) -> bytes:
    return f"{KEY_OBJECT_FORMAT}/{KEY_OBJECT_VERSION}/{key_id}/{kdf}".encode()


def wrap_master_key(master: bytes, key_id: str, unlocker: Unlocker,
                    opslimit: int = crypto.ARGON2ID_OPSLIMIT, memlimit: int = crypto.ARGON2ID_MEMLIMIT) -> bytes:
    obj: dict = {"format": KEY_OBJECT_FORMAT, "version": KEY_OBJECT_VERSION, "id": key_id, "kdf": unlocker.kdf}
    if unlocker.kdf == KDF_ARGON2ID:
        salt = os.urandom(crypto.ARGON2ID_SALT_BYTES)
        kek = crypto.passphrase_key(unlocker.secret, salt, opslimit, memlimit)
        obj.update(salt=_b64(salt), opslimit=opslimit, memlimit=memlimit)
    else:
        kek = unlocker.secret
    obj["wrapped"] = _b64(crypto.seal(kek, master, _aad(key_id, unlocker.kdf)))
    return json.dumps(obj, sort_keys=True, indent=1).encode()


def unwrap_master_key(data: bytes, unlocker: Unlocker) -> bytes | None:
    """Return the master key if this key object opens with the unlocker, else None."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            return None
        if obj.get("format") != KEY_OBJECT_FORMAT or obj.get("version") != KEY_OBJECT_VERSION:
            return None
        if obj.get("kdf") != unlocker.kdf:
            return None
        if unlocker.kdf == KDF_ARGON2ID:
            opslimit, memlimit = int(obj["opslimit"]), int(obj["memlimit"])
            # The parameters come from storage: a tampered key object must not make us spend
            # hours or gigabytes of memory before its MAC fails.
            if not (0 < opslimit <= ARGON2ID_MAX_OPSLIMIT and 0 < memlimit <= ARGON2ID_MAX_MEMLIMIT):
                raise KeyUnlockError(f"key object {obj.get('id')!r} asks for Argon2id opslimit={opslimit}, "
                                     f"memlimit={memlimit}, above the accepted maximum "
                                     f"({ARGON2ID_MAX_OPSLIMIT}, {ARGON2ID_MAX_MEMLIMIT}): refusing to unlock it")
            kek = crypto.passphrase_key(unlocker.secret, _unb64(obj["salt"]), opslimit, memlimit)
        else:
            kek = unlocker.secret
        master = crypto.open_sealed(kek, _unb64(obj["wrapped"]), _aad(obj["id"], unlocker.kdf))
    # OverflowError: int(inf) from a JSON 1e400; RecursionError: a deeply nested object from storage.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, crypto.AuthenticationFailed):
        return None
    return master if len(master) == crypto.KEY_BYTES else None
