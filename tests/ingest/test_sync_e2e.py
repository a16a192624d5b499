"""End to end over gRPC: register a local repository, sync, watch; signed push webhooks re-index.

One in-process ingest server with one job worker (polling: no listen URL) and real git:
CreateRepository with `sync` → WatchJob to the end → documents and symbols present; a commit
that adds, modifies, renames and removes files, delivered as a signed GitHub push → only those
paths change; a force push → a full sync whose end state equals a fresh sync of the same head.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from kotadb.v1 import ingest_pb2, job_pb2, repository_pb2

from tests.ingest.conftest import IngestServer, start_ingest_server
from tests.ingest.jobhelpers import SECRET_KEYS, SourceRepo, clean_queue, live_documents


@pytest.fixture(scope="module")
async def server(
    database_url: str, pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[IngestServer]:
    """server is an ingest server with one job worker that may fetch file:// repositories."""
    await clean_queue(pool)
    built, handle = await start_ingest_server(
        database_url,
        workers=1,
        allow_local_urls=True,
        work_dir=str(tmp_path_factory.mktemp("e2e-work")),
        poll_interval=0.05,
        secret_keys=SECRET_KEYS,
    )
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(5)


async def _watch_to_end(server: IngestServer, user: uuid.UUID, job_id: str) -> list[job_pb2.JobEvent]:
    stream = server.stub().WatchJob(
        ingest_pb2.WatchJobRequest(id=job_id), metadata=server.caller(user), timeout=120
    )
    return [event async for event in stream]


async def _register(server: IngestServer, user: uuid.UUID, url: str) -> ingest_pb2.CreateRepositoryResponse:
    return await server.stub().CreateRepository(
        ingest_pb2.CreateRepositoryRequest(
            repository=repository_pb2.Repository(
                full_name=f"org/e2e-{uuid.uuid4().hex[:8]}", url=url, default_branch="main"
            ),
            sync=True,
        ),
        metadata=server.caller(user),
    )


async def _push(
    server: IngestServer, repository_id: str, secret: str, head: str
) -> ingest_pb2.ReceiveGithubWebhookResponse:
    body = json.dumps(
        {
            "ref": "refs/heads/main",
            "before": "0" * 40,
            "after": head,
            "created": False,
            "deleted": False,
            "commits": [],
            "repository": {"full_name": "org/e2e", "default_branch": "main"},
        }
    ).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    request = ingest_pb2.ReceiveGithubWebhookRequest(repository_id=repository_id)
    request.body.content_type = "application/json"
    request.body.data = body
    metadata = (
        ("x-github-event", "push"),
        ("x-github-delivery", str(uuid.uuid4())),
        ("x-hub-signature-256", signature),
    )
    return await server.stub().ReceiveGithubWebhook(request, metadata=metadata, timeout=30)


async def test_register_sync_push_and_force_push(
    server: IngestServer, pool: asyncpg.Pool, user_factory, tmp_path: Path
) -> None:
    user = await user_factory()
    repo = SourceRepo(tmp_path / "src")
    repo.write("app/main.py", "def main():\n    return run()\n\n\ndef run():\n    return 0\n")
    repo.write("app/models.py", "class User:\n    name = ''\n")
    repo.write("lib/keep.go", "package lib\n\nfunc Keep() {}\n")
    repo.write("README.md", "# e2e\n")
    first = repo.commit("first")
    created = await _register(server, user, repo.url)
    repository_id = uuid.UUID(created.repository.id)
    assert created.job.id, "CreateRepository with sync queues a job"
    events = await _watch_to_end(server, user, created.job.id)
    assert events[-1].kind == "finished" and events[-1].state == job_pb2.Job.SUCCEEDED
    docs = await live_documents(pool, repository_id)
    assert set(docs) == {"app/main.py", "app/models.py", "lib/keep.go", "README.md"}
    symbols = {
        row["name"]
        for row in await pool.fetch(
            "select s.name from public.symbols s join public.documents d on d.id = s.document_id"
            " where d.repository_id = $1",
            repository_id,
        )
    }
    assert {"main", "run", "User", "Keep"} <= symbols

    # A push that adds, modifies, renames and removes files, delivered as a signed webhook.
    high_water = await pool.fetchval("select max(revision) from public.document_changes")
    repo.write("app/extra.py", "def extra():\n    pass\n")
    repo.write("README.md", "# e2e, edited\n")
    repo.git("mv", "app/models.py", "app/entities.py")
    repo.git("rm", "--quiet", "app/main.py")
    second = repo.commit("second")
    answer = await _push(server, created.repository.id, created.webhook_secret, second)
    assert answer.job.kind == job_pb2.Job.INCREMENTAL_SYNC
    events = await _watch_to_end(server, user, answer.job.id)
    assert events[-1].state == job_pb2.Job.SUCCEEDED
    assert any(e.kind == "diffing" and e.message.startswith(f"incremental from {first[:12]}") for e in events)
    after = await live_documents(pool, repository_id)
    assert after["lib/keep.go"] == docs["lib/keep.go"]
    changes = await pool.fetch(
        "select path, op from public.document_changes where repository_id = $1 and revision > $2",
        repository_id,
        high_water,
    )
    assert sorted((row["path"], row["op"]) for row in changes) == [
        ("README.md", "upsert"),
        ("app/entities.py", "upsert"),
        ("app/extra.py", "upsert"),
        ("app/main.py", "delete"),
        ("app/models.py", "delete"),
    ]
    delivery = await pool.fetchrow(
        "select status from public.webhook_deliveries where job_id = $1", uuid.UUID(answer.job.id)
    )
    assert delivery is not None and delivery["status"] == "processed"

    # A force push rewrites history: a full sync, equal to a fresh sync of the same head.
    repo.git("reset", "--quiet", "--hard", first)
    repo.write("lib/keep.go", "package lib\n\nfunc Keep() int { return 1 }\n")
    rewritten = repo.commit("rewritten")
    answer = await _push(server, created.repository.id, created.webhook_secret, rewritten)
    events = await _watch_to_end(server, user, answer.job.id)
    assert events[-1].state == job_pb2.Job.SUCCEEDED
    assert any(e.kind == "diffing" and e.message.startswith("full sync") for e in events)
    fresh = await _register(server, user, repo.url)
    assert (await _watch_to_end(server, user, fresh.job.id))[-1].state == job_pb2.Job.SUCCEEDED
    forced_docs = {p: h for p, (h, _) in (await live_documents(pool, repository_id)).items()}
    fresh_docs = {p: h for p, (h, _) in (await live_documents(pool, uuid.UUID(fresh.repository.id))).items()}
    assert (
        forced_docs
        == fresh_docs
        == {path: hashlib.sha256(content).hexdigest() for path, content in repo.tree().items()}
    )
    job = await server.stub().GetJob(ingest_pb2.GetJobRequest(id=answer.job.id), metadata=server.caller(user))
    assert job.commit_sha == rewritten
