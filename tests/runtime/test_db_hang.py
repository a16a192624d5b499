"""A database that hangs instead of refusing: bounded waits, health that flips, and recovery.

Each test freezes a dedicated PostgreSQL cluster with SIGSTOP (never the session's, which other
tests share) and always thaws it with SIGCONT, whatever happens. Two ways to hang:

* the postmaster alone, as the issue did: existing backends keep answering, but no new
  connection is accepted, so only a probe that opens one notices;
* every process of the cluster: queries on open connections never answer either.

A scripted SearchService servicer stands in for domain code that needs the database, through
the pool (`translated_errors`) and through `as_service`. Nothing here asserts a duration: a call
that does not come back fails the test by its generous client deadline, not by a stopwatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from kotadb.v1 import health_pb2, health_pb2_grpc, search_pb2, search_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.cli import status
from services.common import db, migrate
from services.common.pgembed import EmbeddedPostgres
from services.common.server import LazyPool, ServiceServer, bind, listener_port_file
from services.common.supervisor import Supervisor
from services.search.config import SearchSettings
from tests.harness import (
    service_env,
    spawn_services,
    start_gateway,
    wait_until,
)
from tests.runtime.rpc import NOT_SERVING, SERVING, status_details, unpack_details, wait_for_health

IDENTITY_KEY = "db-hang-tests-identity-key-0123456789abcdef"
# Seconds a call may take before the test calls it hung: far beyond every bound under test.
CALL_DEADLINE = 60.0
# Seconds health may take to flip; the bound is readiness interval + timeout, a few seconds.
FLIP_LIMIT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    """cluster is a PostgreSQL server of this module's own, bootstrapped and migrated."""
    home = Path(tempfile.mkdtemp(prefix="kotadb-hang-pg-"))
    home.chmod(0o711)  # the unprivileged postgres user must traverse it (see tests/conftest.py)
    server = EmbeddedPostgres(home, durable=False)
    try:
        dsn = server.start()
        if server.postmaster_pid is None:
            pytest.fail("these tests need the postmaster's pid (system PostgreSQL binaries)")
        asyncio.run(_migrate(dsn))
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def _migrate(dsn: str) -> None:
    await migrate.apply_bootstrap_async(dsn)
    await migrate.apply_migrations_async(dsn)


@contextlib.contextmanager
def frozen(cluster: EmbeddedPostgres, *, everything: bool) -> Iterator[None]:
    """frozen stops the postmaster (and with `everything`, all its children) until the block ends."""
    assert cluster.postmaster_pid is not None
    postmaster = psutil.Process(cluster.postmaster_pid)
    pids = [postmaster.pid]
    if everything:
        pids += [child.pid for child in postmaster.children(recursive=True)]
    stopped: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


class DatabaseServicer(search_pb2_grpc.SearchServiceServicer):
    """DatabaseServicer answers two methods from the database, as domain code would."""

    def __init__(self, pool: LazyPool) -> None:
        super().__init__()
        self._pool = pool

    async def SearchCode(self, request: Any, context: Any) -> search_pb2.SearchCodeResponse:
        with db.translated_errors():
            total = await self._pool.get().fetchval("select count(*) from pg_class")
        return search_pb2.SearchCodeResponse(total_match_count=int(total))

    async def GetIndexStatus(self, request: Any, context: Any) -> search_pb2.IndexStatus:
        async with db.as_service(self._pool.get()) as conn:
            await conn.fetchval("select count(*) from public.api_keys")
        return search_pb2.IndexStatus()


@dataclass
class Running:
    """Running is the in-process server under test, a channel to it and its metrics URL."""

    server: ServiceServer
    channel: grpc.aio.Channel
    stub: search_pb2_grpc.SearchServiceAsyncStub
    metrics_url: str


