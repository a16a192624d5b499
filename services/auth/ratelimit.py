"""Admission: the exact per-minute rate limit and monthly quota of every API key, mostly in memory.

The database decides; this module decides how rarely it has to ask. The guarantee: with any
number of auth replicas and any concurrency, the requests admitted in a key's UTC minute never
exceed its `rate_limit` (nor the month's `monthly_quota`), and when demand exceeds the limit
exactly the limit is admitted.

Leases (migration 20261205000100_admission_leases.sql). A replica asks
`public.lease_api_key_requests` for a block of tokens of a key's current window; the function
grants from what is left under the key's row lock and counts the block into the window and the
month at once. Checks are then admitted from the block in memory, synchronously, with no
round trip: `try_admit` is what Check's fast path calls. The block is sized from the key's
recent demand (`lease_span` seconds of it, at most `lease_max`), and the function shrinks it
to the waiting checks once less than four blocks' worth is left.

Returning what is not used keeps "exactly the limit". A lease lives `lease_ttl` seconds; a
replica hands back a block's unused tokens (`public.settle_api_key_lease`) when the key has
been idle for `idle_return`, when the window or month turns, when the key changes (NOTIFY
api_key_changes), when another replica asks for them, and at shutdown. A replica that finds
nothing left to grant refuses only if no other live holder has unused tokens; otherwise the
function sends NOTIFY api_key_lease_reclaim, the holders hand their tokens back within
milliseconds, and the asking replica retries (1, 2, 4 ... 50 ms apart, for at most
`reclaim_wait`). Once refused with nothing held anywhere, the window (or month, for the quota)
stays spent until it turns or the key's limits change, so later refusals are answered from
memory too. A holder that dies keeps its tokens until its lease expires on the database clock;
they then count as used. That, and a holder stalled past `reclaim_wait`, are the only ways
admissions can fall short of the limit; neither can make them exceed it.

A replica uses a block only before its deadline: the monotonic time it sent the request, plus
`lease_ttl`, minus `lease_margin`. The database starts the TTL later, when it grants, so a
replica never spends tokens whose lease the database may already have expired.

All database work of one process (grants and returns) runs in one task, one statement at a
time, for every key with waiting checks at once; keys are locked in uuid order, as the usage
writer does, so statements cannot deadlock each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable

import asyncpg

from services.auth import quota
from services.auth.store import bounded
from services.common import db
from services.common.db import translated_errors
from services.common.errors import Aborted
from services.common.server import LazyPool

log = logging.getLogger("kotadb.auth.ratelimit")

RECLAIM_CHANNEL = "api_key_lease_reclaim"

_LEASE_MANY = """
select k.key_id, l.granted, l.window_count, l.rate_limit, l.usage_count, l.monthly_quota, l.revoked,
       l.held_elsewhere
from unnest($1::uuid[], $2::integer[], $3::integer[], $4::integer[]) with ordinality
  as k(key_id, keep, need, want, position)
cross join lateral public.lease_api_key_requests(
  k.key_id, $5, k.keep, k.need, k.want, $6, $7, $8, $9) l
order by k.position
"""
_SETTLE_MANY = """
select count(*) from (
  select public.settle_api_key_lease(s.key_id, $1, s.window_start, s.month, s.unused)
  from unnest($2::uuid[], $3::timestamptz[], $4::date[], $5::integer[]) with ordinality
    as s(key_id, window_start, month, unused, position)
  order by s.position
) settled
"""
# Windows older than this are deleted now and then; GetUsage reads only the current one.
WINDOW_RETENTION = datetime.timedelta(hours=1)
_PRUNE = "delete from public.rate_limit_windows where window_start < $1"
# Delays between retries while other replicas hand tokens back (seconds).
_RECLAIM_BACKOFF = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05)


def holder_name() -> str:
    """holder_name names this auth process in lease rows: host, pid and a random suffix."""
    return f"{socket.gethostname()[:120]}:{os.getpid()}:{secrets.token_hex(4)}"


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


@dataclasses.dataclass(frozen=True)
class _Calendar:
    """_Calendar is the minute a check falls in and the boundaries its answer mentions."""

    window: datetime.datetime
    window_end: datetime.datetime
    month: datetime.date
    month_end: datetime.datetime

    @classmethod
    def at(cls, now: datetime.datetime) -> _Calendar:
        """at computes the calendar of `now` (once a minute on the hot path)."""
        return cls(
            window=quota.window_start(now),
            window_end=quota.window_end(now),
            month=quota.month_start(now),
            month_end=quota.next_month_start(now),
        )

    def holds(self, now: datetime.datetime) -> bool:
        """holds tells whether `now` is still in this calendar's minute."""
        return self.window <= now < self.window_end


