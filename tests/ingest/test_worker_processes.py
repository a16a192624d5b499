"""`kotadb serve ingest-worker` processes against one database: exclusive claims and lease rescue.

Workers run as real child processes in polling mode (no listen URL). Two of them share twenty
jobs: every job runs exactly once. A worker killed with SIGKILL in the middle of a sync leaves
its job leased; once the lease runs out another worker claims it again and finishes it, with
every document written exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import asyncpg

from services.common.supervisor import Supervisor
from tests.harness import service_env, spawn_service, wait_healthy
from tests.ingest.jobhelpers import (
    SECRET_KEYS,
    SourceRepo,
    clean_queue,
    enqueue,
    event_kinds,
    live_documents,
    make_repository,
    wait_job,
)

IDENTITY_KEY = "ingest-worker-process-tests-identity-key-0123"


def _worker_env(database_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    return service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_WORK_DIR=str(workdir / "checkouts"),
        KOTADB_INGEST_POLL_INTERVAL="0.1",
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        KOTADB_INGEST_RETRY_BASE="0.2",
        **extra,
    )


async def test_two_worker_processes_run_each_of_twenty_jobs_once(
    pool: asyncpg.Pool, database_url: str, user_factory, tmp_path: Path
) -> None:
    await clean_queue(pool)
    user = await user_factory()
    repositories: dict[uuid.UUID, SourceRepo] = {}
    for index in range(20):
        repo = SourceRepo(tmp_path / f"repo{index}")
        repo.write("main.py", f"def main_{index}():\n    return {index}\n")
        repo.write(f"pkg/mod{index}.py", "X = 1\n")
        repo.commit("only commit")
        repositories[await make_repository(pool, user, repo.url)] = repo
    env = _worker_env(database_url, tmp_path, KOTADB_INGEST_WORKERS="2")
    with Supervisor(grace=20) as supervisor:
        for name in ("worker-a", "worker-b"):
            address, _ = spawn_service(supervisor, tmp_path, name, "ingest-worker", env)
            wait_healthy(address, supervisor)
        jobs = [await enqueue(pool, user, repository_id, "sync") for repository_id in repositories]
        finished = [await wait_job(pool, job.id) for job in jobs]
    assert [job.state for job in finished] == ["succeeded"] * 20
    assert [job.attempt for job in finished] == [1] * 20
    for job in finished:
        assert (await event_kinds(pool, job.id)).count("claimed") == 1
        assert job.repository_id is not None
        assert set(await live_documents(pool, job.repository_id)) == set(
            repositories[job.repository_id].tree()
        )
    claimers = {
        row["message"].split(" ")[2]
        for row in await pool.fetch(
            "select message from public.indexing_job_events"
            " where kind = 'claimed' and job_id = any($1::uuid[])",
            [job.id for job in finished],
        )
    }
    assert 1 <= len(claimers) <= 2


async def test_a_killed_worker_s_job_is_claimed_again_after_its_lease(
    pool: asyncpg.Pool, database_url: str, user_factory, tmp_path: Path
) -> None:
    await clean_queue(pool)
    user = await user_factory()
    repo = SourceRepo(tmp_path / "big")
    for index in range(120):
        repo.write(f"src/m{index:03}.py", f"def f{index}():\n    return {index}\n")
    repo.commit("many files")
    repository_id = await make_repository(pool, user, repo.url)
    env = _worker_env(database_url, tmp_path, KOTADB_INGEST_JOB_LEASE="3", KOTADB_INGEST_SYNC_BATCH_FILES="1")
    with Supervisor(grace=20) as supervisor:
        children = []
        for name in ("worker-a", "worker-b"):
            address, child = spawn_service(supervisor, tmp_path, name, "ingest-worker", env)
            wait_healthy(address, supervisor)
            children.append(child)
        job = await enqueue(pool, user, repository_id, "sync")
        for _ in range(6000):
            if "progress" in await event_kinds(pool, job.id):
                break
            await _sleep()
        # Whichever worker claimed the job dies; the other one must rescue it.
        holder = await pool.fetchval("select locked_by from public.indexing_jobs where id = $1", job.id)
        assert holder is not None
        [doomed] = [child for child in children if f":{child.pid}:" in holder]
        os.killpg(doomed.pid, signal.SIGKILL)
        written_before = await pool.fetchval(
            "select count(*) from public.documents where repository_id = $1", repository_id
        )
        assert 0 < written_before < 120
        done = await wait_job(pool, job.id)
    assert done.state == "succeeded" and done.attempt == 2
    messages = [
        row["message"]
        for row in await pool.fetch(
            "select message from public.indexing_job_events"
            " where job_id = $1 and kind = 'claimed' order by seq",
            job.id,
        )
    ]
    assert len(messages) == 2 and "previous lease expired" in messages[1]
    docs = await live_documents(pool, repository_id)
    assert set(docs) == set(repo.tree())
    rows = await pool.fetchval(
        "select count(*) from public.documents where repository_id = $1", repository_id
    )
    assert rows == len(docs) == 120


async def _sleep() -> None:
    await asyncio.sleep(0.02)
