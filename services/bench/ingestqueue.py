"""`kotadb bench ingest`, queue side: webhook → job latency, claim overhead, NOTIFY under writers.

* `webhook_latency` registers a local git repository through the gateway, then 20 times commits a
  one-file change, delivers the signed `push` webhook through Envoy and follows the queued job
  with WatchJob; the figure is the job's recorded end time minus the moment the delivery was sent
  (one clock: everything runs on this machine), and the client-observed time beside it.
* `claim_overhead` measures the queue alone: N no-op jobs (one per repository, so none coalesce)
  claimed and finished by 4 workers, each with its own connection, with the service's own
  `queue.claim` / `queue.succeed` (events included), in a scratch database of the same cluster
  so the stack's workers never see them.
* `notify_cost` measures commits per second of small transactions from 1 to many concurrent
  writers, with and without one `pg_notify` each, while a connection LISTENs: NOTIFY takes a
  cluster-wide lock at commit, which serialises committers (docs/design.md; DESIGN.md §8).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc, job_pb2, repository_pb2

from services.bench.measure import percentile, summarize
from services.common import db
from services.ingest import queue

FINAL = frozenset({job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED})


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.email=bench@example.test", "-c", "user.name=bench", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def _watch(stub: ingest_pb2_grpc.IngestServiceStub, metadata: Any, job_id: str) -> job_pb2.Job:
    # Read to the end: the server closes the stream after the final event (no client cancel).
    for _ in stub.WatchJob(ingest_pb2.WatchJobRequest(id=job_id), metadata=metadata, timeout=600):
        pass
    job: job_pb2.Job = stub.GetJob(ingest_pb2.GetJobRequest(id=job_id), metadata=metadata, timeout=60)
    return job


def webhook_latency(
    gateway: str, api_key: str, work: Path, pushes: int, echo: Callable[[str], None]
) -> dict[str, Any]:
    """webhook_latency times signed one-file push webhooks to their job's end (see the module doc)."""
    origin = work / "webhook-origin"
    origin.mkdir(parents=True)
    _git(origin, "init", "-q", "-b", "main")
    for index in range(50):
        (origin / f"mod{index}.py").write_text(f"def f{index}() -> int:\n    return {index}\n")
    _git(origin, "add", ".")
    _git(origin, "commit", "-q", "-m", "first")
    metadata = (("authorization", f"Bearer {api_key}"),)
    target = gateway.removeprefix("http://")
    server_ms: list[float] = []
    client_ms: list[float] = []
    errors: list[str] = []
    with grpc.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        created = stub.CreateRepository(
            ingest_pb2.CreateRepositoryRequest(
                repository=repository_pb2.Repository(
                    full_name=f"bench/webhook-{uuid.uuid4().hex[:6]}",
                    url=origin.as_uri(),
                    default_branch="main",
                    provider=repository_pb2.Repository.GITHUB,
                ),
                sync=True,
            ),
            metadata=metadata,
            timeout=60,
        )
        first = _watch(stub, metadata, created.job.id)
        if first.state != job_pb2.Job.SUCCEEDED:
            raise RuntimeError(
                f"the webhook repository's first sync ended {first.state}: {first.error.message}"
            )
        secret = created.webhook_secret.encode()
        before = _git(origin, "rev-parse", "HEAD")
        for number in range(pushes):
            (origin / "mod0.py").write_text(f"def f0() -> int:\n    return {1000 + number}\n")
            _git(origin, "commit", "-q", "-am", f"push {number}")
            after = _git(origin, "rev-parse", "HEAD")
            body = json.dumps(
                {
                    "ref": "refs/heads/main",
                    "before": before,
                    "after": after,
                    "repository": {"full_name": created.repository.full_name, "default_branch": "main"},
                    "commits": [{"id": after, "modified": ["mod0.py"]}],
                }
            ).encode()
            request = urllib.request.Request(
                f"{gateway}/v1/webhooks/github/{created.repository.id}",
                data=body,
                method="POST",
                headers={
                    "content-type": "application/json",
                    "x-github-event": "push",
                    "x-github-delivery": str(uuid.uuid4()),
                    "x-hub-signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
                },
            )
            sent = time.time()
            try:
                with urllib.request.urlopen(request, timeout=30) as answered:
                    answer = json.loads(answered.read())
                job = _watch(stub, metadata, answer["job"]["id"])
            except (OSError, grpc.RpcError) as exc:
                # A failed sample is reported, never retried into a better figure.
                errors.append(f"push {number}: {exc}"[:500])
                echo(f"push {number} failed: {errors[-1]}")
                time.sleep(5)  # `kotadb dev` restarts a part that died
                before = after
                continue
            observed = time.time()
            if job.state != job_pb2.Job.SUCCEEDED:
                raise RuntimeError(f"webhook job {job.id} ended {job.state}: {job.error.message}")
            server_ms.append((job.end_time.ToDatetime().timestamp() - sent) * 1e3)
            client_ms.append((observed - sent) * 1e3)
            before = after
    p50, p99 = percentile(server_ms, 0.5), percentile(server_ms, 0.99)
    echo(f"webhook → job finished: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    return {
        "pushes": pushes,
        "job_finished_ms": summarize([m / 1e3 for m in server_ms]).as_dict(),
        "client_observed_ms": summarize([m / 1e3 for m in client_ms]).as_dict(),
        "samples_ms": [round(m, 1) for m in server_ms],
        "errors": errors,
    }


