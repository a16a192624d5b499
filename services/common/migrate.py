"""Schema migrations: the Supabase compatibility bootstrap, ordered migrations and the seed.

Migrations live in `deploy/supabase/migrations/<YYYYMMDDHHMMSS>_<name>.sql` and are recorded in
`supabase_migrations.schema_migrations(version, statements, name)` exactly as the Supabase CLI
records them, so `supabase db push` and `kotadb migrate` agree on what has been applied.

Concurrency: every transaction that creates the bookkeeping table, runs the bootstrap or applies
a migration first takes a transaction-scoped advisory lock and re-checks what is recorded. Two
deploys starting at once therefore serialise, and each migration is applied exactly once. The
lock is transaction-scoped rather than session-scoped so the same code works through Supabase's
transaction pooler, where consecutive transactions may run on different server sessions.

Each migration runs in its own transaction: a failing migration leaves no trace and stops the
run, and the ones before it stay applied.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg

SUPABASE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "supabase"
MIGRATIONS_DIR = SUPABASE_DIR / "migrations"
BOOTSTRAP_PATH = SUPABASE_DIR / "bootstrap.sql"
SEED_PATH = SUPABASE_DIR / "seed.sql"

# "kotadb" in ASCII: the advisory lock key every schema change in this project takes.
MIGRATION_LOCK_KEY = 0x6B6F74616462

_FILENAME = re.compile(r"^(?P<version>\d{14})_(?P<name>[a-z0-9_]+)\.sql$")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")

_T = TypeVar("_T")


class MigrationError(RuntimeError):
    """MigrationError reports a migration file that is malformed or failed to apply."""


@dataclass(frozen=True)
class Migration:
    """Migration is one `<version>_<name>.sql` file."""

    version: str
    name: str
    path: Path

    def statements(self) -> list[str]:
        """statements returns the file's SQL split into top-level statements."""
        return split_statements(self.path.read_text(encoding="utf-8"))


def discover_migrations(migrations_dir: Path = MIGRATIONS_DIR) -> list[Migration]:
    """discover_migrations lists the migration files in version order, rejecting bad names."""
    migrations: list[Migration] = []
    seen: dict[str, Path] = {}
    for path in sorted(Path(migrations_dir).glob("*.sql")):
        match = _FILENAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named <YYYYMMDDHHMMSS>_<name>.sql")
        version = match["version"]
        if version in seen:
            raise MigrationError(f"{path.name} and {seen[version].name} share version {version}")
        seen[version] = path
        migrations.append(Migration(version=version, name=match["name"], path=path))
    return migrations


def split_statements(sql: str) -> list[str]:
    """split_statements splits SQL on top-level semicolons.

    Semicolons inside quoted strings, quoted identifiers, dollar-quoted bodies and comments do
    not split. Statements that hold nothing but comments and whitespace are dropped.
    """
    statements: list[str] = []
    start = 0
    i = 0
    n = len(sql)
    has_code = False
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            newline = sql.find("\n", i)
            i = n if newline < 0 else newline + 1
            continue
        if ch == "/" and sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
            continue
        if ch in ("'", '"'):
            i = _skip_quoted(sql, i, ch)
            has_code = True
            continue
        if ch == "$":
            tag = _DOLLAR_TAG.match(sql, i)
            # A "$" after an identifier character is part of the name (or a $1 parameter).
            if tag is not None and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                end = sql.find(tag.group(0), tag.end())
                i = n if end < 0 else end + len(tag.group(0))
                has_code = True
                continue
        if ch == ";":
            if has_code:
                statements.append(sql[start:i].strip())
            start = i + 1
            has_code = False
        elif not ch.isspace():
            has_code = True
        i += 1
    if has_code:
        statements.append(sql[start:].strip())
    return statements


def read_statements(path: Path) -> list[str]:
    """read_statements reads a SQL file and splits it into statements."""
    return split_statements(Path(path).read_text(encoding="utf-8"))