@dataclasses.dataclass
class _Lease:
    """_Lease is the block of one key's window a replica holds: unused tokens and their positions."""

    window_start: datetime.datetime
    month: datetime.date
    deadline: float
    rate_limit: int
    monthly_quota: int
    # Window positions (1-based counts) of the unused tokens, as [next, last] ranges in order.
    ranges: list[list[int]]
    unused: int
    # usage_count the next admitted request brings the month to.
    usage_next: int
    granted_at: float
    used_since_grant: int = 0
    last_used: float = 0.0
    # Size of the last grant; a block that falls to a quarter of it is refilled ahead of need.
    last_grant: int = 0

    def usable(self, window: datetime.datetime, month: datetime.date, now: float) -> bool:
        """usable tells whether the block's tokens may be spent now, in this window and month."""
        return now < self.deadline and self.window_start == window and self.month == month

    def take(self) -> int:
        """take spends one unused token and returns its window position."""
        first = self.ranges[0]
        position = first[0]
        if position >= first[1]:
            self.ranges.pop(0)
        else:
            first[0] = position + 1
        self.unused -= 1
        self.used_since_grant += 1
        return position


@dataclasses.dataclass(frozen=True)
class _Spent:
    """_Spent remembers that a key's window (or month, for the quota) has nothing left anywhere."""

    window_start: datetime.datetime
    month: datetime.date
    rate_limit: int
    window_count: int
    monthly_quota: int
    usage_count: int

    @property
    def quota(self) -> bool:
        return self.usage_count >= self.monthly_quota

    def holds(self, window: datetime.datetime, month: datetime.date) -> bool:
        """holds tells whether the refusal still applies in this window and month."""
        if self.quota:
            return self.month == month
        return self.window_start == window and self.month == month


@dataclasses.dataclass
class _Retry:
    """_Retry holds a key's checks waiting for other replicas to hand tokens back."""

    give_up_at: float
    waiters: list[asyncio.Future[Admission]] = dataclasses.field(default_factory=list)
    attempt: int = 0
    scheduled: bool = False


