"""The job queue against real PostgreSQL: coalescing, claiming, leases, retries, cancel, events, prune."""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid

import asyncpg
import pytest

from services.common import db
from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.ingest import events, queue


async def make_repository(
    pool: asyncpg.Pool, user_id: uuid.UUID, url: str = "https://example.test/r"
) -> uuid.UUID:
    """make_repository inserts a repository row for `user_id` (as superuser) and returns its id."""
    repository_id: uuid.UUID = await pool.fetchval(
        "insert into public.repositories (user_id, full_name, url) values ($1, $2, $3) returning id",
        user_id,
        f"org/repo-{secrets.token_hex(4)}",
        url,
    )
    return repository_id


async def _enqueue(
    pool: asyncpg.Pool, user_id: uuid.UUID, repository_id: uuid.UUID, kind: str, **params: object
) -> queue.JobRecord:
    async with db.as_service(pool) as conn:
        return await queue.enqueue(
            conn, user_id=user_id, repository_id=repository_id, kind=kind, params=params
        )


async def _claim(
    pool: asyncpg.Pool, worker: str, *, limit: int = 10, lease: float = 30.0
) -> list[queue.JobRecord]:
    async with db.as_service(pool) as conn:
        return await queue.claim(conn, worker, limit=limit, lease=lease)


async def _events(pool: asyncpg.Pool, job_id: uuid.UUID) -> list[events.JobEventRecord]:
    async with db.as_service(pool) as conn:
        return await events.list_events(conn, job_id, after=0)


@pytest.fixture
async def clean_queue(pool: asyncpg.Pool) -> None:
    """clean_queue leaves no runnable job of earlier tests, so claims see only this test's jobs."""
    await pool.execute(
        "update public.indexing_jobs set state = 'cancelled', finished_at = now()"
        " where state in ('queued', 'running')"
    )


