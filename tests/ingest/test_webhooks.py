"""GitHub webhook deliveries through the real Envoy gateway to a real ingest server.

The webhook route is the one route without ext_authz (deploy/envoy/envoy.yaml.tmpl): these
requests carry no API key, only GitHub's headers and the HMAC signature, exactly as GitHub sends
them. The ingest server runs in this process (so its metrics registry and logs can be read);
Envoy is a child process; auth and search point at ports nobody listens on, which the webhook
route never needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from kotadb.v1 import ingest_pb2, repository_pb2

from services.common.metrics import REGISTRY
from services.common.supervisor import Supervisor
from services.ingest.documents import DocumentWriter
from services.ingest.secretbox import generate_key_spec
from tests.conftest import UserFactory
from tests.harness import Envoy, free_port, start_envoy
from tests.ingest.conftest import IngestServer, start_ingest_server
from tests.ingest.jobhelpers import (
    SourceRepo,
    clean_queue,
    live_documents,
    running_worker,
    wait_job,
    worker_settings,
)

SECRET_KEYS = generate_key_spec("hooks1")
HEAD = "1" * 40


@pytest.fixture(scope="module")
async def hook_server(database_url: str) -> AsyncIterator[IngestServer]:
    built, handle = await start_ingest_server(database_url, secret_keys=SECRET_KEYS, allow_local_urls=True)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(0)


@pytest.fixture(scope="module")
def gateway(hook_server: IngestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    workdir = tmp_path_factory.mktemp("webhooks")
    nobody = f"127.0.0.1:{free_port()}"
    with Supervisor(grace=10) as supervisor:
        yield start_envoy(
            supervisor, workdir, "envoy", auth=nobody, ingest=hook_server.address, search=nobody
        )


@dataclass(frozen=True)
class Repo:
    """Repo is a registered repository and the webhook secret its creation returned."""

    id: str
    secret: str
    user: uuid.UUID


async def _register(server: IngestServer, user: uuid.UUID, branch: str = "main") -> Repo:
    created = await server.stub().CreateRepository(
        ingest_pb2.CreateRepositoryRequest(
            repository=repository_pb2.Repository(
                full_name=f"org/hooked-{uuid.uuid4().hex[:8]}",
                url="file:///srv/git/hooked",
                default_branch=branch,
            )
        ),
        metadata=server.caller(user),
    )
    return Repo(created.repository.id, created.webhook_secret, user)


def _sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _early_reply(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """_early_reply sends only the headers (with the body's length) and reads the answer.

    The gateway refuses a declared-oversize body from its headers alone and closes the
    connection; a client still uploading would see a reset instead of the 413.
    """
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=30)
    try:
        connection.putrequest("POST", parsed.path)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _post_sync(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return error.code, {"raw": raw.decode("utf-8", "replace")}


async def deliver(
    gateway: Envoy,
    repository_id: str,
    payload: dict[str, Any] | bytes,
    *,
    event: str = "push",
    secret: str | None = None,
    delivery: str | None = None,
    signature: str | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    """deliver POSTs one webhook through the gateway as GitHub does; returns (HTTP status, JSON)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "User-Agent": "GitHub-Hookshot/test",
    }
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    elif secret is not None:
        headers["X-Hub-Signature-256"] = _sign(secret, body)
    url = f"{gateway.url}/v1/webhooks/github/{repository_id}"
    return await asyncio.to_thread(_post_sync, url, body, headers)


def push(ref: str = "refs/heads/main", after: str = HEAD, **extra: Any) -> dict[str, Any]:
    """push is a minimal push event payload."""
    return {
        "ref": ref,
        "before": "0" * 39 + "1",
        "after": after,
        "created": False,
        "deleted": False,
        "commits": [],
        "repository": {"full_name": "org/hooked", "default_branch": "main"},
        **extra,
    }


async def _deliveries(pool: asyncpg.Pool, repository_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select delivery_id, event, status, job_id, ignored_reason, error from public.webhook_deliveries"
        " where repository_id = $1 order by received_at",
        uuid.UUID(repository_id),
    )


