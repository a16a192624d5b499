"""The indexing job queue: enqueue with coalescing, claim, lease, retry with backoff, cancel, prune.

`public.indexing_jobs` is the queue (its rules are in migration 20261207000300_ingest_jobs.sql).
A job means "bring repository X to its newest head", so:

* `enqueue` folds a new request into the repository's queued job when there is one (a burst of
  pushes becomes one job; the strongest kind wins: delete > full sync > incremental push).
* `claim` takes up to n jobs in one statement: a CTE picks queued jobs whose run time has come,
  by priority, run time and id, `FOR UPDATE SKIP LOCKED`, and the UPDATE leases exactly those.
  The CTE is what keeps the update from touching more rows than the LIMIT (the planner may
  otherwise re-evaluate the subquery). A queued job of a repository that still has a running job
  waits for it (one running job per repository, by a partial unique index). A running job whose
  lease expired is claimed again like a queued one; one that already used its attempts fails.
* A worker renews its lease by `heartbeat`; every write a worker makes for a job first checks
  the lease with `fence`, so a worker that lost its job (paused past its lease, then resumed)
  cannot write over the worker that took it over.
* `fail` retries with exponential backoff and jitter until `max_attempts`, then the job is
  `failed` with the error. `cancel` ends a queued job at once and asks a running one to stop;
  its worker sees that at its next checkpoint and calls `cancelled`.

Every function takes a connection inside a transaction: `db.as_service` for workers and for
enqueue (callers pass the tenant, which the composite foreign key ties to the repository), and
`db.as_user` where only reading (`get_job`, `list_jobs`). Job events are appended with
`services.ingest.events.append_event` in the same transaction as the change they describe.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from services.common.db import Connection
from services.common.errors import FailedPrecondition, KotaError, NotFound
from services.ingest import events

KINDS: tuple[str, ...] = ("sync", "webhook_push", "reindex", "delete")
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# Coalescing keeps the strongest of two kinds: a later index in this tuple wins.
_KIND_STRENGTH = "array['webhook_push', 'reindex', 'sync', 'delete']"

_COLUMNS = (
    "id, user_id, repository_id, kind, state, attempt, max_attempts, priority, run_after, locked_by,"
    " locked_until, params, progress, error, request_id, cancel_requested_at, started_at,"
    " finished_at, created_at, updated_at, skips, key_id, event_seq"
)


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """JobRecord is one row of public.indexing_jobs, with its JSON columns decoded."""

    id: uuid.UUID
    user_id: uuid.UUID
    repository_id: uuid.UUID | None
    kind: str
    state: str
    attempt: int
    max_attempts: int
    priority: int
    run_after: dt.datetime
    locked_by: str | None
    locked_until: dt.datetime | None
    params: Mapping[str, Any]
    progress: Mapping[str, Any]
    error: Mapping[str, Any] | None
    request_id: str | None
    cancel_requested_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    skips: Sequence[Mapping[str, Any]] = ()
    key_id: uuid.UUID | None = None
    event_seq: int = 0

    @property
    def final(self) -> bool:
        """final tells whether the job reached a state it never leaves."""
        return self.state in FINAL_STATES

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any]) -> JobRecord:
        """from_row decodes a row selected with this module's column list."""
        return cls(
            id=row["id"],
            user_id=row["user_id"],
            repository_id=row["repository_id"],
            kind=row["kind"],
            state=row["state"],
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            priority=row["priority"],
            run_after=row["run_after"],
            locked_by=row["locked_by"],
            locked_until=row["locked_until"],
            params=_json(row["params"]) or {},
            progress=_json(row["progress"]) or {},
            error=_json(row["error"]),
            request_id=row["request_id"],
            cancel_requested_at=row["cancel_requested_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            skips=tuple(_json(row["skips"]) or ()),
            key_id=row["key_id"],
            event_seq=row["event_seq"],
        )


@dataclasses.dataclass(frozen=True)
class Lease:
    """Lease is what a heartbeat learns: whether the worker still holds the job, and a cancel request."""

    held: bool
    cancel_requested: bool


@dataclasses.dataclass(frozen=True)
class QueueDepth:
    """QueueDepth is the queue's size for health: queued and running jobs, oldest queued age."""

    queued: int
    running: int
    oldest_queued_seconds: float

    def describe(self) -> str:
        """describe renders the depth for a health component message."""
        age = f"{self.oldest_queued_seconds:.1f}"
        return f"queued={self.queued} running={self.running} oldest_queued_age_s={age}"


class LeaseLost(KotaError):
    """LeaseLost says the worker no longer holds the job: its lease expired and another took it."""

    code = FailedPrecondition.code


def error_document(exc: BaseException) -> dict[str, Any]:
    """error_document is the JSON stored in `error` for an exception: code, reason and message.

    Only KotaError messages are kept verbatim (they are written for clients and never carry a
    secret); anything else is named by its class, so a stray message cannot leak into the job.
    """
    if isinstance(exc, KotaError):
        return {"code": exc.code.name, "reason": exc.reason, "message": str(exc)}
    return {"code": "INTERNAL", "reason": "INTERNAL", "message": f"internal error ({type(exc).__name__})"}


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """backoff_delay is the wait before retrying after failed `attempt` (1-based), in seconds.

    Exponential (`base * 2 ** (attempt - 1)`, at most `cap`) with "equal jitter": half of it
    fixed, half random, so retries of jobs that failed together spread out but never come at once.
    """
    ceiling = min(cap, base * (2.0 ** max(0, attempt - 1)))
    chooser = rng if rng is not None else random.SystemRandom()
    return ceiling / 2.0 + chooser.uniform(0.0, ceiling / 2.0)


async def enqueue(
    conn: Connection,
    *,
    user_id: uuid.UUID,
    repository_id: uuid.UUID | None,
    kind: str,
    params: Mapping[str, Any],
    request_id: str | None = None,
    priority: int = 0,
    key_id: uuid.UUID | None = None,
    max_attempts: int = 5,
) -> JobRecord:
    """enqueue queues a job for `repository_id`, or folds it into the repository's queued job.

    Later `params` keys overwrite earlier ones (a push's `commit_sha` is the newest head); the
    stronger kind wins; `folded` counts the requests folded in. A `request_id` already used by
    this user returns that job unchanged. `conn` runs as the service role; the composite foreign
    key makes a repository that is not `user_id`'s fail with FailedPrecondition.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    if request_id:
        row = await conn.fetchrow(
            f"select {_COLUMNS} from public.indexing_jobs where user_id = $1 and request_id = $2",
            user_id,
            request_id,
        )
        if row is not None:
            return JobRecord.from_row(row)
    row = await conn.fetchrow(
        f"""
        insert into public.indexing_jobs as j
               (user_id, repository_id, kind, params, request_id, priority, key_id, max_attempts)
        values ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)
        on conflict (repository_id, user_id) where state = 'queued' do update set
          kind = ({_KIND_STRENGTH})[greatest(array_position({_KIND_STRENGTH}, j.kind),
                                             array_position({_KIND_STRENGTH}, excluded.kind))],
          params = j.params || excluded.params
                   || jsonb_build_object('folded', coalesce((j.params->>'folded')::int, 0) + 1),
          priority = greatest(j.priority, excluded.priority),
          key_id = coalesce(j.key_id, excluded.key_id)
        returning {_COLUMNS}, (xmax <> 0) as folded
        """,
        user_id,
        repository_id,
        kind,
        json.dumps(dict(params)),
        request_id or None,
        priority,
        key_id,
        max_attempts,
    )
    assert row is not None
    job = JobRecord.from_row(row)
    if row["folded"]:
        await events.append_event(
            conn, job.id, "coalesced", "queued", f"a {kind} request folded into this job"
        )
    else:
        await events.append_event(conn, job.id, "queued", "queued", f"{kind} job queued")
    return job


async def claim(conn: Connection, worker_id: str, *, limit: int, lease: float) -> list[JobRecord]:
    """claim leases up to `limit` runnable jobs to `worker_id` for `lease` seconds and returns them.

    Runnable: queued with its run time come and no running job of the same repository, or
    running with an expired lease. Running jobs whose lease expired after their last attempt are
    failed first. Each claimed job gets a `claimed` event.
    """
    expired = await conn.fetch(
        f"""
        update public.indexing_jobs
           set state = 'failed', finished_at = now(), locked_by = null, locked_until = null,
               error = jsonb_build_object('code', 'ABORTED', 'reason', 'LEASE_EXPIRED',
                 'message', 'the worker stopped renewing its lease on the last attempt')
         where id in (select id from public.indexing_jobs
                       where state = 'running' and locked_until < now() and attempt >= max_attempts
                       for update skip locked)
        returning {_COLUMNS}
        """
    )
    for row in expired:
        await events.append_event(
            conn,
            row["id"],
            "failed",
            "failed",
            "lease expired on the last attempt",
            error=_json(row["error"]),
        )
    rows = await conn.fetch(
        f"""
        with candidates as (
          select j.id, j.state as previous_state, j.locked_by as previous_worker
            from public.indexing_jobs j
           where (j.state = 'queued' and j.run_after <= now()
                  and (j.repository_id is null or not exists (
                        select 1 from public.indexing_jobs r
                         where r.repository_id = j.repository_id and r.state = 'running')))
              or (j.state = 'running' and j.locked_until < now())
           order by j.priority desc, j.run_after, j.id
           limit $1
           for update of j skip locked
        )
        update public.indexing_jobs j
           set state = 'running', attempt = j.attempt + 1, locked_by = $2,
               locked_until = now() + make_interval(secs => $3), started_at = now()
          from candidates c
         where j.id = c.id
        returning {", ".join("j." + c.strip() for c in _COLUMNS.split(","))},
                  c.previous_state, c.previous_worker
        """,
        limit,
        worker_id,
        lease,
    )
    jobs = []
    for row in rows:
        job = JobRecord.from_row(row)
        if row["previous_state"] == "running":
            message = f"claimed again by {worker_id} (attempt {job.attempt}): the previous lease expired"
        else:
            message = f"claimed by {worker_id} (attempt {job.attempt} of {job.max_attempts})"
        await events.append_event(conn, job.id, "claimed", "running", message, progress=job.progress)
        jobs.append(job)
    return jobs


async def heartbeat(conn: Connection, job_id: uuid.UUID, worker_id: str, *, lease: float) -> Lease:
    """heartbeat renews `worker_id`'s lease on the job and reports whether a cancel was requested."""
    row = await conn.fetchrow(
        "update public.indexing_jobs set locked_until = now() + make_interval(secs => $3)"
        " where id = $1 and locked_by = $2 and state = 'running'"
        " returning cancel_requested_at is not null as cancel_requested",
        job_id,
        worker_id,
        lease,
    )
    if row is None:
        return Lease(held=False, cancel_requested=False)
    return Lease(held=True, cancel_requested=bool(row["cancel_requested"]))


