"""Quota calendar: UTC minute windows and calendar months, and the clock Check reads them from.

Rate limits count requests per key in fixed UTC minutes (`window_start`); monthly quotas count
them per UTC calendar month (`month_start`). Both are enforced together, in one database call,
by services/auth/ratelimit.py; this module only does the date arithmetic and names the clock,
so tests can move time across a minute or a month boundary without waiting.
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Protocol

UTC = datetime.UTC


class Clock(Protocol):
    """Clock tells the current time as an aware UTC datetime."""

    def now(self) -> datetime.datetime:
        """now is the current time (UTC, timezone-aware)."""
        ...


class SystemClock:
    """SystemClock is the real clock, optionally shifted by `offset` seconds (a test-only setting)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> datetime.datetime:
        """now is the system time plus the offset."""
        return datetime.datetime.fromtimestamp(time.time() + self.offset, tz=UTC)


class FixedClock:
    """FixedClock is a clock tests set and advance by hand."""

    def __init__(self, at: datetime.datetime) -> None:
        self.at = at.astimezone(UTC)

    def now(self) -> datetime.datetime:
        """now is the time the test last set."""
        return self.at

    def advance(self, seconds: float) -> None:
        """advance moves the clock forward by `seconds`."""
        self.at += datetime.timedelta(seconds=seconds)


def window_start(now: datetime.datetime) -> datetime.datetime:
    """window_start is the UTC minute `now` falls in: the key of its rate-limit window."""
    return now.astimezone(UTC).replace(second=0, microsecond=0)


def window_end(now: datetime.datetime) -> datetime.datetime:
    """window_end is when the rate-limit window holding `now` ends (the next UTC minute)."""
    return window_start(now) + datetime.timedelta(minutes=1)


def month_start(now: datetime.datetime) -> datetime.date:
    """month_start is the first day of the UTC calendar month `now` falls in."""
    return now.astimezone(UTC).date().replace(day=1)


def next_month_start(now: datetime.datetime) -> datetime.datetime:
    """next_month_start is midnight UTC on the first day of the month after `now`'s."""
    first = month_start(now)
    year, month = (first.year + 1, 1) if first.month == 12 else (first.year, first.month + 1)
    return datetime.datetime(year, month, 1, tzinfo=UTC)


def seconds_until(now: datetime.datetime, then: datetime.datetime) -> int:
    """seconds_until is the whole seconds from `now` to `then`, rounded up, at least 1.

    It is what a `Retry-After` header carries: a client waiting that long is past the boundary.
    """
    return max(1, math.ceil((then - now).total_seconds()))
