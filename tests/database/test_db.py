"""services.common.db on real PostgreSQL: pools, tenant-scoped transactions, error translation."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.common import db, metrics
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from services.common.pgembed import free_port
from services.common.settings import CommonSettings
from tests.conftest import UserFactory


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """_keep_session_state replaces asyncpg's RESET ALL on release, as a transaction pooler would."""
    return None


@pytest.fixture
async def single_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """single_pool has one connection whose session state survives release, like a pooler's.

    Every acquire reuses the same server session and nothing resets it in between, so state
    that leaks out of a transaction would be visible to the next user of the pool.
    """
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, statement_cache_size=0, reset=_keep_session_state
    )
    try:
        yield pool
    finally:
        await pool.close()


async def test_as_user_runs_as_authenticated_with_the_users_claims(
    single_pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    async with db.as_user(
        single_pool, user_id, {"aal": "aal2", "sub": "forged", "role": "service_role"}
    ) as conn:
        assert await conn.fetchval("select current_user") == "authenticated"
        assert await conn.fetchval("select auth.uid()") == user_id
        assert await conn.fetchval("select auth.role()") == "authenticated"
        claims = json.loads(await conn.fetchval("select auth.jwt()::text"))
        assert claims == {"aal": "aal2", "sub": str(user_id), "role": "authenticated"}
    # Everything was transaction-local: the same session is back to its own role, no claims.
    async with single_pool.acquire() as conn:
        assert await conn.fetchval("select current_user") == "postgres"
        assert await conn.fetchval("select auth.uid()") is None


async def test_as_user_ignores_a_stale_session_level_claim(
    single_pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    # Through a transaction pooler our transaction may run in a server session where another
    # client ran a session-level SET. The per-claim setting would win in auth.uid(), so as_user
    # blanks it for its transaction.
    intruder = uuid.uuid4()
    async with single_pool.acquire() as conn:
        await conn.execute(f"set request.jwt.claim.sub = '{intruder}'")
    async with single_pool.acquire() as conn:
        assert await conn.fetchval("select auth.uid()") == intruder  # the leak is really there
    user_id = await user_factory()
    async with db.as_user(single_pool, user_id) as conn:
        assert await conn.fetchval("select auth.uid()") == user_id


async def test_as_user_rejects_an_id_that_is_not_a_uuid(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError):
        async with db.as_user(pool, "1 or 1=1"):
            pass


async def test_as_service_runs_as_service_role(pool: asyncpg.Pool) -> None:
    async with db.as_service(pool) as conn:
        assert await conn.fetchval("select current_user") == "service_role"
        assert await conn.fetchval("select auth.role()") == "service_role"
        assert await conn.fetchval("select auth.uid()") is None


async def test_create_pool_from_settings(database_url: str) -> None:
    settings = CommonSettings(
        database_url=database_url, db_pool_min=0, db_pool_max=2, db_statement_cache_size=0
    )
    pool = await db.create_pool(settings)
    try:
        assert pool.get_max_size() == 2
        assert await pool.fetchval("select current_setting('application_name')") == "kotadb"
    finally:
        await pool.close()


async def test_create_pool_without_a_url_fails_clearly() -> None:
    with pytest.raises(ValueError, match="KOTADB_DATABASE_URL"):
        await db.create_pool(CommonSettings(database_url=""))


async def _key(pool: asyncpg.Pool, user_id: uuid.UUID, key_hash: str) -> None:
    async with db.as_service(pool) as conn:
        await conn.execute(
            "insert into public.api_keys (user_id, name, key_prefix, key_hash)"
            " values ($1, 'k', 'kdb_test', $2)",
            user_id,
            key_hash,
        )


async def test_unique_violation_becomes_already_exists(pool: asyncpg.Pool, user_factory: UserFactory) -> None:
    user_id = await user_factory()
    key_hash = secrets.token_hex(32)
    await _key(pool, user_id, key_hash)
    with pytest.raises(AlreadyExists) as caught:
        await _key(pool, user_id, key_hash)
    assert caught.value.reason == "ALREADY_EXISTS"
    assert caught.value.metadata == {"constraint": "api_keys_key_hash_key"}
    assert await pool.fetchval("select count(*) from public.api_keys where key_hash = $1", key_hash) == 1


async def test_foreign_key_violation_becomes_failed_precondition(pool: asyncpg.Pool) -> None:
    ghost = uuid.uuid4()
    with pytest.raises(FailedPrecondition) as caught:
        await _key(pool, ghost, secrets.token_hex(32))
    assert caught.value.reason == "REFERENCED_RESOURCE_MISSING"
    assert await pool.fetchval("select count(*) from public.api_keys where user_id = $1", ghost) == 0


@pytest.mark.parametrize(
    "sql",
    [
        "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions)"
        " values ($1, 'k', 'kdb_test', md5(random()::text), '{root}')",
        "insert into public.api_keys (user_id, name, key_prefix, key_hash)"
        " values ($1, null, 'kdb_test', md5(random()::text))",
        "select $1::uuid, 'not-a-uuid'::uuid",
    ],
)
async def test_bad_values_become_invalid_argument(
    pool: asyncpg.Pool, user_factory: UserFactory, sql: str
) -> None:
    user_id = await user_factory()
    with pytest.raises(InvalidArgument) as caught:
        async with db.as_service(pool) as conn:
            await conn.execute(sql, user_id)
    assert caught.value.reason == "CONSTRAINT_VIOLATION"
    assert await pool.fetchval("select count(*) from public.api_keys where user_id = $1", user_id) == 0


async def test_row_level_security_violation_becomes_permission_denied(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    me, other = await user_factory(), await user_factory()
    with pytest.raises(PermissionDenied) as caught:
        async with db.as_user(pool, me) as conn:
            await conn.execute("insert into public.documents (user_id, path) values ($1, 'x.py')", other)
    assert caught.value.reason == "ROW_LEVEL_SECURITY"
    with pytest.raises(PermissionDenied) as denied:
        async with db.as_user(pool, me) as conn:
            await conn.execute("select * from public.document_changes for update")
    assert denied.value.reason == "DATABASE_PERMISSION_DENIED"


async def test_server_statement_timeout_becomes_unavailable(pool: asyncpg.Pool) -> None:
    with pytest.raises(Unavailable) as caught:
        async with db.as_service(pool) as conn:
            await conn.execute("select set_config('statement_timeout', '20', true)")
            await conn.execute("select pg_sleep(5)")
    assert caught.value.reason == "DATABASE_UNAVAILABLE"
    assert caught.value.metadata == {"cause": "timeout"}
    assert caught.value.retry_after == db.UNAVAILABLE_RETRY_AFTER


async def test_lock_timeout_becomes_aborted(pool: asyncpg.Pool, user_factory: UserFactory) -> None:
    user_id = await user_factory()
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("select 1 from auth.users where id = $1 for update", user_id)
        with pytest.raises(Aborted) as caught, db.translated_errors():
            async with pool.acquire() as waiter, waiter.transaction():
                await waiter.execute("select set_config('lock_timeout', '20', true)")
                await waiter.execute("select 1 from auth.users where id = $1 for update", user_id)
    assert caught.value.reason == "TRANSACTION_CONFLICT"
    assert caught.value.retry_after is not None


async def test_unreachable_database_becomes_unavailable() -> None:
    with pytest.raises(Unavailable) as caught, db.translated_errors():
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/kotadb", timeout=5)
    assert caught.value.reason == "DATABASE_UNAVAILABLE"
    assert caught.value.retry_after == db.UNAVAILABLE_RETRY_AFTER


async def test_unexpected_errors_pass_through_untranslated(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        async with db.as_service(pool) as conn:
            await conn.execute("select * from public.no_such_table")


def _timeouts(kind: str, service: str) -> float:
    value = metrics.REGISTRY.get_sample_value("kotadb_db_timeouts_total", {"service": service, "kind": kind})
    return value or 0.0


async def test_settings_bound_every_query_and_acquire(database_url: str) -> None:
    settings = CommonSettings(
        database_url=database_url,
        db_pool_min=1,
        db_pool_max=1,
        db_statement_timeout=0.2,
        db_acquire_timeout=0.1,
    )
    pool = await db.create_pool(settings, service="dbtest-bounds")
    try:
        assert isinstance(pool, db.BoundedPool)
        before = _timeouts("statement", "dbtest-bounds")
        # The client-side command timeout: no server setting involved, as for a hung server.
        with pytest.raises(Unavailable) as slow, db.translated_errors():
            await pool.fetchval("select pg_sleep(5)")
        assert slow.value.reason == "DATABASE_UNAVAILABLE"
        assert slow.value.metadata == {"cause": "timeout"}
        assert _timeouts("statement", "dbtest-bounds") == before + 1
        # The one connection is taken: the next caller waits the acquire timeout, then gives up.
        acquires = _timeouts("acquire", "dbtest-bounds")
        async with pool.acquire():
            with pytest.raises(Unavailable) as busy, db.translated_errors():
                await pool.fetchval("select 1")
        assert busy.value.reason == "DATABASE_UNAVAILABLE"
        assert _timeouts("acquire", "dbtest-bounds") == acquires + 1
        # An explicit timeout still wins over the pool's defaults.
        assert await pool.fetchval("select pg_sleep(0.3) is not null", timeout=10) is True
    finally:
        await pool.close()


async def test_transactions_set_the_statement_timeout_only_for_themselves(database_url: str) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1, statement_timeout=2.5)
    try:
        outside = await pool.fetchval("select current_setting('statement_timeout')")
        async with db.as_service(pool) as conn:
            assert await conn.fetchval("select current_setting('statement_timeout')") == "2500ms"
        user = await pool.fetchval("select gen_random_uuid()")
        async with db.as_user(pool, user, statement_timeout=0.25) as conn:
            assert await conn.fetchval("select current_setting('statement_timeout')") == "250ms"
        # Transaction-local, like the role: the same (only) connection is back to its own value.
        assert await pool.fetchval("select current_setting('statement_timeout')") == outside
    finally:
        await pool.close()


async def test_server_statement_timeout_stops_a_transaction(database_url: str) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        with pytest.raises(Unavailable) as caught:
            async with db.as_service(pool, statement_timeout=0.05) as conn:
                await conn.execute("select pg_sleep(5)")
        assert caught.value.reason == "DATABASE_UNAVAILABLE"
        assert isinstance(caught.value.__cause__, asyncpg.QueryCanceledError)
        assert await pool.fetchval("select 1") == 1
    finally:
        await pool.close()


async def test_a_transaction_whose_query_times_out_is_dropped_not_rolled_back(database_url: str) -> None:
    pool = await db.create_pool(
        database_url, min_size=1, max_size=1, statement_timeout=0.2, service="dbtest-drop"
    )
    try:
        before = _timeouts("statement", "dbtest-drop")
        first = await pool.fetchval("select pg_backend_pid()")
        with pytest.raises(Unavailable) as caught:
            # The server would wait 10 s: the client's command timeout fires inside the transaction.
            async with db.as_service(pool, statement_timeout=10) as conn:
                await conn.execute("select pg_sleep(5)")
        assert caught.value.reason == "DATABASE_UNAVAILABLE"
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert _timeouts("statement", "dbtest-drop") == before + 1
        # The only connection was closed rather than reused; the pool opens a new backend.
        assert await pool.fetchval("select pg_backend_pid()") != first
    finally:
        await pool.close()