async def fence(
    conn: Connection,
    job_id: uuid.UUID,
    worker_id: str,
    *,
    lease: float,
    progress: Mapping[str, Any] | None = None,
) -> Lease:
    """fence locks the job row for this transaction, renews the lease and stores `progress`.

    It raises LeaseLost when the worker no longer holds the job, so the writes that follow in
    the same transaction roll back with it.
    """
    row = await conn.fetchrow(
        "update public.indexing_jobs set locked_until = now() + make_interval(secs => $3),"
        " progress = coalesce($4::jsonb, progress)"
        " where id = $1 and locked_by = $2 and state = 'running'"
        " returning cancel_requested_at is not null as cancel_requested",
        job_id,
        worker_id,
        lease,
        json.dumps(dict(progress)) if progress is not None else None,
    )
    if row is None:
        raise LeaseLost(f"job {job_id} is no longer leased to this worker", reason="LEASE_LOST")
    return Lease(held=True, cancel_requested=bool(row["cancel_requested"]))


async def record_skips(
    conn: Connection, job_id: uuid.UUID, skips: Sequence[Mapping[str, Any]], *, cap: int
) -> None:
    """record_skips appends skipped-file records to the job, keeping at most `cap` in all."""
    if not skips:
        return
    await conn.execute(
        "update public.indexing_jobs set skips = (select coalesce(jsonb_agg(s), '[]'::jsonb) from ("
        "  select s from jsonb_array_elements(skips || $2::jsonb) with ordinality as e(s, n)"
        "  order by n limit $3) t)"
        " where id = $1",
        job_id,
        json.dumps([dict(s) for s in skips]),
        cap,
    )


