"""Job events: the append-only log in public.indexing_job_events, wake-ups, and WatchJob's stream.

* `append_event` numbers a job's events 1, 2, 3, ... by incrementing `indexing_jobs.event_seq`
  under the job's row lock, in the caller's transaction, so an event commits (and is seen)
  together with the change it describes. Kinds: queued, coalesced, claimed, fetching, diffing,
  progress, finished, failed, retrying, cancel_requested, cancelled.
* `Wakeups` is how waiting parts learn that something changed. With a listen URL it holds one
  dedicated connection with `LISTEN indexing_jobs` (a job became claimable: workers) and
  `LISTEN indexing_job_events` (payload: the job id: watchers). Notifications are hints only:
  every wait also ends after the poll interval, so a lost notification (or no listener at all,
  behind Supabase's transaction pooler, which cannot LISTEN) costs at most one poll interval.
* `watch` streams a job's events after a sequence until the job reached a final state and
  every event up to that state has been sent, reading as the caller (RLS) each time it wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import asyncpg

from services.common import db
from services.common.db import Connection
from services.common.errors import NotFound

log = logging.getLogger("kotadb.ingest.events")

JOBS_CHANNEL = "indexing_jobs"
EVENTS_CHANNEL = "indexing_job_events"
# Seconds between attempts to (re)connect the listener.
LISTEN_RETRY = 1.0
# Events read per query while streaming; a watcher that is far behind catches up in pages.
PAGE = 500
_FINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclasses.dataclass(frozen=True)
class JobEventRecord:
    """JobEventRecord is one row of public.indexing_job_events, decoded."""

    job_id: uuid.UUID
    sequence: int
    kind: str
    state: str
    message: str
    data: Mapping[str, Any]
    created_at: dt.datetime

    @property
    def final(self) -> bool:
        """final tells whether the event leaves the job in a state it never leaves."""
        return self.state in _FINAL


async def append_event(
    conn: Connection,
    job_id: uuid.UUID,
    kind: str,
    state: str,
    message: str,
    *,
    progress: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> int:
    """append_event adds the job's next event in the caller's transaction and returns its sequence."""
    data: dict[str, Any] = {}
    if progress is not None:
        data["progress"] = dict(progress)
    if error is not None:
        data["error"] = dict(error)
    row = await conn.fetchrow(
        "with next as (update public.indexing_jobs set event_seq = event_seq + 1 where id = $1"
        "  returning id, user_id, event_seq)"
        " insert into public.indexing_job_events (job_id, user_id, seq, kind, state, message, data)"
        " select id, user_id, event_seq, $2, $3, $4, $5::jsonb from next returning seq",
        job_id,
        kind,
        state,
        message[:1000],
        json.dumps(data),
    )
    if row is None:
        raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
    return int(row["seq"])


async def list_events(
    conn: Connection, job_id: uuid.UUID, *, after: int, limit: int = PAGE
) -> list[JobEventRecord]:
    """list_events returns the job's events with a sequence above `after`, in order (RLS applies)."""
    rows = await conn.fetch(
        "select job_id, seq, kind, state, message, data, created_at from public.indexing_job_events"
        " where job_id = $1 and seq > $2 order by seq limit $3",
        job_id,
        after,
        limit,
    )
    return [
        JobEventRecord(
            job_id=row["job_id"],
            sequence=row["seq"],
            kind=row["kind"],
            state=row["state"],
            message=row["message"],
            data=json.loads(row["data"]) if isinstance(row["data"], str) else row["data"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


class Wakeups:
    """Wakeups wakes workers when jobs become claimable and watchers when a job has new events.

    `listen_url` empty means polling only. `wait_jobs` and `wait_job` return after a
    notification or after `poll_interval` seconds, whichever comes first.
    """

    def __init__(self, listen_url: str, *, poll_interval: float) -> None:
        self._url = listen_url
        self.poll_interval = poll_interval
        self._jobs = asyncio.Event()
        self._watchers: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._listening = asyncio.Event()

    @property
    def listening(self) -> bool:
        """listening tells whether notifications are being received right now."""
        return self._listening.is_set()

    async def wait_listening(self, limit: float) -> bool:
        """wait_listening waits up to `limit` seconds for the listener; tells whether it is up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), limit)
        return self.listening

    def start(self) -> None:
        """start launches the listener task when a listen URL is set (idempotent)."""
        if self._task is None and self._url:
            self._task = asyncio.create_task(self._listen_forever(), name="ingest-wakeups")

    async def close(self) -> None:
        """close stops listening and wakes every waiter."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()
        self._wake_all()

    async def wait_jobs(self) -> None:
        """wait_jobs returns when a job may have become claimable, or after the poll interval."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._jobs.wait(), self.poll_interval)
        self._jobs.clear()

    def nudge(self) -> None:
        """nudge wakes the workers of this process (a job was queued here, or one finished)."""
        self._jobs.set()

    @contextlib.contextmanager
    def subscription(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """subscription registers a watcher of `job_id`; yields an Event set on each notification."""
        event = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    self._watchers.pop(job_id, None)

    async def _listen_forever(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self._url, statement_cache_size=0)
                self._conn = conn
                await conn.add_listener(JOBS_CHANNEL, self._on_notify)
                await conn.add_listener(EVENTS_CHANNEL, self._on_notify)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                self._listening.set()
                # Anything may have happened while we were not listening.
                self._wake_all()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job listener unavailable", extra={"fields": {"error": type(exc).__name__}})
            finally:
                self._listening.clear()
                await self._drop()
            await asyncio.sleep(LISTEN_RETRY)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        if channel == JOBS_CHANNEL:
            self._jobs.set()
            return
        try:
            job_id = uuid.UUID(str(payload))
        except ValueError:
            return
        for event in self._watchers.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        self._jobs.set()
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()


async def watch(
    pool: asyncpg.Pool,
    user_id: uuid.UUID,
    job_id: uuid.UUID,
    *,
    after: int,
    wakeups: Wakeups,
    max_seconds: float,
) -> AsyncIterator[JobEventRecord]:
    """watch yields `user_id`'s job's events after sequence `after` until the job has ended.

    It ends after the event that put the job in a final state, or after `max_seconds` (the
    client resumes with the last sequence it saw). NotFound when the job is not the user's.
    """
    deadline = time.monotonic() + max_seconds
    with wakeups.subscription(job_id) as woken:
        while True:
            woken.clear()
            async with db.as_user(pool, user_id) as conn:
                state = await conn.fetchval("select state from public.indexing_jobs where id = $1", job_id)
                if state is None:
                    raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
                batch = await list_events(conn, job_id, after=after)
            for record in batch:
                after = record.sequence
                yield record
            if len(batch) == PAGE:
                continue
            # `state` was read in the same snapshot as the events: final means all are sent.
            if state in _FINAL or time.monotonic() >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                remaining = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(woken.wait(), min(wakeups.poll_interval, remaining))