async def _scratch_database(database_url: str, name: str) -> str:
    """_scratch_database (re)creates database `name` on the same cluster, migrated; returns its URL."""
    from services.common import migrate

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    base, _, _ = database_url.rpartition("/")
    url = f"{base}/{name}"
    await migrate.apply_bootstrap_async(url)
    await migrate.apply_migrations_async(url)
    return url


async def _claim_overhead(database_url: str, jobs: int, workers: int) -> dict[str, Any]:
    url = await _scratch_database(database_url, "kotadb_bench_queue")
    setup = await asyncpg.connect(url)
    try:
        user = await setup.fetchval(
            "insert into auth.users (id, aud, role, email) values (gen_random_uuid(), 'authenticated',"
            " 'authenticated', 'bench-queue@example.test') returning id"
        )
        repositories = await setup.fetch(
            "insert into public.repositories (user_id, full_name, url)"
            " select $1, 'bench/noop-' || g, 'https://example.test/r' || g from generate_series(1, $2) g"
            " returning id",
            user,
            jobs,
        )
    finally:
        await setup.close()
    pool = await db.create_pool(url, min_size=workers, max_size=workers)
    async with db.as_service(pool) as conn:
        for row in repositories:
            await queue.enqueue(conn, user_id=user, repository_id=row["id"], kind="sync", params={})
    done = [0] * workers

    async def work(index: int) -> None:
        name = f"bench-worker-{index}"
        while True:
            async with db.as_service(pool) as conn:
                claimed = await queue.claim(conn, name, limit=1, lease=30.0)
            if not claimed:
                return
            async with db.as_service(pool) as conn:
                await queue.succeed(conn, claimed[0], name, progress={}, message="no-op")
            done[index] += 1

    try:
        started = time.perf_counter()
        await asyncio.gather(*(work(i) for i in range(workers)))
        seconds = time.perf_counter() - started
    finally:
        await pool.close()
    return {"jobs": sum(done), "workers": workers, "seconds": seconds, "jobs_per_s": sum(done) / seconds}


def claim_overhead(database_url: str, jobs: int, workers: int) -> dict[str, Any]:
    """claim_overhead is no-op jobs claimed and finished per second by `workers` (module doc)."""
    return asyncio.run(_claim_overhead(database_url, jobs, workers))


async def _write_until(conn: asyncpg.Connection, sql: str, tenant: int, stop: float) -> int:
    """_write_until commits one-row transactions until `stop`; returns how many."""
    commits = 0
    while time.perf_counter() < stop:
        async with conn.transaction():
            await conn.execute(sql, tenant)
        commits += 1
    return commits


async def _notify_cost(database_url: str, writer_counts: list[int], seconds: float) -> dict[str, Any]:
    url = await _scratch_database(database_url, "kotadb_bench_notify")
    setup = await asyncpg.connect(url)
    try:
        await setup.execute("create table notify_bench (id bigserial primary key, tenant int, note text)")
        settings = {
            name: await setup.fetchval(f"show {name}")
            for name in ("fsync", "synchronous_commit", "max_connections")
        }
    finally:
        await setup.close()
    listener = await asyncpg.connect(url)
    received = [0]
    await listener.add_listener("bench", lambda *_: received.__setitem__(0, received[0] + 1))
    rows: list[dict[str, Any]] = []
    try:
        for writers in writer_counts:
            for notify in (False, True):
                statement = "insert into notify_bench (tenant, note) values ($1, 'x')"
                if notify:
                    statement = (
                        "with w as (insert into notify_bench (tenant, note) values ($1, 'x')"
                        " returning tenant) select pg_notify('bench', tenant::text) from w"
                    )
                connections = [await asyncpg.connect(url) for _ in range(writers)]
                try:
                    started = time.perf_counter()
                    stop = started + seconds
                    counts = await asyncio.gather(
                        *(
                            _write_until(conn, statement, index, stop)
                            for index, conn in enumerate(connections)
                        )
                    )
                    elapsed = time.perf_counter() - started
                finally:
                    for conn in connections:
                        await conn.close()
                rows.append(
                    {
                        "writers": writers,
                        "notify": notify,
                        "commits": sum(counts),
                        "commits_per_s": sum(counts) / elapsed,
                    }
                )
    finally:
        await listener.close()
    return {
        "settings": settings,
        "seconds_each": seconds,
        "notifications_received": received[0],
        "runs": rows,
    }


def notify_cost(database_url: str, writer_counts: list[int], seconds: float) -> dict[str, Any]:
    """notify_cost is commits/s of one-row transactions with and without NOTIFY (module doc)."""
    return asyncio.run(_notify_cost(database_url, writer_counts, seconds))