async def succeed(
    conn: Connection, job: JobRecord, worker_id: str, *, progress: Mapping[str, Any], message: str
) -> JobRecord:
    """succeed marks the worker's job succeeded with its final progress (LeaseLost if not held)."""
    row = await conn.fetchrow(
        f"update public.indexing_jobs set state = 'succeeded', finished_at = now(), locked_by = null,"
        f" locked_until = null, error = null, progress = $3::jsonb"
        f" where id = $1 and locked_by = $2 and state = 'running' returning {_COLUMNS}",
        job.id,
        worker_id,
        json.dumps(dict(progress)),
    )
    if row is None:
        raise LeaseLost(f"job {job.id} is no longer leased to this worker", reason="LEASE_LOST")
    await events.append_event(conn, job.id, "finished", "succeeded", message, progress=progress)
    return JobRecord.from_row(row)


async def cancelled(conn: Connection, job: JobRecord, worker_id: str, *, progress: Mapping[str, Any]) -> None:
    """cancelled ends the worker's job as cancelled, acknowledging a CancelJob at a checkpoint."""
    status = await conn.execute(
        "update public.indexing_jobs set state = 'cancelled', finished_at = now(), locked_by = null,"
        " locked_until = null, progress = $3::jsonb"
        " where id = $1 and locked_by = $2 and state = 'running'",
        job.id,
        worker_id,
        json.dumps(dict(progress)),
    )
    if status != "UPDATE 0":
        await events.append_event(
            conn, job.id, "cancelled", "cancelled", "stopped at a checkpoint", progress=progress
        )


