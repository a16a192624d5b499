"""Migrations and bootstrap on real PostgreSQL: ordering, idempotence, locking, failure, seed."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.common import migrate
from tests.conftest import DatabaseFactory

ALL_VERSIONS = [m.version for m in migrate.discover_migrations()]
REPO_ROOT = Path(__file__).resolve().parents[2]


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _bootstrap_snapshot(dsn: str) -> list[tuple[Any, ...]]:
    """_bootstrap_snapshot captures everything the bootstrap may create or grant."""
    queries = [
        """select rolname, rolcanlogin, rolinherit, rolbypassrls from pg_roles
            where rolname in ('anon', 'authenticated', 'service_role', 'authenticator',
                              'supabase_auth_admin') order by rolname""",
        """select r.rolname, m.rolname from pg_auth_members am
             join pg_roles r on r.oid = am.roleid join pg_roles m on m.oid = am.member
            order by 1, 2""",
        "select nspname, nspowner::regrole::text, nspacl::text from pg_namespace where nspname = 'auth'",
        """select c.relname, c.relowner::regrole::text, c.relacl::text from pg_class c
            where c.relnamespace = 'auth'::regnamespace order by 1""",
        """select p.oid::regprocedure::text, p.prosrc, p.proacl::text from pg_proc p
            where p.pronamespace = 'auth'::regnamespace order by 1""",
    ]
    rows: list[tuple[Any, ...]] = []
    for sql in queries:
        rows.extend(tuple(r) for r in await _fetch(dsn, sql))
    return rows


async def test_migrations_apply_on_fresh_database_then_nothing(fresh_database: DatabaseFactory) -> None:
    dsn = await fresh_database.create()
    await migrate.apply_bootstrap_async(dsn)
    assert await migrate.apply_migrations_async(dsn) == ALL_VERSIONS
    assert await migrate.apply_migrations_async(dsn) == []
    rows = await _fetch(
        dsn, "select version, name, statements from supabase_migrations.schema_migrations order by version"
    )
    assert [r["version"] for r in rows] == ALL_VERSIONS
    on_disk = {m.version: m for m in migrate.discover_migrations()}
    for row in rows:
        assert row["name"] == on_disk[row["version"]].name
        assert row["statements"] == on_disk[row["version"]].statements()
    tables = {
        r["tablename"]
        for r in await _fetch(dsn, "select tablename from pg_tables where schemaname = 'public'")
    }
    assert {
        "api_keys",
        "documents",
        "usage_metrics",
        "repositories",
        "indexing_jobs",
        "indexing_job_events",
        "webhook_deliveries",
        "token_usage",
        "document_changes",
        "rate_limit_windows",
        "admission_leases",
        "symbols",
    } <= tables


async def test_migration_files_replay_cleanly_when_history_is_lost(fresh_database: DatabaseFactory) -> None:
    # "Idempotent where possible": re-running every file over an existing schema must not fail.
    dsn = await fresh_database.create(migrated=True)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("truncate supabase_migrations.schema_migrations")
    finally:
        await conn.close()
    assert await migrate.apply_migrations_async(dsn) == ALL_VERSIONS


async def test_concurrent_runs_apply_each_migration_exactly_once(fresh_database: DatabaseFactory) -> None:
    dsn = await fresh_database.create()
    await migrate.apply_bootstrap_async(dsn)
    results = await asyncio.gather(*(migrate.apply_migrations_async(dsn) for _ in range(4)))
    applied = [version for result in results for version in result]
    assert sorted(applied) == ALL_VERSIONS
    for result in results:
        assert result == sorted(result)
    rows = await _fetch(dsn, "select count(*) as n from supabase_migrations.schema_migrations")
    assert rows[0]["n"] == len(ALL_VERSIONS)


async def test_failing_migration_rolls_back_and_stops(
    fresh_database: DatabaseFactory, tmp_path: Path
) -> None:
    for path in sorted(migrate.MIGRATIONS_DIR.glob("*.sql"))[:2]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "29990101000000_broken.sql").write_text(
        "create table public.half_done (id int);\nselect * from public.table_that_does_not_exist;\n"
    )
    (tmp_path / "29990101000001_after.sql").write_text("create table public.after_broken (id int);\n")
    dsn = await fresh_database.create()
    await migrate.apply_bootstrap_async(dsn)
    with pytest.raises(migrate.MigrationError, match=re.escape("29990101000000_broken.sql: statement 2")):
        await migrate.apply_migrations_async(dsn, tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate.applied_versions(conn) == ALL_VERSIONS[:2]
    finally:
        await conn.close()
    leftovers = await _fetch(
        dsn, "select tablename from pg_tables where tablename in ('half_done', 'after_broken')"
    )
    assert leftovers == []


def test_discover_rejects_badly_named_and_duplicate_files(tmp_path: Path) -> None:
    (tmp_path / "001_init.sql").write_text("select 1;")
    with pytest.raises(migrate.MigrationError, match=re.escape("named <YYYYMMDDHHMMSS>_<name>.sql")):
        migrate.discover_migrations(tmp_path)
    (tmp_path / "001_init.sql").unlink()
    (tmp_path / "20260101000000_a.sql").write_text("select 1;")
    (tmp_path / "20260101000000_b.sql").write_text("select 2;")
    with pytest.raises(migrate.MigrationError, match="share version"):
        migrate.discover_migrations(tmp_path)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select 1; select 2;", ["select 1", "select 2"]),
        ("select 1", ["select 1"]),
        ("select ';' as x; select 2", ["select ';' as x", "select 2"]),
        ("select 'it''s; fine'", ["select 'it''s; fine'"]),
        ("select E'a\\';b'; select 3", ["select E'a\\';b'", "select 3"]),
        ('select 1 as "a;b"; select 2', ['select 1 as "a;b"', "select 2"]),
        ("-- a; comment\nselect 1;", ["-- a; comment\nselect 1"]),
        ("/* a; /* nested; */ still */ select 1;", ["/* a; /* nested; */ still */ select 1"]),
        ("-- only a comment;\n;  ;", []),
        (
            "create function f() returns int as $$ select 1; $$ language sql; select 2",
            ["create function f() returns int as $$ select 1; $$ language sql", "select 2"],
        ),
        ("do $x$ begin perform 1; end $x$; select 1", ["do $x$ begin perform 1; end $x$", "select 1"]),
        ("select $1::int; select 2", ["select $1::int", "select 2"]),
        ("select a$b from t; select 2", ["select a$b from t", "select 2"]),
    ],
)
def test_split_statements(sql: str, expected: list[str]) -> None:
    assert migrate.split_statements(sql) == expected


async def test_bootstrap_twice_changes_nothing(fresh_database: DatabaseFactory) -> None:
    # Roles are cluster-wide and already exist here (the session database created them), which
    # is also the "roles already exist" case: only the auth schema is missing in this database.
    dsn = await fresh_database.create()
    await migrate.apply_bootstrap_async(dsn)
    first = await _bootstrap_snapshot(dsn)
    await migrate.apply_bootstrap_async(dsn)
    assert await _bootstrap_snapshot(dsn) == first
    assert any(row[0] == "auth.uid()" for row in first)


async def test_bootstrap_keeps_existing_supabase_objects(fresh_database: DatabaseFactory) -> None:
    # Stand in for a real Supabase project: its own auth schema, users table and auth.uid().
    dsn = await fresh_database.create()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            create schema auth;
            create table auth.users (id uuid primary key, instance_id uuid, email text);
            create function auth.uid() returns uuid language sql stable
              as $$ select '11111111-1111-1111-1111-111111111111'::uuid $$;
            """
        )
        await migrate.apply_bootstrap_async(dsn)
        columns = await conn.fetch(
            "select column_name from information_schema.columns"
            " where table_schema = 'auth' and table_name = 'users' order by ordinal_position"
        )
        assert [c["column_name"] for c in columns] == ["id", "instance_id", "email"]
        assert str(await conn.fetchval("select auth.uid()")) == "11111111-1111-1111-1111-111111111111"
        # What was missing was still created.
        assert await conn.fetchval("select to_regprocedure('auth.jwt()') is not null")
    finally:
        await conn.close()


