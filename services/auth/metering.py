"""Usage metering: one `public.usage_metrics` row per admitted request, through the gateway or not.

Gateway requests' rows come from Envoy's gRPC access log (services/auth/accesslog.py turns each
finished request into a `UsageRecord`), because only Envoy knows the final status and the
response time. A key presented directly to a service is admitted by ValidateApiKey, which
submits its row at admission (services/auth/server.py `KeyMeter`: status 200, no gRPC status,
0 ms), so direct calls are counted and metered like the rest.
`UsageRecorder` queues records in memory and writes them in batches:

* A batch is written every `flush_interval` seconds (default 0.2 s) or as soon as `batch_size`
  records (default 500) are queued, whichever comes first, as one `insert ... select from
  unnest(...)` (one round trip for up to 500 rows) plus one `update` of `api_keys.last_used_at`,
  in one transaction as `service_role`, after locking the batch's keys in uuid order (the order
  Check's admission uses; anything else deadlocks against it). Measured on the 2-core dev
  machine (embedded Postgres, fsync off): 500 rows in 13 ms (39,000 rows/s), 50 rows in 2.6 ms,
  so one writer keeps up with several times the 5,000 requests/s an auth process should admit.
* A failed batch goes back to the front of the queue and is retried with backoff (0.2 s doubling
  to 5 s), so a database outage delays rows instead of losing them, up to `max_queued` records;
  beyond that the oldest are dropped and counted in `UsageStats.dropped`.
* A retried batch may already have been committed (the connection died during COMMIT). The
  insert skips rows whose `(request_id, occurred_at)` already exists (migration
  20261124110000_usage_metering.sql), so a retry never writes a request twice.
* `close()` (on SIGTERM, after the gRPC server stopped taking access-log entries and before the
  pool closes) writes everything still queued. A crash (SIGKILL, OOM) loses what was queued:
  at most one flush window of traffic, plus what Envoy had buffered but not yet delivered
  (its gRPC access logger sends every `buffer_flush_interval`, 0.2 s in the gateway config).
  Measured by `kotadb bench auth` (step 6): a SIGKILL under 400 admitted requests/s lost the
  rows of 66 requests, about 165 ms of traffic.

Invariant with the Check path: `Check`'s admission increments `api_keys.usage_count` and sets
`last_used_at` atomically when it leases tokens for a key (`public.lease_api_key_requests`,
migration 20261205000100; the quota needs the count at admission time), and subtracts the tokens
it hands back unused. This module writes the request's
row once the response is known, and moves `last_used_at` forward only if a row is newer than
what Check wrote (a replica whose clock runs behind Envoy's); normally that update matches no row
and takes no lock. Once traffic has settled (no request in flight, the queue flushed), the rows of
a key in the current UTC month number exactly its `usage_count`. Rows can only be missing, never
extra: requests whose access-log entry never arrived (Envoy's logger is at-most-once and drops
entries while the auth cluster is unreachable) and the crash window above. A rotated key carries
its month's usage over to its successor (services/auth/management.py), so across a rotation the
invariant holds for the chain of keys, not for each one.

Only records that an admission produced are written: the key id must belong to the tenant the
record names (`api_keys.user_id`), so a client that puts someone else's headers on a request
Check refused cannot charge that user; records of keys deleted meanwhile are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import logging
import time
import uuid
from collections.abc import Sequence

import asyncpg

from services.auth.config import AuthSettings
from services.common import db
from services.common.errors import FailedPrecondition
from services.common.server import LazyPool

log = logging.getLogger("kotadb.auth.metering")

# Backoff after a failed batch: starts at the flush interval and doubles up to this ceiling.
MAX_RETRY_DELAY = 5.0

# The insert's foreign key takes KEY SHARE on every key it names, in the batch's row order;
# Check's admission takes FOR UPDATE on many keys in uuid order (services/auth/ratelimit.py).
# Two lock orders over the same rows deadlock (tests/auth/test_metering.py reproduced it), so
# the batch first takes its KEY SHARE locks itself, in uuid order; the foreign-key checks then
# find them held.
_LOCK_KEYS = """
select 1 from public.api_keys where id = any($1::uuid[]) order by id for key share
"""

_INSERT = """
with incoming as (
  select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::smallint[],
                       $7::int[], $8::text[], $9::timestamptz[])
    as r(key_id, user_id, endpoint, method, status_code, grpc_status, response_time_ms,
         request_id, occurred_at)
), inserted as (
  insert into public.usage_metrics
    (key_id, user_id, endpoint, method, status_code, grpc_status, response_time_ms, request_id,
     occurred_at)
  select r.key_id, r.user_id, r.endpoint, r.method, r.status_code, r.grpc_status,
         r.response_time_ms, r.request_id, r.occurred_at
  from incoming r
  left join public.api_keys k on k.id = r.key_id
  where r.key_id is null or k.user_id = r.user_id
  on conflict (request_id, occurred_at) where request_id is not null do nothing
  returning key_id, occurred_at
)
select key_id, max(occurred_at) as last_used, count(*) as rows
from inserted group by key_id
"""

# Rows are locked in id order, so two replicas flushing batches that share keys cannot
# deadlock. The mode is NO KEY UPDATE (what an update of last_used_at takes anyway), not
# UPDATE: each batch already holds KEY SHARE on its keys, which FOR UPDATE conflicts with, so
# two replicas each holding KEY SHARE and asking FOR UPDATE deadlocked (same test).
_TOUCH = """
with wanted as (
  select u.id, u.last_used from unnest($1::uuid[], $2::timestamptz[]) as u(id, last_used)
), locked as (
  select k.id from public.api_keys k join wanted w on w.id = k.id
  where k.last_used_at is null or k.last_used_at < w.last_used
  order by k.id for no key update of k
)
update public.api_keys k set last_used_at = w.last_used
from wanted w, locked l
where k.id = w.id and l.id = w.id
"""


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """UsageRecord is one finished request an admission let through, as Envoy reported it.

    `endpoint` is the gRPC method path (`/kotadb.v1.SearchService/GetIndexStatus`) whether the
    client used REST or gRPC; `method` the HTTP method; `status_code` the HTTP status sent
    downstream (0 if the client left first); `grpc_status` the gRPC code when the reply carried
    one; `response_time_ms` whole milliseconds from first request byte to last response byte,
    rounded up; `occurred_at` when Envoy received the request.
    """

    user_id: uuid.UUID
    key_id: uuid.UUID | None
    endpoint: str
    method: str
    status_code: int
    grpc_status: int | None
    response_time_ms: int
    request_id: str | None
    occurred_at: datetime.datetime


@dataclasses.dataclass
class UsageStats:
    """UsageStats counts what the recorder did since it started.

    `received` records were submitted, `written` reached the table, `skipped` were refused by
    the database side (unknown key, key of another tenant, a duplicate of a row already
    written), `dropped` were lost to a full queue or a shutdown that ran out of time, and
    `failed_batches` counts write attempts that raised.
    """

    received: int = 0
    written: int = 0
    skipped: int = 0
    dropped: int = 0
    failed_batches: int = 0
    batches: int = 0


class UsageRecorder:
    """UsageRecorder batches UsageRecords into `public.usage_metrics` on a background task.

    Life: `submit` from the access-log servicer (never blocks, never touches the database),
    `start()` once the event loop runs, `flush()` to write everything queued now (tests,
    benchmarks), `close()` on shutdown before the pool closes.
    """

    def __init__(
        self,
        pool: LazyPool,
        *,
        flush_interval: float = 0.2,
        batch_size: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        if flush_interval <= 0 or batch_size <= 0 or max_queued < batch_size:
            raise ValueError("flush_interval and batch_size must be positive, max_queued >= batch_size")
        self._pool = pool
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_queued = max_queued
        self.stats = UsageStats()
        self._queue: collections.deque[UsageRecord] = collections.deque()
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._retry_delay = 0.0

    @property
    def queued(self) -> int:
        """queued is the number of records waiting to be written."""
        return len(self._queue)

    def submit(self, record: UsageRecord) -> None:
        """submit queues one record; a full queue drops its oldest record to make room."""
        self.stats.received += 1
        if len(self._queue) >= self.max_queued:
            self._queue.popleft()
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log.warning("usage queue full, dropping oldest", extra={"fields": self._fields()})
        self._queue.append(record)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    async def start(self) -> None:
        """start launches the background flusher; calling it twice is harmless."""
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="usage-recorder")

    async def flush(self) -> int:
        """flush writes every record queued at the time of the call; returns how many were written.

        It raises the database error of a failed batch after putting that batch back in front.
        """
        target = len(self._queue)
        written = 0
        while target > 0 and self._queue:
            taken, stored = await self._write_next(min(target, self.batch_size))
            target -= taken
            written += stored
        return written

    async def close(self, within: float = 10.0) -> None:
        """close stops the flusher and writes what is queued, retrying for up to `within` seconds.

        Records still queued when time runs out are counted as dropped and logged.
        """
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + within
        task, self._task = self._task, None
        if task is not None:
            # The flusher may be inside a write; give it the time we have, then cancel it (a
            # cancelled write puts its batch back in the queue).
            await asyncio.wait({task}, timeout=within)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        delay = self.flush_interval
        while self._queue:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    await self.flush()
            except Exception as exc:  # TimeoutError included: a stalled database
                if time.monotonic() + delay >= deadline:
                    lost = len(self._queue)
                    self.stats.dropped += lost
                    self._queue.clear()
                    log.error(
                        "usage rows lost at shutdown",
                        extra={"fields": {**self._fields(), "lost": lost, "error": repr(exc)}},
                    )
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
        log.info("usage recorder closed", extra={"fields": self._fields()})

    async def check_ready(self) -> None:
        """check_ready fails while the queue is more than half full (the database is falling behind)."""
        if len(self._queue) > self.max_queued // 2:
            raise RuntimeError(f"{len(self._queue)} usage records waiting to be written")

    async def _run(self) -> None:
        """_run flushes every flush_interval, or earlier once a full batch is queued."""
        while not self._closing:
            wait = max(self.flush_interval, self._retry_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._retry_delay = min(max(self._retry_delay * 2, self.flush_interval), MAX_RETRY_DELAY)
                log.warning(
                    "usage batch failed, will retry",
                    extra={"fields": {**self._fields(), "error": str(exc), "retry_s": self._retry_delay}},
                )
            else:
                self._retry_delay = 0.0

    async def _write_next(self, size: int) -> tuple[int, int]:
        """_write_next writes the first `size` queued records; returns (taken, written)."""
        async with self._write_lock:
            batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            if not batch:
                return 0, 0
            try:
                written = await self._write(batch)
            except BaseException:
                self.stats.failed_batches += 1
                self._queue.extendleft(reversed(batch))
                raise
            self.stats.batches += 1
            self.stats.written += written
            self.stats.skipped += len(batch) - written
            return len(batch), written

    async def _write(self, batch: Sequence[UsageRecord]) -> int:
        """_write inserts one batch; a batch naming a vanished user is retried row by row."""
        pool = self._pool.get()
        try:
            return await write_usage(pool, batch)
        except FailedPrecondition:
            # A foreign key failed: a user was deleted after Check admitted their request. Only
            # that row must go, so write the rest one by one (rare: deleted users only).
            written = 0
            for record in batch:
                with contextlib.suppress(FailedPrecondition):
                    written += await write_usage(pool, [record])
            return written

    def _fields(self) -> dict[str, int]:
        return {"queued": len(self._queue), **dataclasses.asdict(self.stats)}


def recorder_from_settings(pool: LazyPool, settings: AuthSettings) -> UsageRecorder:
    """recorder_from_settings builds the UsageRecorder the auth process runs, from its settings."""
    return UsageRecorder(
        pool,
        flush_interval=settings.usage_flush_interval,
        batch_size=settings.usage_batch_size,
        max_queued=max(settings.usage_max_queued, settings.usage_batch_size),
    )


async def write_usage(pool: asyncpg.Pool, batch: Sequence[UsageRecord]) -> int:
    """write_usage inserts `batch` and advances `last_used_at` in one transaction; returns rows written.

    Records whose key does not exist or belongs to another user, and records already written
    (same request id and start time), are skipped.
    """
    columns: tuple[list[object], ...] = tuple([] for _ in range(9))
    for record in batch:
        values = (
            record.key_id,
            record.user_id,
            record.endpoint,
            record.method,
            record.status_code,
            record.grpc_status,
            record.response_time_ms,
            record.request_id,
            record.occurred_at,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    key_ids = sorted({record.key_id for record in batch if record.key_id is not None})
    async with db.as_service(pool) as conn:
        if key_ids:
            await conn.execute(_LOCK_KEYS, key_ids)
        per_key = await conn.fetch(_INSERT, *columns)
        touched = [(row["key_id"], row["last_used"]) for row in per_key if row["key_id"] is not None]
        if touched:
            await conn.execute(_TOUCH, [key for key, _ in touched], [last for _, last in touched])
    return sum(int(row["rows"]) for row in per_key)
