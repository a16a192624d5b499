"""A real `kotadb serve ingest` keeps running while its workers run git under concurrent RPCs.

Issue 11 saw the ingest service die once with `segfault at 0 … in cygrpc` while a WatchJob
stream was open and a worker ran git, and suspected a fork. This stress test gives that window
every chance: two job workers sync two local repositories over and over (each sync runs several
git subprocesses and symbol extraction in the forkserver pool) while WatchJob streams follow
every job, a second stream on each job is dropped by the client midway, and other RPCs
(uploads, listings) run beside them, for a bounded time. The process must be the same process
at the end, alive and SERVING, with the jobs finished.

Before the fix it died within about 20 seconds, every run. The cause was not a fork (strace
showed only vfork from the service, for git and the forkserver): the access log read
`context.peer()` in a streaming handler's `finally` after the client had cancelled the stream,
when grpc.aio had already released the call (services/common/interceptors.py now reads the
peer when the call starts). PYTHONFAULTHANDLER puts every thread's stack in the log if it
ever crashes again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kotadb.v1 import document_pb2, ingest_pb2, ingest_pb2_grpc, job_pb2, repository_pb2

from services.common.identity import IdentityCodec
from services.common.supervisor import ChildProcess, Supervisor
from tests.callers import caller, signing_channel
from tests.conftest import UserFactory
from tests.harness import serve, service_env
from tests.ingest.jobhelpers import SECRET_KEYS, SourceRepo

IDENTITY_KEY = "fork-safety-identity-key-0123456789abcdef"
# How long the load runs: long enough for dozens of syncs (hundreds of git subprocesses) on a
# loaded 2-core machine, bounded so the test ends.
LOAD_SECONDS = 40.0
FINISHED = (job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED)


@dataclass(frozen=True)
class Ingest:
    """Ingest is the ingest child and its address."""

    address: str
    child: ChildProcess


@pytest.fixture(scope="module")
def ingest(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    workdir = tmp_path_factory.mktemp("fork-safety")
    env = service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_INGEST_WORKERS="2",
        KOTADB_INGEST_SYMBOL_WORKERS="2",
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_POLL_INTERVAL="0.05",
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
        KOTADB_INGEST_WORK_DIR=str(workdir / "work"),
        # A crash leaves every thread's Python stack in the log.
        PYTHONFAULTHANDLER="1",
    )
    with Supervisor(grace=20) as supervisor:
        address, child = serve(supervisor, workdir, "ingest", "ingest", env)
        yield Ingest(address, child)


def _source(path: Path, files: int) -> SourceRepo:
    repo = SourceRepo(path)
    for n in range(files):
        repo.write(f"pkg/mod_{n}.py", f"class Thing{n}:\n    def method_{n}(self):\n        return {n}\n")
    repo.commit("initial")
    return repo


async def test_ingest_survives_git_syncs_with_streams_open(
    ingest: Ingest, user_factory: UserFactory, tmp_path: Path
) -> None:
    user = await user_factory()
    metadata = caller(user)
    channel = signing_channel(ingest.address, IdentityCodec(IDENTITY_KEY))
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    pid = ingest.child.pid
    sources = [_source(tmp_path / f"src{n}", 40) for n in range(2)]
    repositories = []
    for n, source in enumerate(sources):
        created = await stub.CreateRepository(
            ingest_pb2.CreateRepositoryRequest(
                repository=repository_pb2.Repository(
                    full_name=f"org/fork-{n}-{uuid.uuid4().hex[:6]}", url=source.url, default_branch="main"
                ),
                sync=True,
            ),
            metadata=metadata,
            timeout=60,
        )
        repositories.append(created.repository.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    finished: dict[str, job_pb2.Job.State.ValueType] = {}
    watched = 0

    async def watch(job_id: str) -> None:
        nonlocal watched
        stream = stub.WatchJob(ingest_pb2.WatchJobRequest(id=job_id), metadata=metadata, timeout=120)
        async for event in stream:
            if event.state in FINISHED:
                finished[job_id] = event.state
        watched += 1

    async def sync(index: int) -> None:
        source, repository_id = sources[index], repositories[index]
        round_ = 0
        while loop.time() < deadline:
            round_ += 1
            source.write(f"pkg/mod_{round_ % 40}.py", f"def changed_{round_}():\n    return {round_}\n")
            source.write(f"new/round_{round_}.py", f"VALUE = {round_}\n")
            source.commit(f"round {round_}")
            job = await stub.SyncRepository(
                ingest_pb2.SyncRepositoryRequest(id=repository_id, full=round_ % 4 == 0),
                metadata=metadata,
                timeout=60,
            )
            # Two streams on every job: one to its end, one opened and dropped midway.
            follower = asyncio.ensure_future(watch(job.id))
            dropped = stub.WatchJob(ingest_pb2.WatchJobRequest(id=job.id), metadata=metadata, timeout=120)
            async for _ in dropped:
                break
            dropped.cancel()
            await follower

    async def chatter() -> None:
        n = 0
        while loop.time() < deadline:
            n += 1
            await stub.UpsertDocuments(
                ingest_pb2.UpsertDocumentsRequest(
                    documents=[
                        document_pb2.Document(
                            path=f"chatter/{n % 10}.py", text=f"def chatter_{n}():\n    pass\n"
                        )
                    ]
                ),
                metadata=metadata,
                timeout=60,
            )
            await stub.ListDocuments(
                ingest_pb2.ListDocumentsRequest(page_size=50), metadata=metadata, timeout=60
            )
            await stub.ListJobs(ingest_pb2.ListJobsRequest(page_size=20), metadata=metadata, timeout=60)

    try:
        await asyncio.gather(sync(0), sync(1), chatter(), chatter())
        async with grpc.aio.insecure_channel(ingest.address) as plain:
            health = await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
    finally:
        await channel.close(None)
    assert ingest.child.alive() and ingest.child.pid == pid, ingest.child.log_tail()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Every job followed reached its end, and syncs really ran (not a test that cannot fail).
    assert watched == len(finished) >= 6, (watched, finished)
    assert sum(state == job_pb2.Job.SUCCEEDED for state in finished.values()) >= 6, finished
    assert "Segmentation" not in ingest.child.log_tail(200)
