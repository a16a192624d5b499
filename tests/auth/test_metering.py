"""UsageRecorder and write_usage against the session's real PostgreSQL: batching, retries, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from services.auth.metering import UsageRecord, UsageRecorder, write_usage
from services.common.errors import Unavailable
from services.common.server import LazyPool
from services.common.settings import CommonSettings
from tests.conftest import UserFactory

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


async def _new_key(pool: asyncpg.Pool, user_id: uuid.UUID) -> uuid.UUID:
    key_id: uuid.UUID = await pool.fetchval(
        "insert into public.api_keys (user_id, name, key_prefix, key_hash)"
        " values ($1, 'metering test', 'kdb_test_abcdef', $2) returning id",
        user_id,
        uuid.uuid4().hex,
    )
    return key_id


def _record(
    user_id: uuid.UUID,
    key_id: uuid.UUID | None,
    *,
    seconds: int = 0,
    request_id: str | None = None,
    status_code: int = 200,
    grpc_status: int | None = 0,
) -> UsageRecord:
    return UsageRecord(
        user_id=user_id,
        key_id=key_id,
        endpoint="/kotadb.v1.SearchService/SearchCode",
        method="POST",
        status_code=status_code,
        grpc_status=grpc_status,
        response_time_ms=3,
        request_id=request_id if request_id is not None else uuid.uuid4().hex,
        occurred_at=NOW + datetime.timedelta(seconds=seconds),
    )


async def _rows(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "select * from public.usage_metrics where user_id = $1 order by occurred_at, id", user_id
    )
    return rows


@pytest.fixture
async def lazy_pool(database_url: str) -> AsyncIterator[LazyPool]:
    lazy = LazyPool(CommonSettings(database_url=database_url, db_pool_max=4))
    yield lazy
    await lazy.close(wait=5)


KeyedUser = Callable[[], Awaitable[tuple[uuid.UUID, uuid.UUID]]]


@pytest.fixture
def keyed_user(pool: asyncpg.Pool, user_factory: UserFactory) -> KeyedUser:
    async def make() -> tuple[uuid.UUID, uuid.UUID]:
        user_id = await user_factory()
        return user_id, await _new_key(pool, user_id)

    return make


async def test_write_usage_stores_every_field_and_advances_last_used(
    pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    user_id, key_id = await keyed_user()
    batch = [_record(user_id, key_id, seconds=s, status_code=200 + s) for s in (2, 0, 1)]
    batch[0] = dataclasses.replace(batch[0], grpc_status=5)
    assert await write_usage(pool, batch) == 3

    rows = await _rows(pool, user_id)
    assert [(r["status_code"], r["occurred_at"]) for r in rows] == [
        (200, NOW),
        (201, NOW + datetime.timedelta(seconds=1)),
        (202, NOW + datetime.timedelta(seconds=2)),
    ]
    latest = rows[-1]
    assert latest["key_id"] == key_id
    assert latest["endpoint"] == "/kotadb.v1.SearchService/SearchCode"
    assert latest["method"] == "POST"
    assert latest["grpc_status"] == 5
    assert latest["response_time_ms"] == 3
    assert latest["request_id"] == batch[0].request_id
    last_used = await pool.fetchval("select last_used_at from public.api_keys where id = $1", key_id)
    assert last_used == NOW + datetime.timedelta(seconds=2)


async def test_last_used_never_moves_backwards(pool: asyncpg.Pool, keyed_user: KeyedUser) -> None:
    user_id, key_id = await keyed_user()
    await write_usage(pool, [_record(user_id, key_id, seconds=10)])
    await write_usage(pool, [_record(user_id, key_id, seconds=5)])
    last_used = await pool.fetchval("select last_used_at from public.api_keys where id = $1", key_id)
    assert last_used == NOW + datetime.timedelta(seconds=10)
    assert len(await _rows(pool, user_id)) == 2


async def test_a_retried_batch_is_written_once(pool: asyncpg.Pool, keyed_user: KeyedUser) -> None:
    user_id, key_id = await keyed_user()
    batch = [_record(user_id, key_id, seconds=s) for s in range(4)]
    assert await write_usage(pool, batch) == 4
    # As after a COMMIT whose acknowledgement was lost: the same batch again, plus one new row.
    assert await write_usage(pool, [*batch, _record(user_id, key_id, seconds=9)]) == 1
    assert len(await _rows(pool, user_id)) == 5


async def test_a_reused_request_id_at_another_time_is_another_request(
    pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    user_id, key_id = await keyed_user()
    batch = [_record(user_id, key_id, seconds=s, request_id="client-chosen") for s in range(3)]
    assert await write_usage(pool, batch) == 3


async def test_rows_naming_a_key_of_another_user_or_no_key_are_not_written(
    pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    victim, victim_key = await keyed_user()
    forger, _ = await keyed_user()
    batch = [
        _record(forger, victim_key),  # the victim's key id with another tenant
        _record(victim, uuid.uuid4()),  # a key id that does not exist
        _record(victim, victim_key),
    ]
    assert await write_usage(pool, batch) == 1
    assert len(await _rows(pool, victim)) == 1
    assert await _rows(pool, forger) == []


async def test_sessions_without_a_key_are_metered_against_the_user(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    assert await write_usage(pool, [_record(user_id, None)]) == 1
    (row,) = await _rows(pool, user_id)
    assert row["key_id"] is None


async def test_flush_drops_only_the_row_of_a_vanished_user(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=60)
    ghost = uuid.uuid4()  # admitted, then deleted before the batch was written
    for record in (_record(user_id, key_id), _record(ghost, None), _record(user_id, key_id, seconds=1)):
        recorder.submit(record)
    assert await recorder.flush() == 2
    assert recorder.queued == 0
    assert (recorder.stats.written, recorder.stats.skipped) == (2, 1)
    assert len(await _rows(pool, user_id)) == 2


async def test_a_full_batch_is_written_without_waiting_for_the_interval(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=3600, batch_size=5)
    await recorder.start()
    try:
        for second in range(4):
            recorder.submit(_record(user_id, key_id, seconds=second))
        await asyncio.sleep(0.2)
        assert await _rows(pool, user_id) == [], "written before the batch was full or the interval passed"
        recorder.submit(_record(user_id, key_id, seconds=4))
        await _until(lambda: recorder.stats.written == 5)
        assert len(await _rows(pool, user_id)) == 5
    finally:
        await recorder.close()


async def test_the_interval_flushes_a_partial_batch(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=0.05, batch_size=500)
    await recorder.start()
    try:
        recorder.submit(_record(user_id, key_id))
        await _until(lambda: recorder.stats.written == 1)
        assert len(await _rows(pool, user_id)) == 1
    finally:
        await recorder.close()


async def test_rows_wait_for_the_database_and_are_written_once_it_is_reachable(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=0.02)
    await recorder.start()
    try:
        for second in range(3):
            recorder.submit(_record(user_id, key_id, seconds=second))
        with pytest.raises(Unavailable):
            await recorder.flush()  # the pool has not connected yet
        await _until(lambda: recorder.stats.failed_batches >= 2)
        assert recorder.queued == 3
        await lazy_pool.connect()
        await _until(lambda: recorder.stats.written == 3)
        assert [r["occurred_at"] for r in await _rows(pool, user_id)] == [
            NOW + datetime.timedelta(seconds=s) for s in range(3)
        ]
    finally:
        await recorder.close()


async def test_close_writes_everything_queued(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=3600, batch_size=100, max_queued=10_000)
    await recorder.start()
    for index in range(1234):
        recorder.submit(_record(user_id, key_id, seconds=index))
    await recorder.close()
    assert recorder.queued == 0
    assert recorder.stats.written == 1234
    assert await pool.fetchval("select count(*) from public.usage_metrics where key_id = $1", key_id) == 1234
    recorder.submit(_record(user_id, key_id, seconds=99_999))
    await recorder.start()  # a closed recorder does not start again
    assert recorder.queued == 1


async def test_close_gives_up_after_its_time_and_counts_the_loss(
    lazy_pool: LazyPool, keyed_user: KeyedUser
) -> None:
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=0.01)
    for second in range(7):
        recorder.submit(_record(user_id, key_id, seconds=second))
    await recorder.close(within=0.1)  # never connected: every attempt fails
    assert recorder.queued == 0
    assert recorder.stats.dropped == 7
    assert recorder.stats.written == 0


async def test_a_full_queue_drops_the_oldest(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=3600, batch_size=2, max_queued=4)
    for second in range(6):
        recorder.submit(_record(user_id, key_id, seconds=second))
    assert (recorder.queued, recorder.stats.dropped, recorder.stats.received) == (4, 2, 6)
    with pytest.raises(RuntimeError):
        await recorder.check_ready()  # more than half full
    await lazy_pool.connect()
    assert await recorder.flush() == 4
    await recorder.check_ready()
    assert [r["occurred_at"] for r in await _rows(pool, user_id)] == [
        NOW + datetime.timedelta(seconds=s) for s in range(2, 6)
    ]


async def _admit(pool: asyncpg.Pool, key_ids: list[uuid.UUID]) -> None:
    """_admit leases one token of each key in one statement, keys in uuid order, as Check does."""
    now = datetime.datetime.now(datetime.UTC)
    await pool.fetch(
        "select a.* from unnest($1::uuid[]) as k(id)"
        " cross join lateral"
        " public.lease_api_key_requests(k.id, 'metering-test', 0, 1, 1, $2, $3, $4, 1000) a",
        sorted(key_ids),
        now.replace(second=0, microsecond=0),
        now.date().replace(day=1),
        now,
    )


async def _until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    """_until polls condition until it holds, failing the test after `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_close_gives_up_on_a_stalled_database_without_writing_half_a_batch(
    lazy_pool: LazyPool, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    user_id, key_id = await keyed_user()
    recorder = UsageRecorder(lazy_pool, flush_interval=0.01)
    await recorder.start()
    async with pool.acquire() as blocker, blocker.transaction():
        # Every insert into usage_metrics now waits for this transaction: a stalled database.
        await blocker.execute("lock table public.usage_metrics in access exclusive mode")
        for second in range(5):
            recorder.submit(_record(user_id, key_id, seconds=second))
        await _until(lambda: recorder.stats.batches == 0 and recorder.queued == 0)  # a write is stuck
        await recorder.close(within=0.3)
        assert (recorder.stats.dropped, recorder.stats.written, recorder.queued) == (5, 0, 0)
    assert await _rows(pool, user_id) == []


async def test_two_replicas_flushing_the_same_keys_write_everything(
    lazy_pool: LazyPool, database_url: str, pool: asyncpg.Pool, keyed_user: KeyedUser
) -> None:
    await lazy_pool.connect()
    other_pool = LazyPool(CommonSettings(database_url=database_url, db_pool_max=4))
    await other_pool.connect()
    try:
        keyed = [await keyed_user() for _ in range(6)]
        replicas = [UsageRecorder(lazy_pool, flush_interval=60), UsageRecorder(other_pool, flush_interval=60)]
        for round_ in range(20):
            for index, recorder in enumerate(replicas):
                # Each replica's batch names the same keys in the opposite order of the other's.
                order = keyed if index == 0 else list(reversed(keyed))
                for user_id, key_id in order:
                    recorder.submit(_record(user_id, key_id, seconds=round_ * 10 + index))
            # Check's admissions lock the same key rows meanwhile: FOR UPDATE, many keys per statement.
            admissions = [_admit(pool, [key_id for _, key_id in keyed]) for _ in range(3)]
            results = await asyncio.gather(*(recorder.flush() for recorder in replicas), *admissions)
            assert results[:2] == [6, 6]
        for user_id, key_id in keyed:
            rows = await _rows(pool, user_id)
            assert len(rows) == 40
            last_used = await pool.fetchval("select last_used_at from public.api_keys where id = $1", key_id)
            assert last_used == max(row["occurred_at"] for row in rows)
    finally:
        await other_pool.close(wait=5)
