"""Exact admission against real Postgres: rate windows, leased blocks, reclaim, replicas, revocation.

Two `Admitter`s on two separate pools stand in for two auth replicas: they share nothing but
the database, as real replicas do. `insert_key` is the helper the other auth tests use to
write key rows directly (so these tests do not depend on the key-management rules).
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import pytest

from services.auth import keys, quota
from services.auth.keycache import KeyCache
from services.auth.ratelimit import RECLAIM_CHANNEL, Admitter
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


@pytest.fixture
def replicas(two_pools: tuple[LazyPool, LazyPool]) -> Callable[[quota.Clock], tuple[Admitter, Admitter]]:
    """replicas makes two Admitters on separate pools, as two auth processes would be."""

    def make(clock: quota.Clock) -> tuple[Admitter, Admitter]:
        return Admitter(two_pools[0], clock), Admitter(two_pools[1], clock)

    return make


async def test_concurrent_demand_across_replicas_admits_exactly_the_limit(
    pool: asyncpg.Pool, user_factory: Any, replicas: Any
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=50)
    first, second = replicas(quota.FixedClock(datetime.datetime(2031, 5, 17, 10, 41, 30, tzinfo=UTC)))
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


# --- leases: blocks admitted from memory, unused tokens handed back ------------------------------


def _mid_minute() -> quota.FixedClock:
    """_mid_minute is a clock that stays in one minute, so a test's window cannot turn under it."""
    return quota.FixedClock(datetime.datetime(2031, 5, 17, 10, 41, 30, tzinfo=UTC))


async def _window_count(pool: asyncpg.Pool, key_id: uuid.UUID) -> int:
    value = await pool.fetchval(
        "select coalesce(sum(count), 0) from public.rate_limit_windows where key_id = $1", key_id
    )
    return int(value)


async def _wait_for(predicate: Callable[[], Any], limit: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_busy_key_is_admitted_from_memory_after_its_first_block(
    pool: asyncpg.Pool, user_factory: Any, lazy: LazyPool
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=100_000)
    admitter = Admitter(lazy, _mid_minute(), idle_return=30.0)
    try:
        outcomes = []
        for _ in range(20):
            outcomes.extend(await asyncio.gather(*(admitter.admit(key_id) for _ in range(50))))
        assert all(outcome.admitted for outcome in outcomes)
        # Blocks grow with the demand: most of the 1,000 checks never reached the database.
        assert admitter.fast > 500
        assert admitter.calls < 100
        # Positions are distinct, so RateLimit-Remaining never repeats a value.
        assert len({outcome.window_count for outcome in outcomes}) == 1000
        # The block may hold more than was used; closing hands the rest back.
        await admitter.close()
        assert await _window_count(pool, key_id) == 1000
        assert await pool.fetchval("select usage_count from public.api_keys where id = $1", key_id) == 1000
        assert (
            await pool.fetchval("select count(*) from public.admission_leases where key_id = $1", key_id) == 0
        )
    finally:
        await admitter.close()


async def test_an_idle_block_is_handed_back(pool: asyncpg.Pool, user_factory: Any, lazy: LazyPool) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=100_000)
    admitter = Admitter(lazy, _mid_minute(), idle_return=0.05)
    try:
        for _ in range(5):
            await asyncio.gather(*(admitter.admit(key_id) for _ in range(40)))

        async def settled() -> bool:
            return await _window_count(pool, key_id) == 200

        await _wait_for(settled)
        assert admitter.settles >= 1
    finally:
        await admitter.close()


async def test_demand_moving_to_another_replica_still_gets_exactly_the_limit(
    pool: asyncpg.Pool, user_factory: Any, database_url: str, two_pools: tuple[LazyPool, LazyPool]
) -> None:
    # Replica A builds up a large block, then all demand goes to replica B. B must not refuse
    # while A sits on unused tokens: A is asked for them (NOTIFY api_key_lease_reclaim, heard
    # through the key cache's listener, as in the auth process) and B gets exactly the rest.
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=400)
    first = Admitter(two_pools[0], _mid_minute(), idle_return=60.0, lease_span=1.0)
    second = Admitter(two_pools[1], _mid_minute(), idle_return=60.0)
    listener = KeyCache(
        two_pools[0], database_url, channels={RECLAIM_CHANNEL: lambda p: first.reclaim(uuid.UUID(p))}
    )
    listener.start()
    try:
        assert await listener.wait_listening(10.0)
        for _ in range(6):
            assert all(o.admitted for o in await asyncio.gather(*(first.admit(key_id) for _ in range(20))))
        held = await pool.fetchval(
            "select sum(tokens) from public.admission_leases where key_id = $1", key_id
        )
        assert held > 0  # A holds unused tokens B will need
        outcomes = await asyncio.gather(*(second.admit(key_id) for _ in range(600)))
        assert sum(o.admitted for o in outcomes) == 400 - 120
        await first.close()
        await second.close()
        assert await _window_count(pool, key_id) == 400
    finally:
        await listener.close()


async def test_a_crashed_holders_block_expires_and_is_never_exceeded(
    pool: asyncpg.Pool, user_factory: Any, two_pools: tuple[LazyPool, LazyPool]
) -> None:
    # A holder that vanishes without handing its block back: its tokens count as used once its
    # lease expires, and the other replica is refused then rather than waiting forever.
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=60)
    crashed = Admitter(two_pools[0], _mid_minute(), idle_return=60.0, lease_ttl=0.4, lease_span=1.0)
    survivor = Admitter(two_pools[1], _mid_minute(), idle_return=60.0, reclaim_wait=5.0)
    for _ in range(4):
        await asyncio.gather(*(crashed.admit(key_id) for _ in range(5)))
    # Crash: the process stops (after any lease already in flight), handing nothing back.
    if crashed._worker is not None:
        await asyncio.gather(crashed._worker, return_exceptions=True)
    if crashed._sweeper is not None:
        crashed._sweeper.cancel()
    # What the crashed holder had reserved and not used: lost for this window, never lent out.
    lost = crashed._leases[key_id].unused
    assert lost > 0
    outcomes = await asyncio.gather(*(survivor.admit(key_id) for _ in range(100)))
    admitted = sum(o.admitted for o in outcomes)
    assert admitted == 60 - 20 - lost
    assert await _window_count(pool, key_id) == 60
    await survivor.close()


async def test_a_spent_window_is_refused_from_memory(
    pool: asyncpg.Pool, user_factory: Any, lazy: LazyPool
) -> None:
    user = await user_factory()
    _, key_id = await insert_key(pool, user, rate_limit=5)
    admitter = Admitter(lazy, _mid_minute())
    try:
        outcomes = await asyncio.gather(*(admitter.admit(key_id) for _ in range(8)))
        assert sum(o.admitted for o in outcomes) == 5
        calls = admitter.calls
        refused = [await admitter.admit(key_id) for _ in range(10)]
        assert not any(o.admitted for o in refused)
        assert admitter.calls == calls
        # A change to the key (here: a higher limit) forgets the spent window.
        await pool.execute("update public.api_keys set rate_limit = 7 where id = $1", key_id)
        admitter.drop(key_id)
        more = await asyncio.gather(*(admitter.admit(key_id) for _ in range(4)))
        assert sum(o.admitted for o in more) == 2
    finally:
        await admitter.close()
