"""Session fixtures shared by every test suite: one PostgreSQL server, migrated databases, a pool.

* `pg_cluster` — the superuser DSN of the server's maintenance database: an embedded cluster in
  a temporary directory (fsync off; stopped at the end of the session), or the server behind
  KOTADB_DATABASE_URL when that is set.
* `fresh_database` — a `DatabaseFactory`: `await fresh_database.create()` (or `create_sync()`
  in synchronous tests) makes a new empty database and returns its DSN; `migrated=True` also
  runs the bootstrap and migrations. Every database it made is dropped at the end.
* `database_url` — one database per session with the bootstrap and all migrations applied.
* `pool` — an asyncpg pool on `database_url`, on the session event loop.
* `user_factory` — `await user_factory()` inserts a user into `auth.users` and returns its id.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.common import db, migrate
from services.common.pgembed import EmbeddedPostgres


def database_dsn(server_dsn: str, database: str) -> str:
    """database_dsn returns server_dsn pointing at another database on the same server."""
    parts = urlsplit(server_dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class DatabaseFactory:
    """DatabaseFactory creates uniquely named databases on the test server and drops them later."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.created: list[str] = []

    async def create(self, *, migrated: bool = False, prefix: str = "kotadb_test") -> str:
        """create makes an empty database (bootstrapped and migrated if asked) and returns its DSN."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(database_dsn(self.server_dsn, "postgres"))
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        dsn = database_dsn(self.server_dsn, name)
        if migrated:
            await migrate.apply_bootstrap_async(dsn)
            await migrate.apply_migrations_async(dsn)
        return dsn

    def create_sync(self, *, migrated: bool = False, prefix: str = "kotadb_test") -> str:
        """create_sync is create for synchronous tests (no event loop may be running)."""
        return asyncio.run(self.create(migrated=migrated, prefix=prefix))

    async def drop_all(self) -> None:
        """drop_all drops every database this factory created, disconnecting any clients."""
        conn = await asyncpg.connect(database_dsn(self.server_dsn, "postgres"))
        try:
            for name in self.created:
                await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()
        self.created.clear()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """pg_cluster yields the superuser DSN of the session's PostgreSQL server."""
    external = os.environ.get("KOTADB_DATABASE_URL", "").strip()
    if external:
        yield external
        return
    # mkdtemp makes a 0700 directory; the unprivileged user PostgreSQL runs as (when we are
    # root) must be able to traverse it to reach the cluster inside.
    home = Path(tempfile.mkdtemp(prefix="kotadb-test-pg-"))
    home.chmod(0o711)
    cluster = EmbeddedPostgres(home, durable=False)
    restore = _stop_on_sigterm(cluster, home)
    try:
        yield cluster.start()
    finally:
        restore()
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def _stop_on_sigterm(cluster: EmbeddedPostgres, home: Path) -> Callable[[], None]:
    """_stop_on_sigterm stops the cluster if the test run is terminated (e.g. by `timeout`).

    SIGTERM's default action ends Python without running fixture finalizers or atexit hooks,
    which would leave the postmaster running; the handler stops it, then dies as before. A
    handler someone else installed is left alone.
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        try:
            cluster.stop()
            shutil.rmtree(home, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


@pytest.fixture(scope="session")
async def fresh_database(pg_cluster: str) -> AsyncIterator[DatabaseFactory]:
    """fresh_database yields a factory of new databases, all dropped at the end of the session."""
    factory = DatabaseFactory(pg_cluster)
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
async def database_url(fresh_database: DatabaseFactory) -> str:
    """database_url is a session-wide database with the bootstrap and all migrations applied."""
    return await fresh_database.create(migrated=True, prefix="kotadb_session")


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """pool is an asyncpg pool on database_url (statement cache off, as behind a pooler)."""
    created = await db.create_pool(database_url, min_size=1, max_size=8, statement_cache_size=0)
    try:
        yield created
    finally:
        await created.close()


class UserFactory:
    """UserFactory inserts users into auth.users of the session database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def __call__(self, email: str | None = None) -> uuid.UUID:
        """__call__ creates a user (a unique email unless given) and returns its id."""
        user_id = uuid.uuid4()
        await self.pool.execute(
            "insert into auth.users (id, aud, role, email) values ($1, 'authenticated', 'authenticated', $2)",
            user_id,
            email or f"user-{user_id.hex[:12]}@example.test",
        )
        return user_id


@pytest.fixture(scope="session")
def user_factory(pool: asyncpg.Pool) -> UserFactory:
    """user_factory creates users in the session database: `user_id = await user_factory()`."""
    return UserFactory(pool)