async def _jobs(pool: asyncpg.Pool, repository_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select id, kind, state, params from public.indexing_jobs where repository_id = $1",
        uuid.UUID(repository_id),
    )


def _refusals() -> float:
    value = REGISTRY.get_sample_value(
        "kotadb_refusals_total", {"service": "ingest", "reason": "WEBHOOK_SIGNATURE"}
    )
    return value or 0.0


async def test_ping_is_answered_and_recorded(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    status, answer = await deliver(
        gateway,
        repo.id,
        {"zen": "Keep it logically awesome."},
        event="ping",
        secret=repo.secret,
        delivery="ping-1",
    )
    assert status == 200, answer
    assert (answer["deliveryId"], answer["event"], answer["duplicate"]) == ("ping-1", "ping", False)
    rows = await _deliveries(pool, repo.id)
    assert [(r["delivery_id"], r["status"], r["job_id"]) for r in rows] == [("ping-1", "processed", None)]


async def test_missing_and_wrong_signatures_are_refused_and_store_nothing(
    gateway: Envoy,
    hook_server: IngestServer,
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    repo = await _register(hook_server, await user_factory())
    body = json.dumps(push(marker="body-marker-7f3a")).encode()
    refusals = _refusals()
    missing = await deliver(gateway, repo.id, body)
    wrong = await deliver(gateway, repo.id, body, signature=_sign("not-the-secret", body))
    tampered = await deliver(gateway, repo.id, body + b" ", signature=_sign(repo.secret, body))
    garbage = await deliver(gateway, repo.id, body, signature="sha256=zz")
    for status, answer in (missing, wrong, tampered, garbage):
        assert status == 401, answer
    assert _refusals() == refusals + 4
    assert await _deliveries(pool, repo.id) == []
    assert await _jobs(pool, repo.id) == []
    assert "body-marker-7f3a" not in caplog.text and _sign("not-the-secret", body) not in caplog.text
    assert repo.secret not in caplog.text
    assert "webhook delivery refused" in caplog.text


async def test_unknown_repository_is_not_found(gateway: Envoy, pool: asyncpg.Pool) -> None:
    before = await pool.fetchval("select count(*) from public.webhook_deliveries")
    for repository_id in (str(uuid.uuid4()), "not-a-uuid"):
        status, answer = await deliver(gateway, repository_id, push(), secret="whatever")
        assert status == 404, answer
    assert await pool.fetchval("select count(*) from public.webhook_deliveries") == before


async def test_push_to_the_tracked_branch_queues_one_incremental_job_and_replays_are_duplicates(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    status, first = await deliver(gateway, repo.id, push(), secret=repo.secret, delivery="d-1")
    assert status == 200, first
    assert first["duplicate"] is False and first["ignoredReason"] == ""
    assert first["job"]["kind"] == "INCREMENTAL_SYNC" and first["job"]["state"] == "QUEUED"
    jobs = await _jobs(pool, repo.id)
    assert len(jobs) == 1 and str(jobs[0]["id"]) == first["job"]["id"]
    params = json.loads(jobs[0]["params"])
    assert (params["commit_sha"], params["ref"], params["delivery_id"]) == (HEAD, "refs/heads/main", "d-1")
    # GitHub's redelivery keeps the delivery id: acknowledged, nothing new queued or stored.
    status, again = await deliver(gateway, repo.id, push(), secret=repo.secret, delivery="d-1")
    assert status == 200 and again["duplicate"] is True and again["job"]["id"] == first["job"]["id"]
    assert len(await _jobs(pool, repo.id)) == 1
    rows = await _deliveries(pool, repo.id)
    assert [(r["delivery_id"], r["status"], str(r["job_id"])) for r in rows] == [
        ("d-1", "queued", first["job"]["id"])
    ]
    # A second push folds into the queued job, with the newer head.
    newer = "2" * 40
    status, second = await deliver(gateway, repo.id, push(after=newer), secret=repo.secret, delivery="d-2")
    assert status == 200 and second["job"]["id"] == first["job"]["id"]
    assert json.loads((await _jobs(pool, repo.id))[0]["params"])["commit_sha"] == newer
    # The deliveries follow their job's state.
    job_id = uuid.UUID(first["job"]["id"])
    await pool.execute("update public.indexing_jobs set state = 'running' where id = $1", job_id)
    assert {r["status"] for r in await _deliveries(pool, repo.id)} == {"processing"}
    await pool.execute(
        "update public.indexing_jobs set state = 'failed', error = $2::jsonb where id = $1",
        job_id,
        json.dumps({"reason": "GIT_FETCH_FAILED", "message": "fetch failed"}),
    )
    rows = await _deliveries(pool, repo.id)
    assert {r["status"] for r in rows} == {"failed"}
    assert json.loads(rows[0]["error"])["reason"] == "GIT_FETCH_FAILED"


async def test_other_branches_tags_and_events_are_ignored_with_a_reason(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    cases = [
        ("push", push(ref="refs/heads/feature"), "feature"),
        ("push", push(ref="refs/tags/v1.0.0"), "tag v1.0.0"),
        ("issues", {"action": "opened"}, "event issues"),
    ]
    for event, payload, expected in cases:
        status, answer = await deliver(gateway, repo.id, payload, event=event, secret=repo.secret)
        assert status == 200, answer
        assert expected in answer["ignoredReason"], answer
        assert not answer.get("job"), answer
    rows = await _deliveries(pool, repo.id)
    assert [r["status"] for r in rows] == ["processed"] * 3
    assert all(r["ignored_reason"] for r in rows)
    assert await _jobs(pool, repo.id) == []


async def test_deleting_the_tracked_branch_marks_the_repository(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    status, answer = await deliver(gateway, repo.id, push(after="0" * 40, deleted=True), secret=repo.secret)
    assert status == 200 and "deleted" in answer["ignoredReason"], answer
    assert await _jobs(pool, repo.id) == []
    got = await hook_server.stub().GetRepository(
        ingest_pb2.GetRepositoryRequest(id=repo.id), metadata=hook_server.caller(repo.user)
    )
    assert got.state == repository_pb2.Repository.ERROR
    assert "main" in got.error.message


async def test_a_form_encoded_push_is_accepted(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    body = urllib.parse.urlencode({"payload": json.dumps(push())}).encode()
    status, answer = await deliver(
        gateway, repo.id, body, secret=repo.secret, content_type="application/x-www-form-urlencoded"
    )
    assert status == 200 and answer["job"]["kind"] == "INCREMENTAL_SYNC", answer


async def test_another_tenants_secret_cannot_sign_and_rotation_retires_the_old_secret(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    alice = await _register(hook_server, await user_factory())
    bob = await _register(hook_server, await user_factory())
    status, _ = await deliver(gateway, alice.id, push(), secret=bob.secret)
    assert status == 401
    assert await _deliveries(pool, alice.id) == []
    rotated = await hook_server.stub().RotateWebhookSecret(
        ingest_pb2.RotateWebhookSecretRequest(id=alice.id), metadata=hook_server.caller(alice.user)
    )
    status, _ = await deliver(gateway, alice.id, push(), secret=alice.secret)
    assert status == 401
    status, answer = await deliver(gateway, alice.id, push(), secret=rotated.webhook_secret)
    assert status == 200 and answer["job"]["kind"] == "INCREMENTAL_SYNC", answer


async def test_invalid_payload_is_recorded_as_failed(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    status, answer = await deliver(gateway, repo.id, b"{not json", secret=repo.secret, delivery="bad-1")
    assert status == 400, answer
    rows = await _deliveries(pool, repo.id)
    assert [(r["delivery_id"], r["status"]) for r in rows] == [("bad-1", "failed")]
    assert json.loads(rows[0]["error"])["reason"] == "PAYLOAD_INVALID"


async def test_a_delivery_stuck_on_the_database_is_answered_unavailable_before_its_deadline(
    database_url: str, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    built, server = await start_ingest_server(
        database_url, secret_keys=SECRET_KEYS, allow_local_urls=True, webhook_deadline=0.5
    )
    try:
        repo = await _register(server, await user_factory())
        body = json.dumps(push()).encode()
        metadata = (
            ("x-github-event", "push"),
            ("x-github-delivery", "stuck-1"),
            ("x-hub-signature-256", _sign(repo.secret, body)),
        )
        request = ingest_pb2.ReceiveGithubWebhookRequest(repository_id=repo.id)
        request.body.content_type = "application/json"
        request.body.data = body
        async with pool.acquire() as holder, holder.transaction():
            # The delivery's foreign-key check waits for this row lock until the deadline passes.
            await holder.execute(
                "select 1 from public.repositories where id = $1 for update", uuid.UUID(repo.id)
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.stub().ReceiveGithubWebhook(request, metadata=metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _deliveries(pool, repo.id) == []
        # Once the database answers again, GitHub's redelivery goes through.
        answer = await server.stub().ReceiveGithubWebhook(request, metadata=metadata, timeout=30)
        assert answer.delivery_id == "stuck-1" and answer.job.id
    finally:
        for channel in server.channels:
            await channel.close(None)
        await built.stop(0)


async def test_bodies_over_25_mib_are_refused_by_the_gateway(
    gateway: Envoy, hook_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    repo = await _register(hook_server, await user_factory())
    limit = 25 * 1024 * 1024
    # A push payload padded to exactly the limit still goes through.
    padded = json.dumps(push(padding="")).encode()
    at_limit = json.dumps(push(padding="x" * (limit - len(padded)))).encode()
    assert len(at_limit) == limit
    status, answer = await deliver(gateway, repo.id, at_limit, secret=repo.secret, delivery="big-ok")
    assert status == 200 and answer["job"]["kind"] == "INCREMENTAL_SYNC", answer
    over = at_limit[:-1] + b" }"
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "too-big",
        "X-Hub-Signature-256": _sign(repo.secret, over),
    }
    url = f"{gateway.url}/v1/webhooks/github/{repo.id}"
    status, answer = await asyncio.to_thread(_early_reply, url, over, headers)
    assert status == 413, answer
    assert [r["delivery_id"] for r in await _deliveries(pool, repo.id)] == ["big-ok"]


async def test_a_signed_push_reindexes_only_what_changed_and_the_delivery_follows_its_job(
    gateway: Envoy,
    hook_server: IngestServer,
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    document_writer: DocumentWriter,
    database_url: str,
    tmp_path: Path,
) -> None:
    await clean_queue(pool)
    source = SourceRepo(tmp_path / "source")
    source.write("keep.py", "def keep():\n    return 1\n")
    source.write("edit.py", "def before():\n    return 1\n")
    source.write("gone.py", "def gone():\n    return 1\n")
    source.commit("first")
    user = await user_factory()
    created = await hook_server.stub().CreateRepository(
        ingest_pb2.CreateRepositoryRequest(
            repository=repository_pb2.Repository(full_name="org/e2e", url=source.url, default_branch="main"),
            sync=True,
        ),
        metadata=hook_server.caller(user),
    )
    rid = uuid.UUID(created.repository.id)
    settings = worker_settings(database_url, tmp_path / "work", secret_keys=SECRET_KEYS)
    async with running_worker(pool, settings, document_writer):
        assert (await wait_job(pool, uuid.UUID(created.job.id))).state == "succeeded"
        first = await live_documents(pool, rid)
        assert sorted(first) == ["edit.py", "gone.py", "keep.py"]

        source.write("edit.py", "def after():\n    return 2\n")
        source.write("added.py", "def added():\n    return 3\n")
        source.git("rm", "--quiet", "gone.py")
        head = source.commit("second")
        # commits[] is left empty: the worker diffs the repository, not the payload.
        status, answer = await deliver(gateway, str(rid), push(after=head), secret=created.webhook_secret)
        assert status == 200, answer
        assert (await wait_job(pool, uuid.UUID(answer["job"]["id"]))).state == "succeeded"
    second = await live_documents(pool, rid)
    assert sorted(second) == ["added.py", "edit.py", "keep.py"]
    assert second["keep.py"] == first["keep.py"]  # untouched: same hash, same revision
    assert second["edit.py"] != first["edit.py"]
    rows = await _deliveries(pool, str(rid))
    assert [(r["status"], str(r["job_id"])) for r in rows] == [("processed", answer["job"]["id"])]
