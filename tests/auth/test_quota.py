"""Monthly quotas: calendar arithmetic, exhaustion with Retry-After to the month, reset on the 1st.

The month boundary is crossed with an injected clock handed to a real Check (test_check.py's
CheckRig) against real Postgres.
"""

from __future__ import annotations

import datetime
from typing import Any

import asyncpg
import pytest

from services.auth import quota
from services.common.server import LazyPool
from tests.auth.test_check import SEARCH_REST, CheckRig
from tests.auth.test_ratelimit import insert_key

UTC = datetime.UTC


@pytest.mark.parametrize(
    ("now", "start", "following"),
    [
        (datetime.datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC), datetime.date(2031, 1, 1), (2031, 2)),
        (datetime.datetime(2031, 12, 31, 23, 59, 59, tzinfo=UTC), datetime.date(2031, 12, 1), (2032, 1)),
        (datetime.datetime(2032, 2, 29, 12, 0, tzinfo=UTC), datetime.date(2032, 2, 1), (2032, 3)),
        # 23:30 on the 31st in New York is already the 1st in UTC: months are UTC months.
        (
            datetime.datetime(2031, 3, 31, 23, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-4))),
            datetime.date(2031, 4, 1),
            (2031, 5),
        ),
    ],
)
def test_months_are_utc_calendar_months(
    now: datetime.datetime, start: datetime.date, following: tuple[int, int]
) -> None:
    assert quota.month_start(now) == start
    assert quota.next_month_start(now) == datetime.datetime(*following, 1, tzinfo=UTC)


def test_windows_are_utc_minutes_and_retry_after_rounds_up() -> None:
    now = datetime.datetime(2031, 6, 1, 8, 15, 42, 250000, tzinfo=UTC)
    assert quota.window_start(now) == datetime.datetime(2031, 6, 1, 8, 15, tzinfo=UTC)
    assert quota.window_end(now) == datetime.datetime(2031, 6, 1, 8, 16, tzinfo=UTC)
    assert quota.seconds_until(now, quota.window_end(now)) == 18
    assert quota.seconds_until(now, now) == 1  # never tell a client to retry "now"


async def test_quota_exhaustion_and_reset_at_the_month_boundary(
    lazy: LazyPool, database_url: str, pool: asyncpg.Pool, user_factory: Any
) -> None:
    clock = quota.FixedClock(datetime.datetime(2031, 7, 31, 23, 58, 30, tzinfo=UTC))
    rig = CheckRig(lazy, database_url, clock)
    await rig.start()
    try:
        user = await user_factory()
        secret, key_id = await insert_key(pool, user, rate_limit=100, monthly_quota=3)
        await pool.execute("update public.api_keys set usage_period = '2031-07-01' where id = $1", key_id)
        for _ in range(3):
            assert (await rig.check(SEARCH_REST, key=secret)).allowed
        clock.advance(60)  # a new minute: the rate window is fresh, the month is not
        refused = await rig.check(SEARCH_REST, key=secret)
        assert refused.status == 429
        assert refused.reason == "QUOTA_EXHAUSTED"
        assert refused.body["details"][0]["metadata"]["monthly_quota"] == "3"
        # 23:59:30 → midnight of 1 August is 30 seconds away.
        assert refused.headers["retry-after"] == "30"
        assert await pool.fetchval("select usage_count from public.api_keys where id = $1", key_id) == 3

        clock.advance(30)  # 2031-08-01T00:00:00Z
        renewed = await rig.check(SEARCH_REST, key=secret)
        assert renewed.allowed
        row = await pool.fetchrow(
            "select usage_count, usage_period from public.api_keys where id = $1", key_id
        )
        assert row is not None
        assert (row["usage_count"], row["usage_period"]) == (1, datetime.date(2031, 8, 1))
    finally:
        await rig.stop()


async def test_rate_and_quota_are_counted_in_one_step(
    lazy: LazyPool, database_url: str, pool: asyncpg.Pool, user_factory: Any
) -> None:
    # With the quota nearly spent, a burst is cut at the quota, not at the rate limit, and the
    # window count equals what was admitted (no window slot was taken by a quota refusal).
    clock = quota.FixedClock(datetime.datetime(2031, 9, 10, 12, 0, 5, tzinfo=UTC))
    rig = CheckRig(lazy, database_url, clock)
    await rig.start()
    try:
        user = await user_factory()
        secret, key_id = await insert_key(pool, user, rate_limit=10, monthly_quota=4)
        answers = [await rig.check(SEARCH_REST, key=secret) for _ in range(6)]
        assert [a.allowed for a in answers] == [True] * 4 + [False] * 2
        assert {a.reason for a in answers[4:]} == {"QUOTA_EXHAUSTED"}
        count = await pool.fetchval(
            "select count from public.rate_limit_windows where key_id = $1 and window_start = $2",
            key_id,
            quota.window_start(clock.now()),
        )
        assert count == 4
    finally:
        await rig.stop()
