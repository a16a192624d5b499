"""Admission: the exact per-minute rate limit and monthly quota of every API key.

The database decides. `public.admit_api_key_requests` (migration 20261124100000) locks the
key's row, reads the current minute's count and the month's usage, grants
`min(n, rate_limit - window_count, monthly_quota - usage_count)` requests and records them, all
in one statement. The row lock serializes every grant for a key across any number of auth
replicas, so admitted requests never exceed either limit and, when demand exceeds it, exactly
the limit is admitted.

One statement per request would already be exact; what this module adds is coalescing. Checks
of the same key that arrive while a call for that key is in flight wait for it and then go to
the database together, as one call asking for `n` grants; the first `granted` waiters are
admitted in arrival order, the rest are refused. So a burst on one key costs a handful of
round trips instead of one each, lock waits on that key's row stay short, and the guarantee is
unchanged because the grant still comes from the locked row. Different keys never wait for
each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import uuid

from services.auth import quota
from services.common import db
from services.common.db import translated_errors
from services.common.server import LazyPool

log = logging.getLogger("kotadb.auth.ratelimit")

_ADMIT = "select * from public.admit_api_key_requests($1, $2, $3, $4, $5)"
# Windows older than this are deleted now and then; GetUsage reads only the current one.
WINDOW_RETENTION = datetime.timedelta(hours=1)
_PRUNE = "delete from public.rate_limit_windows where window_start < $1"


@dataclasses.dataclass(frozen=True)
class Admission:
    """Admission is the outcome of one request's check against its key's limits.

    `found` is false when the key no longer exists; `revoked` when it was revoked (both deny).
    `window_count` is the window's count including this request when admitted;
    `window_reset`/`month_reset` are when the current window and quota month end.
    """

    admitted: bool
    found: bool
    revoked: bool
    rate_limit: int
    window_count: int
    monthly_quota: int
    usage_count: int
    now: datetime.datetime
    window_reset: datetime.datetime
    month_reset: datetime.datetime

    @property
    def window_remaining(self) -> int:
        """window_remaining is how many more requests the current window admits."""
        return max(0, self.rate_limit - self.window_count)

    @property
    def quota_exhausted(self) -> bool:
        """quota_exhausted tells whether the month's quota is what refused the request."""
        return not self.admitted and self.usage_count >= self.monthly_quota

    @property
    def retry_after(self) -> int:
        """retry_after is the whole seconds until a refused request could be admitted again."""
        until = self.month_reset if self.quota_exhausted else self.window_reset
        return quota.seconds_until(self.now, until)


@dataclasses.dataclass
class _Waiter:
    future: asyncio.Future[Admission]


@dataclasses.dataclass
class _KeyQueue:
    waiting: list[_Waiter] = dataclasses.field(default_factory=list)
    running: bool = False


class Admitter:
    """Admitter grants requests to keys through the admission function, coalescing per key.

    `clock` gives the time windows and months are computed from; `batch_max` bounds how many
    waiters one database call serves.
    """

    def __init__(self, pool: LazyPool, clock: quota.Clock, *, batch_max: int = 256) -> None:
        self._pool = pool
        self.clock = clock
        self.batch_max = batch_max
        self._queues: dict[uuid.UUID, _KeyQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self._last_prune: datetime.datetime | None = None

    async def admit(self, key_id: uuid.UUID) -> Admission:
        """admit counts one request against `key_id`'s limits and says whether it may proceed.

        Raises Unavailable (or another KotaError) when the database cannot decide; the caller
        must then refuse the request (fail closed).
        """
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future())
        queue = self._queues.setdefault(key_id, _KeyQueue())
        queue.waiting.append(waiter)
        if not queue.running:
            queue.running = True
            task = asyncio.create_task(self._drain(key_id, queue), name="admission")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiter.future

    async def _drain(self, key_id: uuid.UUID, queue: _KeyQueue) -> None:
        try:
            while queue.waiting:
                batch = queue.waiting[: self.batch_max]
                del queue.waiting[: self.batch_max]
                live = [w for w in batch if not w.future.done()]
                if not live:
                    continue
                try:
                    outcomes = await self._grant(key_id, len(live))
                except Exception as exc:  # every waiter of the batch gets the same failure
                    for waiter in live:
                        if not waiter.future.done():
                            waiter.future.set_exception(exc)
                    continue
                for waiter, outcome in zip(live, outcomes, strict=True):
                    if not waiter.future.done():
                        waiter.future.set_result(outcome)
        finally:
            queue.running = False
            if not queue.waiting and self._queues.get(key_id) is queue:
                del self._queues[key_id]
        await self._maybe_prune()

    async def _grant(self, key_id: uuid.UUID, requested: int) -> list[Admission]:
        """_grant asks the database for `requested` grants and splits the answer per waiter."""
        now = self.clock.now()
        window = quota.window_start(now)
        month = quota.month_start(now)
        self.calls += 1
        with translated_errors():
            row = await self._pool.get().fetchrow(_ADMIT, key_id, requested, window, month, now)
        common = {
            "now": now,
            "window_reset": quota.window_end(now),
            "month_reset": quota.next_month_start(now),
        }
        if row is None:
            refused = Admission(
                admitted=False,
                found=False,
                revoked=False,
                rate_limit=0,
                window_count=0,
                monthly_quota=0,
                usage_count=0,
                **common,
            )
            return [refused] * requested
        granted = int(row["granted"])
        final_count, final_usage = int(row["window_count"]), int(row["usage_count"])
        outcomes: list[Admission] = []
        for index in range(requested):
            admitted = index < granted
            # Admitted waiters see the count as it stood after their own grant.
            offset = granted - index - 1 if admitted else 0
            outcomes.append(
                Admission(
                    admitted=admitted,
                    found=True,
                    revoked=bool(row["revoked"]),
                    rate_limit=int(row["rate_limit"]),
                    window_count=final_count - offset,
                    monthly_quota=int(row["monthly_quota"]),
                    usage_count=final_usage - offset,
                    **common,
                )
            )
        return outcomes

    async def _maybe_prune(self) -> None:
        """_maybe_prune deletes old windows at most once a minute per process; failures are ignored."""
        now = self.clock.now()
        if self._last_prune is not None and now - self._last_prune < datetime.timedelta(minutes=1):
            return
        self._last_prune = now
        try:
            async with db.as_service(self._pool.get()) as connection:
                await connection.execute(_PRUNE, quota.window_start(now) - WINDOW_RETENTION)
        except Exception:  # housekeeping only: a database hiccup here must not fail a check
            log.debug("pruning rate-limit windows failed", exc_info=True)

    async def close(self) -> None:
        """close waits for in-flight database calls to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