@pytest.fixture
async def running(cluster: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Running]:
    settings = SearchSettings(
        database_url=cluster.dsn,
        port=0,
        metrics_port=0,
        readiness_interval=0.5,
        readiness_timeout=1.0,
        db_connect_timeout=1.0,
        db_statement_timeout=1.0,
        db_acquire_timeout=0.5,
        db_pool_max=2,
        shutdown_grace=1.0,
        data_dir=tmp_path / "index",
    )
    pool = LazyPool(settings)
    servicer = DatabaseServicer(pool)  # type: ignore[abstract]
    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    server = ServiceServer(
        "search", settings, pool=pool, bindings=[bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)]
    )
    port_file = tmp_path / "search.port"
    port = await server.start(port_file=port_file)
    metrics_port = int(listener_port_file(port_file, "metrics").read_text())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_for_health(channel, SERVING, limit=FLIP_LIMIT)
        yield Running(
            server,
            channel,
            search_pb2_grpc.SearchServiceStub(channel),
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        await channel.close(None)
        await server.stop(grace=0)


def _metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _metric_async(url: str, name: str, **labels: str) -> float:
    # The listener runs on this test's event loop: fetch from a thread so it can answer.
    return await asyncio.to_thread(_metric, url, name, **labels)


async def _assert_database_unavailable(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    details = unpack_details(status_details(caught.value))
    assert details["ErrorInfo"].reason == "DATABASE_UNAVAILABLE"
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0


async def test_stopped_postmaster_turns_health_not_serving_then_serving(
    running: Running, cluster: EmbeddedPostgres
) -> None:
    with frozen(cluster, everything=False):
        await wait_for_health(running.channel, NOT_SERVING, limit=FLIP_LIMIT)
        health = await health_pb2_grpc.HealthServiceStub(running.channel).GetHealth(
            health_pb2.GetHealthRequest(), timeout=CALL_DEADLINE
        )
        database = next(part for part in health.components if part.name == "database")
        assert database.status == health_pb2.GetHealthResponse.NOT_SERVING
        assert database.message == "timed out"
        assert await _metric_async(running.metrics_url, "kotadb_ready", service="search") == 0
    await wait_for_health(running.channel, SERVING, limit=FLIP_LIMIT)
    assert await _metric_async(running.metrics_url, "kotadb_ready", service="search") == 1


async def test_frozen_database_fails_calls_unavailable_and_recovers(
    running: Running, cluster: EmbeddedPostgres
) -> None:
    request = search_pb2.SearchCodeRequest(query="x")
    answered = await running.stub.SearchCode(request, timeout=CALL_DEADLINE)
    assert answered.total_match_count > 0
    timeouts_before = await _metric_async(running.metrics_url, "kotadb_db_timeouts_total", service="search")
    with frozen(cluster, everything=True):
        # Calls come back, UNAVAILABLE with a retry delay, while the database does not answer.
        await _assert_database_unavailable(running.stub.SearchCode(request, timeout=CALL_DEADLINE))
        await _assert_database_unavailable(
            running.stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), timeout=CALL_DEADLINE)
        )
        await wait_for_health(running.channel, NOT_SERVING, limit=FLIP_LIMIT)
        await _assert_database_unavailable(running.stub.SearchCode(request, timeout=CALL_DEADLINE))
        timeouts_after = await _metric_async(
            running.metrics_url, "kotadb_db_timeouts_total", service="search"
        )
        assert timeouts_after > timeouts_before
        failed = await _metric_async(
            running.metrics_url,
            "kotadb_rpc_handled_total",
            service="search",
            method="/kotadb.v1.SearchService/SearchCode",
            code="UNAVAILABLE",
        )
        assert failed >= 2
    await wait_for_health(running.channel, SERVING, limit=FLIP_LIMIT)
    # Connections that timed out were dropped; the pool opens new ones and calls succeed again.
    assert (await running.stub.SearchCode(request, timeout=CALL_DEADLINE)).total_match_count > 0
    await running.stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), timeout=CALL_DEADLINE)


def _gateway_health(url: str, expected: int) -> tuple[bool, str]:
    code, body = status.http_get(url, 10.0)
    return code == expected, f"/health answered {code} {body[:120]}, waiting for {expected}"


def test_gateway_health_turns_503_while_the_database_hangs(
    cluster: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("db-hang-gateway")
    env = service_env(cluster.dsn, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        envoy = start_gateway(supervisor, workdir, addresses, IDENTITY_KEY)
        health = f"{envoy.url}/health"
        stats = f"{envoy.admin}/stats/prometheus"
        assert _healthy_hosts(stats) == {name: 1.0 for name in status.SERVICES}
        with frozen(cluster, everything=True):
            wait_until("gateway /health 503", lambda: _gateway_health(health, 503), supervisor, FLIP_LIMIT)
            # Envoy's own metrics show why: every service answers its health checks NOT_SERVING.
            wait_until("every cluster unhealthy", lambda: _unhealthy(stats), supervisor, FLIP_LIMIT)
        wait_until("gateway /health 200", lambda: _gateway_health(health, 200), supervisor, FLIP_LIMIT)


def _healthy_hosts(stats: str) -> dict[str, float]:
    return {
        name: _metric(stats, "envoy_cluster_membership_healthy", envoy_cluster_name=name)
        for name in status.SERVICES
    }


def _unhealthy(stats: str) -> tuple[bool, str]:
    healthy = _healthy_hosts(stats)
    return not any(healthy.values()), f"healthy hosts per cluster: {healthy}"
