"""The job RPCs over gRPC against an in-process ingest server with one worker and real git.

SyncRepository → WatchJob to the end (events live, from after_sequence) → GetJob/ListJobs;
CancelJob; another tenant sees none of it; health reports the queue's depth. The module's
server polls (no listen URL); one test runs a second server that LISTENs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import asyncpg
import grpc
import pytest
from kotadb.v1 import health_pb2, health_pb2_grpc, ingest_pb2, job_pb2

from tests.ingest.conftest import IngestServer, start_ingest_server
from tests.ingest.jobhelpers import SECRET_KEYS, SourceRepo, clean_queue, make_repository
from tests.runtime.rpc import status_details, unpack_details


def _server_settings(work_dir: Path, **extra: object) -> dict[str, object]:
    return {
        "workers": 1,
        "allow_local_urls": True,
        "work_dir": str(work_dir),
        "poll_interval": 0.05,
        "secret_keys": SECRET_KEYS,
        "sync_max_file_bytes": 4096,
        **extra,
    }


@pytest.fixture(scope="module")
async def jobs_server(
    database_url: str, pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[IngestServer]:
    """jobs_server is an ingest server with one job worker, polling for jobs and events."""
    await clean_queue(pool)
    built, handle = await start_ingest_server(
        database_url, **_server_settings(tmp_path_factory.mktemp("jobs-rpc-work"))
    )
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(5)


def _repo(tmp_path: Path) -> SourceRepo:
    repo = SourceRepo(tmp_path / "src")
    repo.write("main.py", "def main():\n    return 0\n")
    repo.write("lib/util.py", "def helper(x):\n    return x * 2\n")
    repo.write("data.bin", b"\x00\x01\x02")
    repo.commit("first")
    return repo


async def _watch(
    server: IngestServer, user: uuid.UUID, job_id: str, after: int = 0
) -> list[job_pb2.JobEvent]:
    stream = server.stub().WatchJob(
        ingest_pb2.WatchJobRequest(id=job_id, after_sequence=after), metadata=server.caller(user), timeout=120
    )
    return [event async for event in stream]


async def test_sync_watch_get_and_list_a_job(
    jobs_server: IngestServer, pool: asyncpg.Pool, user_factory, tmp_path: Path
) -> None:
    user = await user_factory()
    repo = _repo(tmp_path)
    repository_id = await make_repository(pool, user, repo.url)
    stub = jobs_server.stub()
    job = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=str(repository_id), full=True, request_id="sync-1"),
        metadata=jobs_server.caller(user),
    )
    assert job.kind == job_pb2.Job.FULL_SYNC and job.repository_id == str(repository_id)
    events = await _watch(jobs_server, user, job.id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "queued" and events[-1].kind == "finished"
    assert events[-1].state == job_pb2.Job.SUCCEEDED
    assert {"claimed", "fetching", "diffing", "progress"} <= {e.kind for e in events}
    assert events[-1].progress.files_indexed == 2 and events[-1].progress.files_skipped == 1
    # Resuming after a sequence streams only what followed it.
    tail = await _watch(jobs_server, user, job.id, after=len(events) - 2)
    assert [e.sequence for e in tail] == [len(events) - 1, len(events)]
    done = await stub.GetJob(ingest_pb2.GetJobRequest(id=job.id), metadata=jobs_server.caller(user))
    assert done.state == job_pb2.Job.SUCCEEDED and done.attempt == 1 and done.commit_sha == repo.head()
    assert [(s.path, s.reason) for s in done.skipped_files] == [("data.bin", "binary")]
    assert done.progress.skipped_by_reason["binary"] == 1
    assert done.HasField("end_time") and not done.HasField("error")
    # The same request id answers the same job.
    again = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=str(repository_id), full=True, request_id="sync-1"),
        metadata=jobs_server.caller(user),
    )
    assert again.id == job.id
    second = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=str(repository_id)), metadata=jobs_server.caller(user)
    )
    assert second.kind == job_pb2.Job.INCREMENTAL_SYNC
    await _watch(jobs_server, user, second.id)
    page = await stub.ListJobs(
        ingest_pb2.ListJobsRequest(repository_id=str(repository_id), page_size=1),
        metadata=jobs_server.caller(user),
    )
    assert [j.id for j in page.jobs] == [second.id] and page.next_page_token
    rest = await stub.ListJobs(
        ingest_pb2.ListJobsRequest(
            repository_id=str(repository_id), page_size=1, page_token=page.next_page_token
        ),
        metadata=jobs_server.caller(user),
    )
    assert [j.id for j in rest.jobs] == [job.id] and not rest.next_page_token
    succeeded = await stub.ListJobs(
        ingest_pb2.ListJobsRequest(states=[job_pb2.Job.SUCCEEDED]), metadata=jobs_server.caller(user)
    )
    assert {j.id for j in succeeded.jobs} == {job.id, second.id}


async def test_cancel_a_queued_job(jobs_server: IngestServer, pool: asyncpg.Pool, user_factory) -> None:
    user = await user_factory()
    # A repository whose jobs wait: its last one is still leased to a worker that went quiet.
    repository_id = await make_repository(pool, user, "https://example.test/never")
    await pool.execute(
        "insert into public.indexing_jobs (user_id, repository_id, kind, state, locked_by, locked_until)"
        " values ($1, $2, 'sync', 'running', 'elsewhere', now() + interval '1 hour')",
        user,
        repository_id,
    )
    stub = jobs_server.stub()
    job = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=str(repository_id)), metadata=jobs_server.caller(user)
    )
    assert job.state == job_pb2.Job.QUEUED
    cancelled = await stub.CancelJob(
        ingest_pb2.CancelJobRequest(id=job.id), metadata=jobs_server.caller(user)
    )
    assert cancelled.state == job_pb2.Job.CANCELLED
    events = await _watch(jobs_server, user, job.id)
    assert [e.kind for e in events] == ["queued", "cancelled"]
    await pool.execute(
        "update public.indexing_jobs set state = 'cancelled' where repository_id = $1", repository_id
    )


async def test_another_tenant_sees_nothing(
    jobs_server: IngestServer, pool: asyncpg.Pool, user_factory, tmp_path: Path
) -> None:
    owner, stranger = await user_factory(), await user_factory()
    repository_id = await make_repository(pool, owner, _repo(tmp_path).url)
    stub = jobs_server.stub()
    job = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=str(repository_id)), metadata=jobs_server.caller(owner)
    )
    await _watch(jobs_server, owner, job.id)
    as_stranger = jobs_server.caller(stranger)
    calls: list[Awaitable[object]] = [
        stub.GetJob(ingest_pb2.GetJobRequest(id=job.id), metadata=as_stranger),
        stub.CancelJob(ingest_pb2.CancelJobRequest(id=job.id), metadata=as_stranger),
        stub.SyncRepository(ingest_pb2.SyncRepositoryRequest(id=str(repository_id)), metadata=as_stranger),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _watch(jobs_server, stranger, job.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListJobs(ingest_pb2.ListJobsRequest(), metadata=as_stranger)
    assert listed.jobs == []
    assert (
        await pool.fetchval(
            "select count(*) from public.indexing_jobs where repository_id = $1", repository_id
        )
        == 1
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ingest_pb2.SyncRepositoryRequest(id="not-a-uuid"), "id"),
        (ingest_pb2.SyncRepositoryRequest(id=str(uuid.uuid4()), commit_sha="HEAD~1"), "commit_sha"),
    ],
)
async def test_bad_sync_requests_are_refused(
    jobs_server: IngestServer, user_factory, request_: ingest_pb2.SyncRepositoryRequest, field: str
) -> None:
    user = await user_factory()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs_server.stub().SyncRepository(request_, metadata=jobs_server.caller(user))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = unpack_details(status_details(caught.value))
    assert [v.field for v in details["BadRequest"].field_violations] == [field]


async def test_health_reports_the_queue_depth(jobs_server: IngestServer) -> None:
    channel = grpc.aio.insecure_channel(jobs_server.address)
    try:
        health = await health_pb2_grpc.HealthServiceStub(channel).GetHealth(health_pb2.GetHealthRequest())
    finally:
        await channel.close(None)
    [queue_part] = [c for c in health.components if c.name == "queue"]
    assert queue_part.status == health_pb2.GetHealthResponse.SERVING
    assert queue_part.message.startswith("queued=") and "oldest_queued_age_s=" in queue_part.message


async def test_watch_with_listen_notify(
    database_url: str, pool: asyncpg.Pool, user_factory, tmp_path: Path
) -> None:
    await clean_queue(pool)
    # Polls far apart: the stream keeps up only if notifications wake it.
    built, server = await start_ingest_server(
        database_url,
        **_server_settings(tmp_path / "work", listen_database_url=database_url, poll_interval=30.0),
    )
    try:
        user = await user_factory()
        repository_id = await make_repository(pool, user, _repo(tmp_path).url)
        job = await server.stub().SyncRepository(
            ingest_pb2.SyncRepositoryRequest(id=str(repository_id)), metadata=server.caller(user)
        )
        events = await _watch(server, user, job.id)
        assert events[-1].kind == "finished" and events[-1].state == job_pb2.Job.SUCCEEDED
    finally:
        for channel in server.channels:
            await channel.close(None)
        await built.stop(5)
