"""Exact admission against real Postgres: rate windows, coalescing, replicas, revocation.

Two `Admitter`s on two separate pools stand in for two auth replicas: they share nothing but
the database, as real replicas do. `insert_key` is the helper the other auth tests use to
write key rows directly (so these tests do not depend on the key-management rules).
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import pytest

from services.auth import keys, quota
from services.auth.ratelimit import Admitter
from services.common.errors import Unavailable
from services.common.server import LazyPool
from services.common.settings import CommonSettings

UTC = datetime.UTC


async def insert_key(
    pool: asyncpg.Pool,
    user_id: uuid.UUID,
    *,
    permissions: Sequence[str] = ("read",),
    rate_limit: int = 1000,
    monthly_quota: int = 1_000_000,
    expires_at: datetime.datetime | None = None,
    grace_until: datetime.datetime | None = None,
    revoked_at: datetime.datetime | None = None,
) -> tuple[str, uuid.UUID]:
    """insert_key writes an API key row for `user_id` and returns (plaintext secret, key id)."""
    generated = keys.generate_key()
    key_id: uuid.UUID = await pool.fetchval(
        "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions, rate_limit,"
        " monthly_quota, expires_at, grace_until, revoked_at)"
        " values ($1, 'test key', $2, $3, $4, $5, $6, $7, $8, $9) returning id",
        user_id,
        generated.display_prefix,
        generated.key_hash,
        list(permissions),
        rate_limit,
        monthly_quota,
        expires_at,
        grace_until,
        revoked_at,
    )
    return generated.plaintext, key_id


async def open_lazy_pool(database_url: str, size: int = 4) -> LazyPool:
    """open_lazy_pool is a connected LazyPool on `database_url`, as a service would hold."""
    lazy = LazyPool(CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=size))
    await lazy.connect()
    return lazy


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[Callable[[quota.Clock], tuple[Admitter, Admitter]]]:
    pools: list[LazyPool] = [await open_lazy_pool(database_url), await open_lazy_pool(database_url)]

    def make(clock: quota.Clock) -> tuple[Admitter, Admitter]:
        return Admitter(pools[0], clock), Admitter(pools[1], clock)

    try:
        yield make
    finally:
        for lazy in pools:
            await lazy.close(wait=5)


async def test_concurrent_demand_across_replicas_admits_exactly_the_limit(
    pool: asyncpg.Pool, user_factory: Any, replicas: Any
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=50)
    first, second = replicas(quota.SystemClock())
    outcomes = await asyncio.gather(*(admitter.admit(key_id) for admitter in [first, second] * 100))
    admitted = [outcome for outcome in outcomes if outcome.admitted]
    assert len(outcomes) == 200
    assert len(admitted) == 50
    refused = [outcome for outcome in outcomes if not outcome.admitted]
    assert all(not outcome.quota_exhausted and outcome.retry_after >= 1 for outcome in refused)
    # Every admitted request saw a distinct count, 1..50, so RateLimit-Remaining is exact too.
    assert sorted(outcome.window_count for outcome in admitted) == list(range(1, 51))
    # Coalescing: far fewer database calls than requests.
    assert first.calls + second.calls < 200
    stored = await pool.fetchval("select sum(count) from public.rate_limit_windows where key_id = $1", key_id)
    assert stored == 50
    assert await pool.fetchval("select usage_count from public.api_keys where id = $1", key_id) == 50


async def test_a_new_minute_opens_a_new_window(pool: asyncpg.Pool, user_factory: Any, replicas: Any) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=3)
    clock = quota.FixedClock(datetime.datetime(2031, 5, 17, 10, 41, 59, 500000, tzinfo=UTC))
    admitter, _ = replicas(clock)
    results = [await admitter.admit(key_id) for _ in range(4)]
    assert [r.admitted for r in results] == [True, True, True, False]
    assert [r.window_remaining for r in results[:3]] == [2, 1, 0]
    assert results[3].retry_after == 1  # half a second to the minute, rounded up
    clock.advance(0.5)
    fresh = await admitter.admit(key_id)
    assert fresh.admitted and fresh.window_count == 1
    assert fresh.window_reset == datetime.datetime(2031, 5, 17, 10, 43, tzinfo=UTC)


async def test_revoked_and_missing_keys_are_never_admitted(
    pool: asyncpg.Pool, user_factory: Any, replicas: Any
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user)
    admitter, _ = replicas(quota.SystemClock())
    assert (await admitter.admit(key_id)).admitted
    await pool.execute("update public.api_keys set revoked_at = now() where id = $1", key_id)
    revoked = await admitter.admit(key_id)
    assert revoked.revoked and not revoked.admitted
    missing = await admitter.admit(uuid.uuid4())
    assert not missing.found and not missing.admitted
    # Refusals write nothing.
    assert await pool.fetchval("select usage_count from public.api_keys where id = $1", key_id) == 1


async def test_counting_does_not_touch_update_time_but_edits_do(
    pool: asyncpg.Pool, user_factory: Any, replicas: Any
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user)
    before = await pool.fetchval("select updated_at from public.api_keys where id = $1", key_id)
    admitter, _ = replicas(quota.SystemClock())
    await admitter.admit(key_id)
    assert await pool.fetchval("select updated_at from public.api_keys where id = $1", key_id) == before
    await pool.execute("update public.api_keys set name = 'renamed' where id = $1", key_id)
    assert await pool.fetchval("select updated_at from public.api_keys where id = $1", key_id) != before


async def test_an_unreachable_database_refuses_instead_of_admitting() -> None:
    # A pool that never connected is how the auth process looks before (or without) Postgres.
    lazy = LazyPool(CommonSettings(database_url="postgresql://127.0.0.1:1/none"))
    admitter = Admitter(lazy, quota.SystemClock())
    with pytest.raises(Unavailable) as raised:
        await admitter.admit(uuid.uuid4())
    assert raised.value.reason == "DATABASE_UNAVAILABLE"