async def fail(
    conn: Connection,
    job: JobRecord,
    worker_id: str,
    exc: BaseException,
    *,
    retryable: bool,
    base: float,
    cap: float,
    progress: Mapping[str, Any] | None = None,
) -> JobRecord | None:
    """fail records a failed attempt: queued again after a backoff, or `failed` for good.

    A retry that finds a newer queued job of the same repository folds into that one instead
    (it brings the repository to the same newest head) and this job ends failed, pointing at it.
    Returns the updated job, or None when the worker had lost the lease (nothing is written).
    """
    error = error_document(exc)
    row = await conn.fetchrow(
        "select attempt, max_attempts from public.indexing_jobs"
        " where id = $1 and locked_by = $2 and state = 'running' for update",
        job.id,
        worker_id,
    )
    if row is None:
        return None
    progress_json = json.dumps(dict(progress if progress is not None else job.progress))
    if retryable and row["attempt"] < row["max_attempts"]:
        delay = backoff_delay(row["attempt"], base=base, cap=cap)
        try:
            async with conn.transaction():
                updated = await conn.fetchrow(
                    f"update public.indexing_jobs set state = 'queued', locked_by = null,"
                    f" locked_until = null, error = $2::jsonb, progress = $4::jsonb,"
                    f" run_after = now() + make_interval(secs => $3)"
                    f" where id = $1 returning {_COLUMNS}",
                    job.id,
                    json.dumps(error),
                    delay,
                    progress_json,
                )
        except asyncpg.UniqueViolationError:
            newer = await conn.fetchval(
                f"update public.indexing_jobs j set kind = ({_KIND_STRENGTH})[greatest("
                f"array_position({_KIND_STRENGTH}, j.kind), array_position({_KIND_STRENGTH}, $2))]"
                " where repository_id = $1 and state = 'queued' returning id",
                job.repository_id,
                job.kind,
            )
            error = {**error, "message": f"{error['message']} (the retry folded into job {newer})"}
        else:
            assert updated is not None
            await events.append_event(
                conn,
                job.id,
                "retrying",
                "queued",
                f"attempt {row['attempt']} failed; retrying in {delay:.1f}s",
                error=error,
                progress=progress,
            )
            return JobRecord.from_row(updated)
    final = await conn.fetchrow(
        f"update public.indexing_jobs set state = 'failed', finished_at = now(), locked_by = null,"
        f" locked_until = null, error = $2::jsonb, progress = $3::jsonb where id = $1 returning {_COLUMNS}",
        job.id,
        json.dumps(error),
        progress_json,
    )
    assert final is not None
    await events.append_event(
        conn, job.id, "failed", "failed", error["message"], error=error, progress=progress
    )
    return JobRecord.from_row(final)


