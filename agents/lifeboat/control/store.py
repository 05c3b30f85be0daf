"""The configuration server's SQLite state: one connection on one thread, schema migrations in order."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, TypeVar

from ..core import logging as log
from ..core.errors import LifeboatError

logger = log.get("lifeboat.control.store")
T = TypeVar("T")
MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
DB_FILENAME = "control.sqlite3"
BUSY_TIMEOUT_SECONDS = 10.0


class StoreError(LifeboatError):
    """Configuration-server database: {}."""

    exit_code = 74


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations(package: str = "lifeboat.control.migrations") -> list[Migration]:
    """The migrations shipped as package data, in version order; a number used twice is refused.

    Gaps are allowed on purpose: 0001-0049 are the core control plane's, 0050 and up belong to
    recovery plans, so the two ranges grow independently (each range is applied in its own order)."""
    found = []
    for entry in resources.files(package).iterdir():
        m = MIGRATION_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    for a, b in zip(found, found[1:]):
        if a.version == b.version:
            raise StoreError(f"migrations {a.version:04d}_{a.name}.sql and {b.version:04d}_{b.name}.sql share a "
                             "number: renumber one of them")
    if found and found[0].version < 1:
        raise StoreError("migration numbers start at 0001")
    return found


def migrate(conn: sqlite3.Connection, migrations: list[Migration]) -> list[int]:
    """Apply every migration newer than the database, each in its own transaction; returns those applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied REAL NOT NULL)")
    applied = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    known = {m.version for m in migrations}
    newer = [v for v in applied if v not in known]
    if newer:
        raise StoreError(f"the database has schema version {max(newer)}, newer than this release knows "
                         f"({max(known, default=0)}): run the release that wrote it, or restore a backup")
    done = []
    for mig in migrations:
        if mig.version in applied:
            continue
        try:
            # executescript commits any open transaction first, so BEGIN/COMMIT are part of the script:
            # a migration either applies completely, with its schema_version row, or not at all.
            conn.executescript(f"BEGIN;\n{mig.sql}\n;INSERT INTO schema_version VALUES "
                               f"({mig.version}, '{mig.name}', {time.time()});\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {mig.version:04d}_{mig.name}.sql failed: {exc}; the database is left at "
                             f"version {max([0, *applied, *done])}") from None
        logger.info("schema migrated", version=mig.version, migration=mig.name)
        done.append(mig.version)
    return done


class Store:
    """Owns the connection; `await store.call(fn, ...)` runs fn(conn, ...) on the store's thread."""

    def __init__(self, state_dir: str, migrations: list[Migration] | None = None) -> None:
        self.path = os.path.join(state_dir, DB_FILENAME)
        self.state_dir = state_dir
        self._migrations = migrations
        # One thread: sqlite3 connections are not shared across threads, and one writer avoids
        # SQLITE_BUSY between our own requests (the API's load is small).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="control-db")
        self.conn: sqlite3.Connection | None = None
        self.schema_version = 0

    def _open(self) -> int:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # an answered API call (a credential, a job) survives power loss
        os.chmod(self.path, 0o600)  # holds credential hashes
        self.conn = conn
        migrate(conn, self._migrations if self._migrations is not None else bundled_migrations())
        return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    async def open(self) -> None:
        try:
            self.schema_version = await asyncio.get_running_loop().run_in_executor(self._thread, self._open)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.conn is not None, "Store.open() first"
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, self.conn, *args)

    async def close(self) -> None:
        if self.conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self.conn.close)
            self.conn = None
        self._thread.shutdown(wait=True)


class transaction:
    """`with transaction(conn):` BEGIN IMMEDIATE … COMMIT, ROLLBACK on error (autocommit connection)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