class Admitter:
    """Admitter admits checks against their keys' limits: from leased blocks, else the database.

    `try_admit` answers from memory when it can (a live block with tokens, or a window known to
    be spent) and returns None otherwise; `admit` always answers, asking the database if needed.
    `clock` gives the time windows and months are computed from; `monotonic` times leases.
    `db_timeout` bounds every statement a check may wait for: a database that hangs fails the
    waiting checks with Unavailable (DATABASE_UNAVAILABLE) instead of holding them, and a grant
    that commits after its caller gave up only leaves tokens counted as used (fewer
    admissions, never more).
    """

    def __init__(
        self,
        pool: LazyPool,
        clock: quota.Clock,
        *,
        holder: str | None = None,
        lease_ttl: float = 1.0,
        lease_margin: float = 0.1,
        lease_span: float = 0.1,
        lease_max: int = 1000,
        idle_return: float = 0.2,
        reclaim_wait: float = 2.0,
        batch_keys: int = 512,
        db_timeout: float = 1.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self.clock = clock
        self.holder = holder or holder_name()
        self.lease_ttl = lease_ttl
        self.lease_margin = min(lease_margin, lease_ttl / 2)
        self.lease_span = lease_span
        self.lease_max = lease_max
        self.idle_return = idle_return
        self.reclaim_wait = reclaim_wait
        self.batch_keys = batch_keys
        self.db_timeout = db_timeout
        self._monotonic = monotonic
        self._leases: dict[uuid.UUID, _Lease] = {}
        self._spent: dict[uuid.UUID, _Spent] = {}
        # Insertion-ordered: keys are served in the order their first waiter arrived.
        self._pending: dict[uuid.UUID, list[asyncio.Future[Admission]]] = {}
        self._retrying: dict[uuid.UUID, _Retry] = {}
        self._to_settle: list[tuple[uuid.UUID, _Lease]] = []
        # Busy keys whose block is running low: leased again before checks have to wait.
        self._refill: set[uuid.UUID] = set()
        # Keys whose grant is in the database now, and those to release once it has answered.
        self._in_flight: set[uuid.UUID] = set()
        self._release_after: set[uuid.UUID] = set()
        # Changed keys whose queued checks were not yet sent: the block their grant brings is
        # handed back right after it answers them (it was asked for before the change was heard).
        self._drop_after: set[uuid.UUID] = set()
        self._worker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.calls = 0
        self.settles = 0
        self.fast = 0
        self._last_prune: datetime.datetime | None = None
        self._prune: asyncio.Task[None] | None = None
        self._calendar: _Calendar | None = None

    # --- answering checks -------------------------------------------------------------------

    def try_admit(self, key_id: uuid.UUID) -> Admission | None:
        """try_admit answers from memory, or returns None when only the database can decide."""
        lease = self._leases.get(key_id)
        spent = self._spent.get(key_id)
        if lease is None and spent is None:
            return None
        now = self.clock.now()
        calendar = self._calendar_at(now)
        window, month = calendar.window, calendar.month
        if lease is not None and lease.unused > 0 and lease.usable(window, month, self._monotonic()):
            self.fast += 1
            return self._admitted(lease, now, key_id)
        if spent is not None:
            if spent.holds(window, month):
                return self._refused(spent, now)
            del self._spent[key_id]
        return None

    def _calendar_at(self, now: datetime.datetime) -> _Calendar:
        calendar = self._calendar
        if calendar is None or not calendar.holds(now):
            calendar = self._calendar = _Calendar.at(now)
        return calendar

    async def admit(self, key_id: uuid.UUID) -> Admission:
        """admit counts one request against `key_id`'s limits and says whether it may proceed.

        Raises Unavailable (or another KotaError) when the database cannot decide; the caller
        must then refuse the request (fail closed).
        """
        answer = self.try_admit(key_id)
        if answer is not None:
            return answer
        waiter: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key_id, []).append(waiter)
        self._kick()
        return await waiter

    def _admitted(self, lease: _Lease, now: datetime.datetime, key_id: uuid.UUID | None = None) -> Admission:
        position = lease.take()
        low = lease.last_grant >= 4 and lease.unused <= lease.last_grant // 4
        if low and key_id is not None and key_id not in self._refill:
            self._refill.add(key_id)
            self._kick()
        lease.last_used = self._monotonic()
        usage = lease.usage_next
        lease.usage_next += 1
        calendar = self._calendar_at(now)
        return Admission(
            admitted=True,
            found=True,
            revoked=False,
            rate_limit=lease.rate_limit,
            window_count=position,
            monthly_quota=lease.monthly_quota,
            usage_count=usage,
            now=now,
            window_reset=calendar.window_end,
            month_reset=calendar.month_end,
        )

    def _refused(self, spent: _Spent, now: datetime.datetime) -> Admission:
        calendar = self._calendar_at(now)
        return Admission(
            admitted=False,
            found=True,
            revoked=False,
            rate_limit=spent.rate_limit,
            window_count=spent.window_count,
            monthly_quota=spent.monthly_quota,
            usage_count=spent.usage_count,
            now=now,
            window_reset=calendar.window_end,
            month_reset=calendar.month_end,
        )

    # --- lifecycle and notifications ---------------------------------------------------------

    def drop(self, key_id: uuid.UUID) -> None:
        """drop forgets what is known of a changed key and hands its unused tokens back.

        That includes the block a grant still to be sent for already queued checks will bring:
        without this, a revocation heard while checks queue would leave a fresh block that the
        next checks spend from memory.
        """
        self._spent.pop(key_id, None)
        if key_id in self._pending or key_id in self._retrying:
            self._drop_after.add(key_id)
        self._release(key_id)

    def drop_all(self) -> None:
        """drop_all forgets every spent window (limits may have changed unseen); leases stay valid."""
        self._spent.clear()

    def reclaim(self, key_id: uuid.UUID) -> None:
        """reclaim hands `key_id`'s unused tokens back because another replica is waiting for them."""
        self._release(key_id)

    def _release(self, key_id: uuid.UUID) -> None:
        if key_id in self._in_flight:
            # The grant in flight reports this block's unused tokens as kept: release the
            # block as it stands after the answer, or the returned tokens would be kept too.
            self._release_after.add(key_id)
            return
        lease = self._leases.pop(key_id, None)
        if lease is not None:
            self._to_settle.append((key_id, lease))
            self._kick()

    async def close(self) -> None:
        """close hands every unused token back and waits for the database work in flight."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for key_id in list(self._leases):
            self._release(key_id)
        for key_id, retry in list(self._retrying.items()):
            self._pending.setdefault(key_id, []).extend(retry.waiters)
        self._retrying.clear()
        for _ in range(3):
            if self._worker is not None:
                await asyncio.gather(self._worker, return_exceptions=True)
            if not self._to_settle and not self._pending:
                break
            self._kick()
        if self._prune is not None:
            await asyncio.gather(self._prune, return_exceptions=True)

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="admission")
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="admission-sweeper")

    async def _sweep_forever(self) -> None:
        """_sweep_forever hands back blocks of idle keys and of windows that have turned."""
        while True:
            await asyncio.sleep(max(self.idle_return / 2, 0.01))
            now_mono = self._monotonic()
            calendar = self._calendar_at(self.clock.now())
            for key_id, lease in list(self._leases.items()):
                idle = now_mono - max(lease.last_used, lease.granted_at) >= self.idle_return
                if idle or not lease.usable(calendar.window, calendar.month, now_mono):
                    self._release(key_id)

    # --- the database task ------------------------------------------------------------------

    async def _run(self) -> None:
        while self._pending or self._to_settle or self._refill:
            if self._to_settle:
                settling, self._to_settle = self._to_settle, []
                await self._settle(settling)
                continue
            batch = self._take_batch()
            if not batch:
                continue
            try:
                await self._grant(batch)
            except Exception as exc:  # every waiter of the batch gets the same failure
                for waiters in batch.values():
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
        # No await between the loop's last check and the end of this task: work added now
        # finds the worker done and starts a new one. Pruning therefore runs in its own task.
        self._start_prune()

    def _take_batch(self) -> dict[uuid.UUID, list[asyncio.Future[Admission]]]:
        """_take_batch moves up to batch_keys keys' live waiters out of pending.

        Waiters a block can serve now (it grew while they queued) are answered here.
        """
        batch: dict[uuid.UUID, list[asyncio.Future[Admission]]] = {}
        for key_id in list(self._pending):
            if len(batch) >= self.batch_keys:
                break
            waiters = [waiter for waiter in self._pending.pop(key_id) if not waiter.done()]
            rest: list[asyncio.Future[Admission]] = []
            for waiter in waiters:
                answer = self.try_admit(key_id)
                if answer is None or not answer.admitted:
                    rest.append(waiter)
                else:
                    waiter.set_result(answer)
            if rest:
                batch[key_id] = rest
        refill, self._refill = self._refill, set()
        for key_id in refill:
            if key_id not in batch and key_id in self._leases and len(batch) < self.batch_keys:
                batch[key_id] = []  # no check waits: lease ahead of the demand
        return batch

    async def _grant(self, batch: dict[uuid.UUID, list[asyncio.Future[Admission]]]) -> None:
        """_grant leases tokens for every key of a batch and answers its waiters."""
        now = self.clock.now()
        calendar = self._calendar_at(now)
        window, month = calendar.window, calendar.month
        sent_at = self._monotonic()
        stale = []
        for key_id in batch:
            lease = self._leases.get(key_id)
            if lease is not None and not lease.usable(window, month, sent_at):
                stale.append((key_id, self._leases.pop(key_id)))
        if stale:
            await self._settle(stale)
        # Keys go to the database in uuid order, the order every writer of api_keys locks in.
        ordered = sorted(batch)
        keep, need, want = [], [], []
        for key_id in ordered:
            lease = self._leases.get(key_id)
            needed = len(batch[key_id])
            predicted = 0
            if lease is not None:
                elapsed = max(sent_at - lease.granted_at, 1e-3)
                predicted = math.ceil(lease.used_since_grant / elapsed * self.lease_span)
            keep.append(lease.unused if lease is not None else 0)
            need.append(max(needed, 1))
            want.append(max(needed, min(predicted, self.lease_max)))
        args = (ordered, keep, need, want, self.holder, window, month, now, int(self.lease_ttl * 1000))
        self.calls += 1
        self._in_flight.update(ordered)
        try:
            try:
                rows = await self._lease(args)
            except Aborted:
                # A deadlock with a writer locking in another order; the batch rolled back whole.
                rows = await self._lease(args)
            found = {row["key_id"]: row for row in rows}
            now = self.clock.now()
            for key_id in ordered:
                self._answer(key_id, batch[key_id], found.get(key_id), window, month, sent_at, now)
        finally:
            self._in_flight.clear()
            release, self._release_after = self._release_after, set()
            dropped = self._drop_after.intersection(ordered)
            self._drop_after -= dropped
            release |= dropped
            for key_id in release:
                self._release(key_id)

    async def _lease(self, args: tuple[object, ...]) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            with translated_errors():
                rows: list[asyncpg.Record] = await self._pool.get().fetch(_LEASE_MANY, *args)
            return rows

        return await bounded(run(), self.db_timeout)

    def _answer(
        self,
        key_id: uuid.UUID,
        waiters: list[asyncio.Future[Admission]],
        row: asyncpg.Record | None,
        window: datetime.datetime,
        month: datetime.date,
        sent_at: float,
        now: datetime.datetime,
    ) -> None:
        calendar = self._calendar_at(now)
        common = {"now": now, "window_reset": calendar.window_end, "month_reset": calendar.month_end}
        if row is None or row["revoked"]:
            self._leases.pop(key_id, None)
            refused = Admission(
                admitted=False,
                found=row is not None,
                revoked=row is not None,
                rate_limit=0 if row is None else int(row["rate_limit"]),
                window_count=0 if row is None else int(row["window_count"]),
                monthly_quota=0 if row is None else int(row["monthly_quota"]),
                usage_count=0 if row is None else int(row["usage_count"]),
                **common,
            )
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(refused)
            return
        granted = int(row["granted"])
        count, usage = int(row["window_count"]), int(row["usage_count"])
        # A block whose deadline passed while this grant was in flight is still ours: the grant
        # renewed the whole lease row, kept tokens included, so the new deadline covers it.
        lease = self._leases.get(key_id)
        if lease is None or lease.window_start != window or lease.month != month:
            lease = _Lease(
                window_start=window,
                month=month,
                deadline=0.0,
                rate_limit=0,
                monthly_quota=0,
                ranges=[],
                unused=0,
                usage_next=0,
                granted_at=sent_at,
            )
            self._leases[key_id] = lease
        lease.deadline = sent_at + self.lease_ttl - self.lease_margin
        lease.rate_limit = int(row["rate_limit"])
        lease.monthly_quota = int(row["monthly_quota"])
        lease.granted_at = sent_at
        lease.used_since_grant = 0
        lease.last_grant = granted
        if granted > 0:
            lease.ranges.append([count - granted + 1, count])
            lease.unused += granted
        lease.usage_next = usage - lease.unused + 1
        leftover: list[asyncio.Future[Admission]] = []
        for waiter in waiters:
            if waiter.done():
                continue
            if lease.unused > 0:
                waiter.set_result(self._admitted(lease, now))
            else:
                leftover.append(waiter)
        if lease.unused == 0 and granted == 0:
            # Nothing of this window is ours: keep no lease row alive for it.
            self._leases.pop(key_id, None)
        retry = self._retrying.get(key_id)
        if leftover:
            held_elsewhere = int(row["held_elsewhere"])
            now_mono = self._monotonic()
            if held_elsewhere > 0 and not self._closed:
                if retry is None:
                    retry = self._retrying[key_id] = _Retry(give_up_at=now_mono + self.reclaim_wait)
                if now_mono < retry.give_up_at:
                    # Several batches of one key may wait at once: one timer serves them all.
                    retry.waiters.extend(leftover)
                    if not retry.scheduled:
                        delay = _RECLAIM_BACKOFF[min(retry.attempt, len(_RECLAIM_BACKOFF) - 1)]
                        retry.attempt += 1
                        retry.scheduled = True
                        asyncio.get_running_loop().call_later(delay, self._requeue, key_id)
                    return
                log.warning(
                    "gave up waiting for other auth replicas to hand tokens back",
                    extra={"fields": {"key_id": str(key_id), "held_elsewhere": held_elsewhere}},
                )
            spent = _Spent(
                window_start=window,
                month=month,
                rate_limit=int(row["rate_limit"]),
                window_count=count,
                monthly_quota=int(row["monthly_quota"]),
                usage_count=usage,
            )
            if held_elsewhere == 0:
                self._spent[key_id] = spent
            refused = self._refused(spent, now)
            for waiter in leftover:
                waiter.set_result(refused)
        if retry is not None and not retry.waiters and not retry.scheduled:
            del self._retrying[key_id]

    def _requeue(self, key_id: uuid.UUID) -> None:
        retry = self._retrying.get(key_id)
        if retry is None:
            return
        retry.scheduled = False
        live = [waiter for waiter in retry.waiters if not waiter.done()]
        retry.waiters = []
        if not live:
            del self._retrying[key_id]
            return
        self._pending.setdefault(key_id, [])[:0] = live
        self._kick()

    async def _settle(self, leases: list[tuple[uuid.UUID, _Lease]]) -> None:
        """_settle hands the unused tokens of `leases` back and ends their lease rows."""
        ordered = sorted(leases, key=lambda item: (item[0], item[1].window_start))
        args = (
            self.holder,
            [key_id for key_id, _ in ordered],
            [lease.window_start for _, lease in ordered],
            [lease.month for _, lease in ordered],
            [lease.unused for _, lease in ordered],
        )
        self.settles += 1

        async def run() -> None:
            with translated_errors():
                await self._pool.get().fetchval(_SETTLE_MANY, *args)

        try:
            await bounded(run(), self.db_timeout)
        except Exception as exc:
            # The tokens stay counted as used: fewer admissions, never more.
            log.warning(
                "returning unused admission tokens failed",
                extra={"fields": {"keys": len(ordered), "error": str(exc)[:200]}},
            )

    def _start_prune(self) -> None:
        """_start_prune deletes old windows, at most once a minute per process, in the background."""
        now = self.clock.now()
        if self._last_prune is not None and now - self._last_prune < datetime.timedelta(minutes=1):
            return
        self._last_prune = now
        self._prune = asyncio.create_task(self._prune_windows(now), name="prune-rate-windows")

    async def _prune_windows(self, now: datetime.datetime) -> None:
        try:
            async with db.as_service(self._pool.get()) as connection:
                await connection.execute(_PRUNE, quota.window_start(now) - WINDOW_RETENTION)
        except Exception:  # housekeeping only: a database hiccup here must not fail a check
            log.debug("pruning rate-limit windows failed", exc_info=True)
