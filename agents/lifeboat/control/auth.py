"""Credentials of the management API: random bearer tokens stored as hashes, bound to one principal."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from .store import transaction

TOKEN_PREFIX = "lbt_"
TOKEN_BYTES = 32
PASSPHRASE_BYTES = 24
PRINCIPAL_KINDS = ("operator", "agent", "process-server")
# Machine and process-server names: the machine part of a disk id (`<machine>.<disk>`), so no '.'.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_TOKEN_CHARS = 256
REFUSAL_REASONS = ("unauthenticated", "unknown_credential", "revoked", "expired", "forbidden",
                   "bad_passphrase", "already_registered")


@dataclass(frozen=True)
class Principal:
    kind: str          # operator | agent | process-server
    name: str          # the machine for an agent
    credential_id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


class Refused(Exception):
    """An authentication or authorisation refusal; the API answers it with `status` and logs and counts it."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_passphrase() -> str:
    return secrets.token_urlsafe(PASSPHRASE_BYTES)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_secret_file(path: str) -> str:
    """First line of a credential or passphrase file (written by `lifeboat init` / `register`)."""
    with open(path) as f:
        return f.readline().strip()


def install_passphrase(conn: sqlite3.Connection, passphrase: str, replace: bool = False) -> bool:
    """Store the passphrase's hash unless one is set (or `replace`); True when stored."""
    with transaction(conn):
        if not replace and conn.execute("SELECT 1 FROM registration_passphrase").fetchone():
            return False
        conn.execute("INSERT OR REPLACE INTO registration_passphrase VALUES (1, ?, ?)", (digest(passphrase), time.time()))
        return True


def install_token(conn: sqlite3.Connection, token: str, kind: str, name: str) -> bool:
    """Bootstrap a credential from a file (the operator's, from `lifeboat init`) unless its hash is known.

    A revoked token keeps its row, so a restart never brings a revoked operator credential back."""
    with transaction(conn):
        if conn.execute("SELECT 1 FROM credentials WHERE token_sha256 = ?", (digest(token),)).fetchone():
            return False
        _insert(conn, token, kind, name, None)
        return True


def _insert(conn: sqlite3.Connection, token: str, kind: str, name: str, ttl_seconds: float | None) -> str:
    cred_id = "c-" + secrets.token_hex(8)
    now = time.time()
    conn.execute("INSERT INTO credentials (id, token_sha256, kind, name, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
                 (cred_id, digest(token), kind, name, now, now + ttl_seconds if ttl_seconds else None))
    return cred_id


def register(conn: sqlite3.Connection, passphrase: str, kind: str, name: str,
             ttl_seconds: float | None) -> tuple[str, str]:
    """Exchange the registration passphrase for a principal's first credential: (credential id, token).

    The passphrase works once per principal: a principal that holds a live credential is refused
    (the operator revokes that credential first, e.g. when a machine is rebuilt)."""
    with transaction(conn):
        row = conn.execute("SELECT passphrase_sha256 FROM registration_passphrase").fetchone()
        if row is None:
            raise Refused(403, "bad_passphrase", "this configuration server has no registration passphrase: the "
                          "operator sets control.registration_passphrase_file (from 'lifeboat init') and restarts, "
                          "or runs 'lifeboat passphrase rotate'")
        if not hmac.compare_digest(row[0], digest(passphrase)):
            raise Refused(403, "bad_passphrase", "the registration passphrase is wrong: use the passphrase file "
                          "that 'lifeboat init' wrote (registration.passphrase), or the one last rotated by the operator")
        live = conn.execute("SELECT id FROM credentials WHERE kind = ? AND name = ? AND revoked IS NULL "
                            "AND (expires IS NULL OR expires > ?)", (kind, name, time.time())).fetchone()
        if live:
            raise Refused(409, "already_registered", f"{kind} {name} is already registered (credential {live[0]}): "
                          f"the passphrase is one-time per principal; ask the operator to run "
                          f"'lifeboat credentials revoke {live[0]}' first if it must register again")
        token = new_token()
        return _insert(conn, token, kind, name, ttl_seconds), token


def issue(conn: sqlite3.Connection, kind: str, name: str, ttl_seconds: float | None) -> tuple[str, str]:
    """Operator-issued credential (no passphrase): (credential id, token)."""
    with transaction(conn):
        token = new_token()
        return _insert(conn, token, kind, name, ttl_seconds), token


def authenticate(conn: sqlite3.Connection, token: str) -> Principal:
    """The principal a bearer token stands for; Refused(401) for unknown, revoked or expired tokens."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise Refused(401, "unknown_credential", "the credential is not a Lifeboat token of this deployment: "
                      "pass the file that 'lifeboat init' or 'lifeboat register' wrote")
    row = conn.execute("SELECT id, kind, name, expires, revoked FROM credentials WHERE token_sha256 = ?",
                       (digest(token),)).fetchone()
    if row is None:
        raise Refused(401, "unknown_credential", "the credential is not known to this configuration server "
                      "(from another deployment, or mistyped): register with this server's passphrase")
    if row["revoked"] is not None:
        raise Refused(401, "revoked", f"credential {row['id']} was revoked at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(row['revoked']))}: register again "
                      "('lifeboat register') or ask the operator for a new credential")
    if row["expires"] is not None and row["expires"] <= time.time():
        raise Refused(401, "expired", f"credential {row['id']} expired at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(row['expires']))}: register again "
                      "('lifeboat register --passphrase-file ...')")
    return Principal(row["kind"], row["name"], row["id"])


def revoke(conn: sqlite3.Connection, cred_id: str, reason: str) -> dict | None:
    """Revoke a credential by id (idempotent); None if no such credential."""
    with transaction(conn):
        row = conn.execute("SELECT * FROM credentials WHERE id = ?", (cred_id,)).fetchone()
        if row is None:
            return None
        if row["revoked"] is None:
            conn.execute("UPDATE credentials SET revoked = ?, revoked_reason = ? WHERE id = ?",
                         (time.time(), reason, cred_id))
        return credential_row(conn.execute("SELECT * FROM credentials WHERE id = ?", (cred_id,)).fetchone())


def credential_row(row: sqlite3.Row) -> dict:
    """A credential as the API shows it: never the token or its hash."""
    return {"id": row["id"], "kind": row["kind"], "name": row["name"], "created": row["created"],
            "expires": row["expires"], "revoked": row["revoked"], "revoked_reason": row["revoked_reason"]}


def list_credentials(conn: sqlite3.Connection) -> list[dict]:
    return [credential_row(r) for r in conn.execute("SELECT * FROM credentials ORDER BY created, id")]