async def cancel(conn: Connection, job_id: uuid.UUID, *, user_id: uuid.UUID) -> JobRecord:
    """cancel ends `user_id`'s queued job at once or asks its running job to stop; final jobs stay.

    NotFound when the job is not the user's. Cancelling twice is harmless.
    """
    row = await conn.fetchrow(
        f"select {_COLUMNS} from public.indexing_jobs where id = $1 and user_id = $2 for update",
        job_id,
        user_id,
    )
    if row is None:
        raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
    job = JobRecord.from_row(row)
    if job.state == "queued":
        row = await conn.fetchrow(
            f"update public.indexing_jobs set state = 'cancelled', finished_at = now(),"
            f" cancel_requested_at = coalesce(cancel_requested_at, now()) where id = $1 returning {_COLUMNS}",
            job_id,
        )
        await events.append_event(conn, job_id, "cancelled", "cancelled", "cancelled before it ran")
    elif job.state == "running" and job.cancel_requested_at is None:
        row = await conn.fetchrow(
            f"update public.indexing_jobs set cancel_requested_at = now() where id = $1 returning {_COLUMNS}",
            job_id,
        )
        await events.append_event(
            conn,
            job_id,
            "cancel_requested",
            "running",
            "cancel requested; the worker stops at its next checkpoint",
        )
    assert row is not None
    return JobRecord.from_row(row)


async def get_job(conn: Connection, job_id: uuid.UUID) -> JobRecord:
    """get_job returns a job visible on `conn` (under RLS: the caller's), or raises NotFound."""
    row = await conn.fetchrow(f"select {_COLUMNS} from public.indexing_jobs where id = $1", job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
    return JobRecord.from_row(row)


async def list_jobs(
    conn: Connection,
    *,
    limit: int,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
    repository_id: uuid.UUID | None = None,
    states: Sequence[str] = (),
) -> list[JobRecord]:
    """list_jobs returns jobs visible on `conn`, newest first, strictly after the `after` cursor."""
    rows = await conn.fetch(
        f"""
        select {_COLUMNS} from public.indexing_jobs
         where ($2::uuid is null or repository_id = $2)
           and (cardinality($3::text[]) = 0 or state = any($3::text[]))
           and ($4::timestamptz is null or (created_at, id) < ($4, $5::uuid))
         order by created_at desc, id desc
         limit $1
        """,
        limit,
        repository_id,
        list(states),
        after[0] if after else None,
        after[1] if after else None,
    )
    return [JobRecord.from_row(row) for row in rows]


async def prune(conn: Connection, *, retention: float, limit: int = 1000) -> tuple[int, int]:
    """prune deletes finished jobs (their events cascade) and webhook deliveries older than `retention`.

    At most `limit` of each per call, so one call never holds locks for long. Returns the counts.
    """
    jobs = await conn.fetchval(
        "with gone as (delete from public.indexing_jobs where id in ("
        "  select id from public.indexing_jobs"
        "   where state in ('succeeded', 'failed', 'cancelled')"
        "     and finished_at < now() - make_interval(secs => $1)"
        "   limit $2 for update skip locked) returning 1) select count(*) from gone",
        retention,
        limit,
    )
    deliveries = await conn.fetchval(
        "with gone as (delete from public.webhook_deliveries where id in ("
        "  select id from public.webhook_deliveries where received_at < now() - make_interval(secs => $1)"
        "   limit $2 for update skip locked) returning 1) select count(*) from gone",
        retention,
        limit,
    )
    return int(jobs), int(deliveries)


async def queue_depth(conn: Connection) -> QueueDepth:
    """queue_depth counts queued and running jobs and the age of the oldest runnable queued job."""
    row = await conn.fetchrow(
        "select count(*) filter (where state = 'queued') as queued,"
        " count(*) filter (where state = 'running') as running,"
        " coalesce(extract(epoch from now() - min(run_after) filter (where state = 'queued'"
        "   and run_after <= now())), 0)::float8 as oldest"
        " from public.indexing_jobs where state in ('queued', 'running')"
    )
    assert row is not None
    return QueueDepth(int(row["queued"]), int(row["running"]), max(0.0, float(row["oldest"])))


def _json(value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    return json.loads(value)