async def test_auth_helpers_follow_supabase_claim_precedence(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select auth.uid()") is None
        async with conn.transaction():
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)",
                '{"sub": "6f1c2a9e-0000-4000-8000-000000000001", "role": "authenticated", "aal": "aal1"}',
            )
            assert str(await conn.fetchval("select auth.uid()")) == "6f1c2a9e-0000-4000-8000-000000000001"
            assert await conn.fetchval("select auth.role()") == "authenticated"
            assert await conn.fetchval("select auth.jwt() ->> 'aal'") == "aal1"
            await conn.execute(
                "select set_config('request.jwt.claim.sub', '6f1c2a9e-0000-4000-8000-000000000002', true)"
            )
            assert str(await conn.fetchval("select auth.uid()")) == "6f1c2a9e-0000-4000-8000-000000000002"
        # Transaction-local settings are gone after commit.
        assert await conn.fetchval("select auth.uid()") is None
    finally:
        await conn.close()


async def test_seed_is_idempotent(fresh_database: DatabaseFactory) -> None:
    dsn = await fresh_database.create(migrated=True)
    await migrate.seed_async(dsn)
    documents = await _fetch(dsn, "select id, revision from public.documents order by path")
    changes = await _fetch(dsn, "select count(*) as n from public.document_changes")
    assert len(documents) == 2
    await migrate.seed_async(dsn)
    assert await _fetch(dsn, "select id, revision from public.documents order by path") == documents
    assert await _fetch(dsn, "select count(*) as n from public.document_changes") == changes


def test_cli_migrate_applies_then_reports_up_to_date(fresh_database: DatabaseFactory) -> None:
    dsn = fresh_database.create_sync()
    command = [sys.executable, "-m", "services.cli", "migrate", "--database-url", dsn, "--seed"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert first.returncode == 0, first.stderr
    for migration in migrate.discover_migrations():
        assert f"applied {migration.version}_{migration.name}" in first.stdout
    assert "seed: done" in first.stdout
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "migrations: up to date" in second.stdout
    assert "applied " not in second.stdout


def test_cli_migrate_without_database_fails_clearly() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "KOTADB_DATABASE_URL" in result.stderr
