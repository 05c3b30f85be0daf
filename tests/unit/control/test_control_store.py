"""Schema migrations: in order, each in one transaction, recorded in schema_version; refusals are clear."""

from __future__ import annotations

import sqlite3

import pytest

from lifeboat.control.store import Migration, Store, StoreError, bundled_migrations, migrate


def versions(conn) -> list[tuple[int, str]]:
    return [(r[0], r[1]) for r in conn.execute("SELECT version, name FROM schema_version ORDER BY version")]


def test_bundled_core_migrations_are_numbered_without_gaps_below_the_reserved_range():
    core = [m.version for m in bundled_migrations() if m.version < 50]   # 0050+ belong to recovery plans
    assert core == list(range(1, len(core) + 1))


def test_a_later_range_applies_after_the_core_and_a_duplicate_number_is_refused(tmp_path):
    import shutil

    pkg = tmp_path / "fake_migrations"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "0001_a.sql").write_text("CREATE TABLE a (x);")
    (pkg / "0050_plans.sql").write_text("CREATE TABLE plans (x);")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        migs = bundled_migrations("fake_migrations")
        assert [m.version for m in migs] == [1, 50]
        conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
        assert migrate(conn, migs) == [1, 50]
        shutil.copy(pkg / "0001_a.sql", pkg / "0001_b.sql")
        with pytest.raises(StoreError, match="share a number"):
            bundled_migrations("fake_migrations")
    finally:
        sys.path.remove(str(tmp_path))


async def test_store_applies_every_migration_once_and_reopens_at_the_same_version(tmp_path):
    store = Store(str(tmp_path))
    await store.open()
    applied = await store.call(versions)
    assert [v for v, _ in applied] == [m.version for m in bundled_migrations()]
    assert store.schema_version == len(applied)
    mode = await store.call(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    assert mode == "wal"
    await store.close()
    again = Store(str(tmp_path))
    await again.open()
    assert await again.call(versions) == applied  # nothing re-applied
    await again.close()


def test_failed_migration_leaves_no_trace_and_names_itself(tmp_path):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    good = Migration(1, "one", "CREATE TABLE a (x INTEGER);")
    bad = Migration(2, "two", "CREATE TABLE b (y INTEGER); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(StoreError, match="0002_two.sql failed.*left at version 1"):
        migrate(conn, [good, bad])
    assert versions(conn) == [(1, "one")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "b" not in tables and "a" in tables  # migration 2 rolled back entirely
    assert migrate(conn, [good, Migration(2, "two", "CREATE TABLE b (y INTEGER);")]) == [2]


def test_database_newer_than_the_code_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    migrate(conn, [Migration(1, "one", "CREATE TABLE a (x);"), Migration(2, "two", "CREATE TABLE b (x);")])
    with pytest.raises(StoreError, match="schema version 2, newer than this release knows \\(1\\)"):
        migrate(conn, [Migration(1, "one", "CREATE TABLE a (x);")])