async def test_a_burst_of_pushes_folds_into_one_queued_job(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    jobs = [await _enqueue(pool, user, repo, "webhook_push", commit_sha=f"{i:040x}") for i in range(20)]
    assert {job.id for job in jobs} == {jobs[0].id}
    last = jobs[-1]
    assert last.kind == "webhook_push"
    assert last.params["commit_sha"] == f"{19:040x}"
    assert last.params["folded"] == 19
    # A full sync folds in as the stronger kind; a later push does not weaken it.
    assert (await _enqueue(pool, user, repo, "sync")).kind == "sync"
    assert (await _enqueue(pool, user, repo, "webhook_push")).kind == "sync"
    kinds = [e.kind for e in await _events(pool, last.id)]
    assert kinds[0] == "queued" and kinds.count("coalesced") == 21
    assert (
        await pool.fetchval("select count(*) from public.indexing_jobs where repository_id = $1", repo) == 1
    )


async def test_request_id_returns_the_first_job(pool: asyncpg.Pool, user_factory, clean_queue) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    async with db.as_service(pool) as conn:
        first = await queue.enqueue(
            conn, user_id=user, repository_id=repo, kind="sync", params={}, request_id="r-1"
        )
    async with db.as_service(pool) as conn:
        again = await queue.enqueue(
            conn, user_id=user, repository_id=repo, kind="delete", params={}, request_id="r-1"
        )
    assert again.id == first.id and again.kind == "sync"


async def test_enqueue_for_another_users_repository_is_refused(pool: asyncpg.Pool, user_factory) -> None:
    owner, stranger = await user_factory(), await user_factory()
    repo = await make_repository(pool, owner)
    with pytest.raises(FailedPrecondition):
        await _enqueue(pool, stranger, repo, "sync")
    assert (
        await pool.fetchval("select count(*) from public.indexing_jobs where repository_id = $1", repo) == 0
    )


async def test_one_running_and_one_queued_job_per_repository(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    first = await _enqueue(pool, user, repo, "sync")
    [claimed] = await _claim(pool, "w1")
    assert claimed.id == first.id and claimed.state == "running" and claimed.attempt == 1
    second = await _enqueue(pool, user, repo, "webhook_push")
    assert second.id != first.id and second.state == "queued"
    # The queued job waits while its repository has a running job.
    assert await _claim(pool, "w2") == []
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("update public.indexing_jobs set state = 'running' where id = $1", second.id)
    async with db.as_service(pool) as conn:
        await queue.succeed(conn, claimed, "w1", progress={}, message="done")
    [next_job] = await _claim(pool, "w2")
    assert next_job.id == second.id


async def test_claim_takes_at_most_limit_in_priority_order(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repos = [await make_repository(pool, user) for _ in range(5)]
    jobs = []
    for index, repo in enumerate(repos):
        async with db.as_service(pool) as conn:
            jobs.append(
                await queue.enqueue(
                    conn, user_id=user, repository_id=repo, kind="sync", params={}, priority=index % 2
                )
            )
    first = await _claim(pool, "w", limit=2)
    assert len(first) == 2
    assert {job.priority for job in first} == {1}
    rest = await _claim(pool, "w", limit=10)
    assert len(rest) == 3
    assert {j.id for j in first + rest} == {j.id for j in jobs}


async def test_concurrent_claims_never_share_a_job(pool: asyncpg.Pool, user_factory, clean_queue) -> None:
    user = await user_factory()
    for _ in range(20):
        await _enqueue(pool, user, await make_repository(pool, user), "sync")
    batches = await asyncio.gather(*(_claim(pool, f"w{i}", limit=3) for i in range(6)))
    ids = [job.id for batch in batches for job in batch]
    assert len(ids) == len(set(ids))
    assert all(len(batch) <= 3 for batch in batches)
    ids += [job.id for job in await _claim(pool, "late", limit=50)]
    assert len(ids) == len(set(ids)) == 20


async def test_an_expired_lease_is_claimed_again_and_fences_the_old_worker(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    await _enqueue(pool, user, repo, "sync")
    [job] = await _claim(pool, "old", lease=30.0)
    async with db.as_service(pool) as conn:
        assert (await queue.heartbeat(conn, job.id, "old", lease=30.0)).held
    assert await _claim(pool, "new") == []
    # The worker stopped renewing: its lease runs out (moved back rather than waited for).
    await pool.execute(
        "update public.indexing_jobs set locked_until = now() - interval '1 second' where id = $1", job.id
    )
    [again] = await _claim(pool, "new")
    assert again.id == job.id and again.attempt == 2 and again.locked_by == "new"
    async with db.as_service(pool) as conn:
        assert not (await queue.heartbeat(conn, job.id, "old", lease=30.0)).held
    with pytest.raises(queue.LeaseLost):
        async with db.as_service(pool) as conn:
            await queue.fence(conn, job.id, "old", lease=30.0, progress={"files_processed": 99})
    assert (await _events(pool, job.id))[-1].message.startswith("claimed again by new")


async def test_a_lease_expiring_on_the_last_attempt_fails_the_job(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    job = await _enqueue(pool, user, repo, "sync")
    await pool.execute("update public.indexing_jobs set max_attempts = 1 where id = $1", job.id)
    await _claim(pool, "w")
    await pool.execute(
        "update public.indexing_jobs set locked_until = now() - interval '1 second' where id = $1", job.id
    )
    assert await _claim(pool, "w2") == []
    row = await pool.fetchrow("select state, error from public.indexing_jobs where id = $1", job.id)
    assert row is not None and row["state"] == "failed" and "LEASE_EXPIRED" in row["error"]


async def test_failures_retry_with_backoff_then_fail_with_the_error(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    job = await _enqueue(pool, user, repo, "sync")
    await pool.execute("update public.indexing_jobs set max_attempts = 3 where id = $1", job.id)
    error = Unavailable("the remote hung up", reason="GIT_FETCH_FAILED")
    for attempt in (1, 2):
        [claimed] = await _claim(pool, "w")
        assert claimed.attempt == attempt
        async with db.as_service(pool) as conn:
            retried = await queue.fail(conn, claimed, "w", error, retryable=True, base=60.0, cap=600.0)
        assert retried is not None and retried.state == "queued"
        wait = (retried.run_after - retried.updated_at).total_seconds()
        assert 30.0 * 2 ** (attempt - 1) <= wait <= 60.0 * 2 ** (attempt - 1) + 1
        assert await _claim(pool, "w") == []  # not before its run time
        await pool.execute("update public.indexing_jobs set run_after = now() where id = $1", job.id)
    [claimed] = await _claim(pool, "w")
    async with db.as_service(pool) as conn:
        final = await queue.fail(conn, claimed, "w", error, retryable=True, base=60.0, cap=600.0)
    assert final is not None and final.state == "failed" and final.finished_at is not None
    assert final.error == {
        "code": "UNAVAILABLE",
        "reason": "GIT_FETCH_FAILED",
        "message": "the remote hung up",
    }
    kinds = [e.kind for e in await _events(pool, job.id)]
    assert kinds == ["queued", "claimed", "retrying", "claimed", "retrying", "claimed", "failed"]


async def test_a_retry_folds_into_a_newer_queued_job(pool: asyncpg.Pool, user_factory, clean_queue) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    await _enqueue(pool, user, repo, "sync")
    [running] = await _claim(pool, "w")
    newer = await _enqueue(pool, user, repo, "webhook_push")
    async with db.as_service(pool) as conn:
        final = await queue.fail(conn, running, "w", RuntimeError("boom"), retryable=True, base=1.0, cap=1.0)
    assert final is not None and final.state == "failed"
    assert str(newer.id) in final.error["message"]  # type: ignore[index]
    assert await pool.fetchval("select kind from public.indexing_jobs where id = $1", newer.id) == "sync"


async def test_unexpected_errors_are_stored_without_their_message(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    job = await _enqueue(pool, user, await make_repository(pool, user), "sync")
    [claimed] = await _claim(pool, "w")
    async with db.as_service(pool) as conn:
        final = await queue.fail(
            conn, claimed, "w", RuntimeError("token=s3cret"), retryable=False, base=1, cap=1
        )
    assert final is not None and final.state == "failed"
    assert "s3cret" not in str(final.error) and final.error == {
        "code": "INTERNAL",
        "reason": "INTERNAL",
        "message": "internal error (RuntimeError)",
    }
    assert job.id == final.id


async def test_cancel_queued_and_running_jobs(pool: asyncpg.Pool, user_factory, clean_queue) -> None:
    user, stranger = await user_factory(), await user_factory()
    repo = await make_repository(pool, user)
    queued = await _enqueue(pool, user, repo, "sync")
    with pytest.raises(NotFound):
        async with db.as_service(pool) as conn:
            await queue.cancel(conn, queued.id, user_id=stranger)
    async with db.as_service(pool) as conn:
        assert (await queue.cancel(conn, queued.id, user_id=user)).state == "cancelled"
    await _enqueue(pool, user, repo, "sync")
    [running] = await _claim(pool, "w")
    async with db.as_service(pool) as conn:
        requested = await queue.cancel(conn, running.id, user_id=user)
    assert requested.state == "running" and requested.cancel_requested_at is not None
    async with db.as_service(pool) as conn:
        lease = await queue.heartbeat(conn, running.id, "w", lease=30.0)
        assert lease.held and lease.cancel_requested
        await queue.cancelled(conn, running, "w", progress={"files_processed": 3})
    async with db.as_service(pool) as conn:
        done = await queue.cancel(conn, running.id, user_id=user)  # cancelling a final job changes nothing
    assert done.state == "cancelled"
    assert [e.kind for e in await _events(pool, running.id)][-2:] == ["cancel_requested", "cancelled"]


async def test_prune_removes_only_old_finished_jobs_with_their_events(
    pool: asyncpg.Pool, user_factory, clean_queue
) -> None:
    user = await user_factory()
    repo = await make_repository(pool, user)
    old = await _enqueue(pool, user, repo, "sync")
    [claimed] = await _claim(pool, "w")
    async with db.as_service(pool) as conn:
        await queue.succeed(conn, claimed, "w", progress={}, message="ok")
    recent = await _enqueue(pool, user, repo, "sync")
    await pool.execute(
        "update public.indexing_jobs set finished_at = now() - interval '2 days' where id = $1", old.id
    )
    old_delivery = await pool.fetchval(
        "insert into public.webhook_deliveries (repository_id, user_id, delivery_id, event, signature_valid,"
        " received_at) values ($1, $2, 'old', 'push', true, now() - interval '2 days') returning id",
        repo,
        user,
    )
    new_delivery = await pool.fetchval(
        "insert into public.webhook_deliveries (repository_id, user_id, delivery_id, event, signature_valid)"
        " values ($1, $2, 'new', 'push', true) returning id",
        repo,
        user,
    )
    async with db.as_service(pool) as conn:
        pruned, deliveries = await queue.prune(conn, retention=24 * 3600.0)
    assert pruned >= 1 and deliveries >= 1
    remaining = await pool.fetch(
        "select id from public.webhook_deliveries where id = any($1::uuid[])", [old_delivery, new_delivery]
    )
    assert [row["id"] for row in remaining] == [new_delivery]
    assert await pool.fetchval("select count(*) from public.indexing_jobs where id = $1", old.id) == 0
    assert (
        await pool.fetchval("select count(*) from public.indexing_job_events where job_id = $1", old.id) == 0
    )
    assert await pool.fetchval("select state from public.indexing_jobs where id = $1", recent.id) == "queued"


async def test_queue_depth_counts_queued_and_running(pool: asyncpg.Pool, user_factory, clean_queue) -> None:
    user = await user_factory()
    for _ in range(3):
        await _enqueue(pool, user, await make_repository(pool, user), "sync")
    await pool.execute(
        "update public.indexing_jobs set run_after = now() - interval '90 seconds' where state = 'queued'"
    )
    await _claim(pool, "w", limit=1)
    async with db.as_service(pool) as conn:
        depth = await queue.queue_depth(conn)
    assert (depth.queued, depth.running) == (2, 1)
    assert depth.oldest_queued_seconds >= 90.0
    assert "queued=2 running=1" in depth.describe()


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(100.0, 2.0 * 2 ** (attempt - 1))
        delays = [queue.backoff_delay(attempt, base=2.0, cap=100.0, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
async def test_watch_streams_events_live_until_the_job_ends(
    pool: asyncpg.Pool, database_url: str, user_factory, clean_queue, listen: bool
) -> None:
    user, stranger = await user_factory(), await user_factory()
    repo = await make_repository(pool, user)
    job = await _enqueue(pool, user, repo, "sync")
    wakeups = events.Wakeups(database_url if listen else "", poll_interval=0.2 if not listen else 30.0)
    wakeups.start()
    try:
        if listen:
            assert await wakeups.wait_listening(10.0)
        with pytest.raises(NotFound):
            async for _ in events.watch(pool, stranger, job.id, after=0, wakeups=wakeups, max_seconds=5):
                pass
        seen: list[events.JobEventRecord] = []

        async def consume() -> None:
            async for record in events.watch(pool, user, job.id, after=0, wakeups=wakeups, max_seconds=60):
                seen.append(record)

        watcher = asyncio.create_task(consume())
        [claimed] = await _claim(pool, "w")
        for done in range(3):
            async with db.as_service(pool) as conn:
                await queue.fence(conn, claimed.id, "w", lease=30.0, progress={"files_processed": done})
                await events.append_event(
                    conn,
                    claimed.id,
                    "progress",
                    "running",
                    f"{done} files",
                    progress={"files_processed": done},
                )
        async with db.as_service(pool) as conn:
            await queue.succeed(conn, claimed, "w", progress={"files_processed": 3}, message="done")
        await asyncio.wait_for(watcher, 20.0)
        assert [r.sequence for r in seen] == list(range(1, 7))
        assert [r.kind for r in seen] == ["queued", "claimed", "progress", "progress", "progress", "finished"]
        assert seen[-1].final and seen[-1].data["progress"] == {"files_processed": 3}
        # Resuming after a sequence sends only what follows it, then ends (the job is over).
        resumed = [
            r.sequence
            async for r in events.watch(pool, user, job.id, after=4, wakeups=wakeups, max_seconds=5)
        ]
        assert resumed == [5, 6]
    finally:
        await wakeups.close()
