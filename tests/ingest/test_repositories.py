"""Repository RPCs over real gRPC against the session database: create, read, list, update, rotate,
sync, delete, tenant isolation, and secrets that never leave.

Two in-process ingest servers share the database: `local` accepts file:// URLs (as tests and the
dev stack do), `strict` does not, so the SSRF policy is checked as production runs it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from kotadb.v1 import ingest_pb2, job_pb2, repository_pb2

from services.common import db
from services.ingest import queue
from services.ingest.repositories import secret_context
from services.ingest.secretbox import SecretBox, generate_key_spec
from tests.conftest import UserFactory
from tests.ingest.conftest import IngestServer, start_ingest_server
from tests.runtime.rpc import status_details, unpack_details

SECRET_KEYS = generate_key_spec("test1")
TOKEN = "ghp_TopSecretAccessToken0123456789abcdef"


@pytest.fixture(scope="module")
async def local(database_url: str) -> AsyncIterator[IngestServer]:
    built, handle = await start_ingest_server(database_url, secret_keys=SECRET_KEYS, allow_local_urls=True)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(0)


@pytest.fixture(scope="module")
async def strict(database_url: str) -> AsyncIterator[IngestServer]:
    built, handle = await start_ingest_server(
        database_url, secret_keys=SECRET_KEYS, public_url="https://kota.example.com/"
    )
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(0)


async def _refused(call: Any, code: grpc.StatusCode, reason: str | None = None) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    details = unpack_details(status_details(caught.value))
    if reason is not None:
        assert details["ErrorInfo"].reason == reason, details
    return details


def _repo(name: str, url: str = "file:///srv/git/demo", **fields: Any) -> repository_pb2.Repository:
    return repository_pb2.Repository(full_name=name, url=url, **fields)


async def _create(
    server: IngestServer, user: uuid.UUID, name: str | None = None, **fields: Any
) -> ingest_pb2.CreateRepositoryResponse:
    request_fields = {k: fields.pop(k) for k in ("access_token", "request_id", "sync") if k in fields}
    return await server.stub().CreateRepository(
        ingest_pb2.CreateRepositoryRequest(
            repository=_repo(name if name is not None else f"org/r-{uuid.uuid4().hex[:8]}", **fields),
            **request_fields,
        ),
        metadata=server.caller(user),
    )


async def test_create_returns_the_secret_once_and_stores_both_secrets_sealed(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await _create(
        local,
        user,
        "octo/hello",
        url="file:///srv/git/hello",
        access_token=TOKEN,
        default_branch="main",
        include_globs=["src/**"],
        exclude_globs=["**/*.min.js"],
        max_file_bytes=65536,
        provider=repository_pb2.Repository.GITHUB,
    )
    repo = created.repository
    assert len(created.webhook_secret) >= 43
    assert (repo.full_name, repo.url, repo.default_branch) == ("octo/hello", "file:///srv/git/hello", "main")
    assert repo.provider == repository_pb2.Repository.GITHUB
    assert repo.state == repository_pb2.Repository.PENDING
    assert repo.has_access_token
    assert list(repo.include_globs) == ["src/**"] and list(repo.exclude_globs) == ["**/*.min.js"]
    assert repo.max_file_bytes == 65536
    assert repo.webhook_url == f"/v1/webhooks/github/{repo.id}"
    assert TOKEN not in str(created)
    row = await pool.fetchrow(
        "select webhook_secret_encrypted, access_token_encrypted from public.repositories where id = $1",
        uuid.UUID(repo.id),
    )
    assert row is not None
    sealed_secret, sealed_token = bytes(row[0]), bytes(row[1])
    assert created.webhook_secret.encode() not in sealed_secret and TOKEN.encode() not in sealed_token
    box = SecretBox.parse(SECRET_KEYS)
    rid = uuid.UUID(repo.id)
    assert (
        box.decrypt(sealed_secret, context=secret_context(rid, "webhook_secret")).decode()
        == created.webhook_secret
    )
    assert box.decrypt(sealed_token, context=secret_context(rid, "access_token")).decode() == TOKEN
    # Reads never return either secret.
    got = await local.stub().GetRepository(
        ingest_pb2.GetRepositoryRequest(id=repo.id), metadata=local.caller(user)
    )
    assert got.has_access_token and TOKEN not in str(got) and created.webhook_secret not in str(got)


async def test_create_derives_name_and_provider_and_retries_by_request_id(
    local: IngestServer, user_factory: UserFactory
) -> None:
    user = await user_factory()
    first = await _create(local, user, "", url="file:///srv/git/derived.git", request_id="req-1")
    assert first.repository.full_name == "srv/git/derived"
    assert first.repository.provider == repository_pb2.Repository.GIT
    assert first.repository.default_branch == ""  # the remote's default, resolved by the first sync
    again = await _create(local, user, "", url="file:///srv/git/derived.git", request_id="req-1")
    assert again.repository.id == first.repository.id
    assert again.webhook_secret == ""  # shown once
    await _refused(
        _create(local, user, "srv/git/derived", url="file:///srv/git/derived.git"),
        grpc.StatusCode.ALREADY_EXISTS,
        "REPOSITORY_EXISTS",
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/o/r.git", "URL_HOST_FORBIDDEN"),
        ("https://169.254.169.254/latest/meta-data", "URL_HOST_FORBIDDEN"),
        ("ssh://git@[::1]/o/r.git", "URL_HOST_FORBIDDEN"),
        ("https://localhost/o/r.git", "URL_HOST_FORBIDDEN"),
        ("file:///srv/git/demo", "URL_SCHEME"),
        ("/srv/git/demo", "URL_SCHEME"),
        ("https://x-access-token:ghp_leak@github.com/o/r.git", "URL_CREDENTIALS"),
    ],
)
async def test_strict_server_refuses_local_and_internal_urls(
    strict: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory, url: str, reason: str
) -> None:
    user = await user_factory()
    details = await _refused(
        _create(strict, user, url=url), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    violations = details["BadRequest"].field_violations
    assert [(v.field, v.reason) for v in violations] == [("repository.url", reason)]
    assert "ghp_leak" not in str(details)
    assert await pool.fetchval("select count(*) from public.repositories where user_id = $1", user) == 0


async def test_invalid_fields_are_answered_together(local: IngestServer, user_factory: UserFactory) -> None:
    user = await user_factory()
    details = await _refused(
        _create(
            local,
            user,
            "org/bad",
            default_branch="feature..x",
            include_globs=[""],
            max_file_bytes=1 << 40,
            access_token="has space " + TOKEN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {v.field for v in details["BadRequest"].field_violations}
    assert fields == {
        "repository.default_branch",
        "repository.include_globs[0]",
        "repository.max_file_bytes",
        "access_token",
    }
    assert TOKEN not in str(details)


async def test_public_url_prefixes_the_webhook_url(strict: IngestServer, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await strict.stub().CreateRepository(
        ingest_pb2.CreateRepositoryRequest(repository=_repo("o/r", url="https://140.82.112.3/o/r.git")),
        metadata=strict.caller(user),
    )
    assert (
        created.repository.webhook_url
        == f"https://kota.example.com/v1/webhooks/github/{created.repository.id}"
    )


async def test_list_pages_by_name(local: IngestServer, user_factory: UserFactory) -> None:
    user = await user_factory()
    for name in ("c/three", "a/one", "b/two"):
        await _create(local, user, name)
    stub, caller = local.stub(), local.caller(user, ("read",))
    first = await stub.ListRepositories(ingest_pb2.ListRepositoriesRequest(page_size=2), metadata=caller)
    assert [r.full_name for r in first.repositories] == ["a/one", "b/two"]
    second = await stub.ListRepositories(
        ingest_pb2.ListRepositoriesRequest(page_size=2, page_token=first.next_page_token), metadata=caller
    )
    assert [r.full_name for r in second.repositories] == ["c/three"] and second.next_page_token == ""
    await _refused(
        stub.ListRepositories(ingest_pb2.ListRepositoriesRequest(page_token="garbage!"), metadata=caller),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_update_with_a_field_mask_forgets_the_synced_commit(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    repo = (await _create(local, user, default_branch="main", include_globs=["src/**"])).repository
    await pool.execute(
        "update public.repositories set last_synced_commit = $2 where id = $1", uuid.UUID(repo.id), "a" * 40
    )
    stub, caller = local.stub(), local.caller(user)
    updated = await stub.UpdateRepository(
        ingest_pb2.UpdateRepositoryRequest(
            repository=repository_pb2.Repository(
                id=repo.id, default_branch="develop", include_globs=["lib/**"]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["default_branch"]),
        ),
        metadata=caller,
    )
    # Only the masked field changed; the next sync is a full one.
    assert updated.default_branch == "develop" and list(updated.include_globs) == ["src/**"]
    assert updated.last_synced_commit == ""
    unchanged_mask = await stub.UpdateRepository(
        ingest_pb2.UpdateRepositoryRequest(
            repository=repository_pb2.Repository(id=repo.id, max_file_bytes=1000)
        ),
        metadata=caller,
    )
    assert unchanged_mask.max_file_bytes == 1000 and unchanged_mask.default_branch == "develop"
    details = await _refused(
        stub.UpdateRepository(
            ingest_pb2.UpdateRepositoryRequest(
                repository=repository_pb2.Repository(id=repo.id, url="https://evil.example/x"),
                update_mask=field_mask_pb2.FieldMask(paths=["url"]),
            ),
            metadata=caller,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["BadRequest"].field_violations[0].field == "update_mask"


async def test_rotate_replaces_the_secret(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await _create(local, user)
    rotated = await local.stub().RotateWebhookSecret(
        ingest_pb2.RotateWebhookSecretRequest(id=created.repository.id), metadata=local.caller(user)
    )
    assert rotated.webhook_secret and rotated.webhook_secret != created.webhook_secret
    sealed = await pool.fetchval(
        "select webhook_secret_encrypted from public.repositories where id = $1",
        uuid.UUID(created.repository.id),
    )
    context = secret_context(uuid.UUID(created.repository.id), "webhook_secret")
    assert (
        SecretBox.parse(SECRET_KEYS).decrypt(bytes(sealed), context=context).decode()
        == rotated.webhook_secret
    )


async def test_sync_queues_and_folds_jobs(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await _create(local, user, sync=True)
    assert created.job.kind == job_pb2.Job.FULL_SYNC and created.job.state == job_pb2.Job.QUEUED
    stub, caller = local.stub(), local.caller(user)
    job = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=created.repository.id, commit_sha="b" * 40), metadata=caller
    )
    # One queued job per repository: the incremental request folds into the queued full sync.
    assert job.id == created.job.id and job.kind == job_pb2.Job.FULL_SYNC
    assert job.repository_id == created.repository.id
    await _refused(
        stub.SyncRepository(
            ingest_pb2.SyncRepositoryRequest(id=created.repository.id, commit_sha="HEAD"), metadata=caller
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (
        await pool.fetchval(
            "select count(*) from public.indexing_jobs where repository_id = $1",
            uuid.UUID(created.repository.id),
        )
        == 1
    )


async def test_delete_tombstones_documents_and_removes_jobs(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await _create(local, user, sync=True)
    rid = uuid.UUID(created.repository.id)
    doc_ids = [
        await pool.fetchval(
            "insert into public.documents (user_id, repository_id, path, content) values ($1, $2, $3, 'x')"
            " returning id",
            user,
            rid,
            f"src/f{i}.py",
        )
        for i in range(3)
    ]
    before = await pool.fetchval("select coalesce(max(revision), 0) from public.document_changes")
    await local.stub().DeleteRepository(
        ingest_pb2.DeleteRepositoryRequest(id=str(rid)), metadata=local.caller(user)
    )
    tombstones = await pool.fetch(
        "select document_id from public.document_changes"
        " where revision > $1 and op = 'delete' and repository_id = $2",
        before,
        rid,
    )
    assert sorted(r[0] for r in tombstones) == sorted(doc_ids)
    for table, column in (
        ("repositories", "id"),
        ("documents", "repository_id"),
        ("indexing_jobs", "repository_id"),
    ):
        assert await pool.fetchval(f"select count(*) from public.{table} where {column} = $1", rid) == 0
    await _refused(
        local.stub().GetRepository(ingest_pb2.GetRepositoryRequest(id=str(rid)), metadata=local.caller(user)),
        grpc.StatusCode.NOT_FOUND,
        "REPOSITORY_NOT_FOUND",
    )


async def test_tenants_cannot_touch_each_others_repositories(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    theirs = (await _create(local, alice, "alice/private")).repository
    stub, as_bob = local.stub(), local.caller(bob)
    calls = {
        "get": stub.GetRepository(ingest_pb2.GetRepositoryRequest(id=theirs.id), metadata=as_bob),
        "update": stub.UpdateRepository(
            ingest_pb2.UpdateRepositoryRequest(
                repository=repository_pb2.Repository(id=theirs.id, default_branch="x")
            ),
            metadata=as_bob,
        ),
        "rotate": stub.RotateWebhookSecret(
            ingest_pb2.RotateWebhookSecretRequest(id=theirs.id), metadata=as_bob
        ),
        "delete": stub.DeleteRepository(ingest_pb2.DeleteRepositoryRequest(id=theirs.id), metadata=as_bob),
        "sync": stub.SyncRepository(ingest_pb2.SyncRepositoryRequest(id=theirs.id), metadata=as_bob),
    }
    for name, call in calls.items():
        details = await _refused(call, grpc.StatusCode.NOT_FOUND, "REPOSITORY_NOT_FOUND")
        assert "alice" not in str(details), name
    listed = await stub.ListRepositories(ingest_pb2.ListRepositoriesRequest(), metadata=as_bob)
    assert list(listed.repositories) == []
    row = await pool.fetchrow(
        "select state, default_branch from public.repositories where id = $1", uuid.UUID(theirs.id)
    )
    assert row is not None and tuple(row) == ("pending", "")
    assert (
        await pool.fetchval(
            "select count(*) from public.indexing_jobs where repository_id = $1", uuid.UUID(theirs.id)
        )
        == 0
    )


async def test_permissions(local: IngestServer, user_factory: UserFactory) -> None:
    user = await user_factory()
    repo = (await _create(local, user)).repository
    reader = local.caller(user, ("read",))
    stub = local.stub()
    assert (
        await stub.GetRepository(ingest_pb2.GetRepositoryRequest(id=repo.id), metadata=reader)
    ).id == repo.id
    await _refused(
        stub.CreateRepository(ingest_pb2.CreateRepositoryRequest(repository=_repo("o/x")), metadata=reader),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await _refused(
        stub.DeleteRepository(ingest_pb2.DeleteRepositoryRequest(id=repo.id), metadata=reader),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_secrets_never_reach_logs_or_errors(
    local: IngestServer, user_factory: UserFactory, caplog: pytest.LogCaptureFixture
) -> None:
    user = await user_factory()
    caplog.set_level(logging.DEBUG)
    created = await _create(local, user, access_token=TOKEN)
    await _refused(
        _create(local, user, created.repository.full_name, access_token=TOKEN), grpc.StatusCode.ALREADY_EXISTS
    )
    await _refused(
        _create(local, user, url="https://u:" + TOKEN + "@github.com/o/r"), grpc.StatusCode.INVALID_ARGUMENT
    )
    rotated = await local.stub().RotateWebhookSecret(
        ingest_pb2.RotateWebhookSecretRequest(id=created.repository.id), metadata=local.caller(user)
    )
    for secret in (TOKEN, created.webhook_secret, rotated.webhook_secret, SECRET_KEYS.split(":", 1)[1]):
        assert secret not in caplog.text


async def test_deleting_a_repository_takes_the_running_job_from_its_worker(
    local: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await _create(local, user, sync=True)
    job_id = uuid.UUID(created.job.id)
    # A worker holds the job (as queue.claim leaves it).
    await pool.execute(
        "update public.indexing_jobs set state = 'running', locked_by = 'worker-x',"
        " locked_until = now() + interval '1 minute', attempt = 1 where id = $1",
        job_id,
    )
    async with db.as_service(pool) as conn:
        assert (await queue.fence(conn, job_id, "worker-x", lease=60)).held
    await local.stub().DeleteRepository(
        ingest_pb2.DeleteRepositoryRequest(id=created.repository.id), metadata=local.caller(user)
    )
    # The worker's next checkpoint finds the job gone and rolls its batch back.
    with pytest.raises(queue.LeaseLost):
        async with db.as_service(pool) as conn:
            await queue.fence(conn, job_id, "worker-x", lease=60)


async def test_a_retried_create_with_sync_returns_the_same_repository_and_job(
    local: IngestServer, user_factory: UserFactory
) -> None:
    user = await user_factory()
    request_id = "r" * 128  # the longest id: the job's derived id must still fit
    first = await _create(local, user, request_id=request_id, sync=True)
    again = await _create(local, user, request_id=request_id, sync=True)
    assert again.repository.id == first.repository.id and again.job.id == first.job.id
    assert first.webhook_secret and not again.webhook_secret
    await _refused(_create(local, user, request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT)