def _skip_block_comment(sql: str, i: int) -> int:
    """_skip_block_comment returns the index after the (possibly nested) comment opened at i."""
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str) -> int:
    """_skip_quoted returns the index after the string or identifier opened at i."""
    # E'...' strings allow backslash escapes; standard strings only the doubled quote.
    backslash = quote == "'" and i > 0 and sql[i - 1] in "eE"
    j = i + 1
    n = len(sql)
    while j < n:
        ch = sql[j]
        if backslash and ch == "\\":
            j += 2
            continue
        if ch == quote:
            if j + 1 < n and sql[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return n


async def _lock(conn: asyncpg.Connection) -> None:
    await conn.execute("select pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)


async def _ensure_history_table(conn: asyncpg.Connection) -> None:
    """_ensure_history_table creates the Supabase CLI's bookkeeping table when missing."""
    async with conn.transaction():
        await _lock(conn)
        await conn.execute("create schema if not exists supabase_migrations")
        await conn.execute(
            "create table if not exists supabase_migrations.schema_migrations"
            " (version text not null primary key)"
        )
        # The CLI added these columns over time; older projects may lack them.
        await conn.execute(
            "alter table supabase_migrations.schema_migrations add column if not exists statements text[]"
        )
        await conn.execute(
            "alter table supabase_migrations.schema_migrations add column if not exists name text"
        )


async def applied_versions(conn: asyncpg.Connection) -> list[str]:
    """applied_versions lists the recorded migration versions in order (empty when none)."""
    exists = await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations') is not null")
    if not exists:
        return []
    rows = await conn.fetch("select version from supabase_migrations.schema_migrations order by version")
    return [str(row["version"]) for row in rows]


async def _execute_statements(conn: asyncpg.Connection, label: str, statements: Sequence[str]) -> None:
    for index, statement in enumerate(statements, start=1):
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            code_lines = [
                line for line in statement.splitlines() if line.strip() and not line.strip().startswith("--")
            ]
            first_line = code_lines[0] if code_lines else statement
            raise MigrationError(
                f"{label}: statement {index} failed ({type(exc).__name__}: {exc}): {first_line.strip()}"
            ) from exc


async def apply_bootstrap_async(dsn: str, bootstrap_path: Path = BOOTSTRAP_PATH) -> None:
    """apply_bootstrap_async runs the Supabase compatibility bootstrap in one locked transaction."""
    statements = read_statements(bootstrap_path)
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        async with conn.transaction():
            await _lock(conn)
            await _execute_statements(conn, Path(bootstrap_path).name, statements)
    finally:
        await conn.close()


async def apply_migrations_async(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """apply_migrations_async applies pending migrations in order and returns their versions."""
    migrations = discover_migrations(migrations_dir)
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    applied_now: list[str] = []
    try:
        await _ensure_history_table(conn)
        recorded = set(await applied_versions(conn))
        for migration in migrations:
            if migration.version in recorded:
                continue
            statements = migration.statements()
            async with conn.transaction():
                await _lock(conn)
                # Another deploy may have applied it while we waited for the lock.
                done = await conn.fetchval(
                    "select 1 from supabase_migrations.schema_migrations where version = $1",
                    migration.version,
                )
                if done:
                    continue
                await _execute_statements(conn, migration.path.name, statements)
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name, statements)"
                    " values ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    statements,
                )
            applied_now.append(migration.version)
    finally:
        await conn.close()
    return applied_now


async def seed_async(dsn: str, seed_path: Path = SEED_PATH) -> None:
    """seed_async runs the idempotent seed file in one transaction."""
    statements = read_statements(seed_path)
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        async with conn.transaction():
            await _execute_statements(conn, Path(seed_path).name, statements)
    finally:
        await conn.close()


def _run(factory: Callable[[], Awaitable[_T]]) -> _T:
    """_run drives a coroutine to completion from synchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("called from a running event loop; await the *_async variant instead")

    async def main() -> _T:
        return await factory()

    return asyncio.run(main())


def apply_bootstrap(dsn: str, bootstrap_path: Path = BOOTSTRAP_PATH) -> None:
    """apply_bootstrap is the synchronous form of apply_bootstrap_async."""
    _run(lambda: apply_bootstrap_async(dsn, bootstrap_path))


def apply_migrations(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """apply_migrations is the synchronous form of apply_migrations_async."""
    return _run(lambda: apply_migrations_async(dsn, migrations_dir))


def seed(dsn: str, seed_path: Path = SEED_PATH) -> None:
    """seed is the synchronous form of seed_async."""
    _run(lambda: seed_async(dsn, seed_path))
