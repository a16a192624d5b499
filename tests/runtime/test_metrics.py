"""Prometheus metrics of a real `kotadb serve` process, scraped over HTTP from its metrics port.

The search service runs as a child on port 0 (so its metrics listener picks a free port too and
writes it to `<port file>.metrics`); the test makes calls that succeed and one that fails, then
reads `/metrics` and checks the series by name and labels, as a Prometheus server would see them.
The metrics listener's own limits (unknown paths, methods, oversized heads) are checked on an
in-process listener.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kotadb.v1 import search_pb2, search_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.common import metrics
from services.common.pgembed import free_port
from services.common.server import LazyPool, ServiceServer, bind, listener_port_file
from services.common.supervisor import Supervisor
from services.search.config import SearchSettings
from tests.gatewayhttp import http
from tests.harness import service_env, spawn_service, wait_healthy

IDENTITY_KEY = "metrics-tests-identity-key-0123456789abcdef"
SEARCH_CODE = "/kotadb.v1.SearchService/SearchCode"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Running:
    """Running is the search child: its gRPC address and its metrics URL."""

    address: str
    metrics_url: str
    port_file: Path


@pytest.fixture(scope="module")
def search(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("metrics")
    env = service_env(database_url, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        address, _ = spawn_service(supervisor, workdir, "search", "search", env)
        wait_healthy(address, supervisor)
        port_file = workdir / "search.port"
        metrics_port = int(listener_port_file(port_file, "metrics").read_text())
        yield Running(address, f"http://127.0.0.1:{metrics_port}/metrics", port_file)


def _scrape(url: str) -> tuple[str, str, list[Sample]]:
    with urllib.request.urlopen(url, timeout=30) as response:
        content_type = response.headers.get("content-type", "")
        text = response.read().decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return content_type, text, samples


def _value(samples: list[Sample], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


async def _calls(address: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        # No identity: the identity interceptor refuses the call before the servicer runs.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await search_pb2_grpc.SearchServiceStub(channel).SearchCode(
                search_pb2.SearchCodeRequest(query="x"), timeout=30
            )
        return failed.value.code()


def test_metrics_port_is_written_next_to_the_port_file(search: Running) -> None:
    metrics_file = listener_port_file(search.port_file, "metrics")
    assert metrics_file.name == "search.port.metrics"
    grpc_port = int(search.address.rsplit(":", 1)[1])
    # `--port 0` frees the metrics port too, unless KOTADB_SEARCH_METRICS_PORT is set.
    assert int(metrics_file.read_text()) not in (0, grpc_port)


def test_scrape_shows_calls_by_method_and_code_with_durations(search: Running) -> None:
    failed_code = asyncio.run(_calls(search.address))
    assert failed_code == grpc.StatusCode.UNAUTHENTICATED
    # A call is counted as its handler finishes, which may be just after the client has its answer.
    for _ in range(100):
        content_type, _, samples = _scrape(search.metrics_url)
        if _value(samples, "kotadb_rpc_handled_total", service="search", method=SEARCH_CODE) is not None:
            break
        time.sleep(0.05)
    assert content_type.startswith("text/plain")
    handled = "kotadb_rpc_handled_total"
    ok = _value(samples, handled, service="search", method=HEALTH_CHECK, code="OK")
    assert ok is not None and ok >= 3
    assert _value(samples, handled, service="search", method=SEARCH_CODE, code="UNAUTHENTICATED") == 1
    # The histogram has cumulative buckets up to +Inf, whose count is the number of calls.
    duration = "kotadb_rpc_duration_seconds"
    assert _value(samples, f"{duration}_count", service="search", method=SEARCH_CODE) == 1
    assert _value(samples, f"{duration}_bucket", service="search", method=SEARCH_CODE, le="+Inf") == 1
    assert _value(samples, f"{duration}_bucket", service="search", method=SEARCH_CODE, le="30.0") == 1
    assert (_value(samples, f"{duration}_sum", service="search", method=SEARCH_CODE) or 0) > 0


def test_scrape_shows_readiness_and_the_database_pool(search: Running) -> None:
    _, text, samples = _scrape(search.metrics_url)
    assert _value(samples, "kotadb_ready", service="search") == 1
    assert _value(samples, "kotadb_component_ready", service="search", component="database") == 1
    pool = "kotadb_db_pool_connections"
    opened = _value(samples, pool, service="search", state="open")
    idle = _value(samples, pool, service="search", state="idle")
    in_use = _value(samples, pool, service="search", state="in_use")
    assert opened is not None and idle is not None and in_use is not None
    assert opened >= 1 and opened == idle + in_use
    assert _value(samples, pool, service="search", state="max") == 10
    # Declared metrics are described even before anything was counted, so dashboards find them.
    assert "# TYPE kotadb_refusals_total counter" in text
    assert "# TYPE kotadb_db_timeouts_total counter" in text


def test_metrics_listener_answers_only_get_metrics(search: Running) -> None:
    base = search.metrics_url.removesuffix("/metrics")
    assert http("GET", f"{base}/metrics?name[]=x", None)[0] == 200
    assert http("HEAD", f"{base}/metrics", None)[0] == 200
    assert http("GET", f"{base}/", None)[0] == 404
    assert http("POST", f"{base}/metrics", None)[0] == 405


async def test_metrics_listener_drops_an_oversized_or_garbled_request() -> None:
    listener = metrics.MetricsListener()
    port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n" + b"x-filler: " + b"a" * 20000 + b"\r\n\r\n")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), timeout=30)
        except ConnectionResetError:  # closed with our bytes unread: the kernel resets
            answer = b""
        assert answer == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), timeout=30)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        assert listener.scrapes == 0
    finally:
        await listener.stop(1.0)


def _search_server(tmp_path: Path, **overrides: Any) -> ServiceServer:
    settings = SearchSettings(
        database_url=f"postgresql://kotadb@127.0.0.1:{free_port()}/kotadb",
        port=0,
        shutdown_grace=0.5,
        data_dir=tmp_path / "index",
        **overrides,
    )
    pool = LazyPool(settings)
    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    # The generated base (abstract only in its stubs): every method answers UNIMPLEMENTED.
    servicer = search_pb2_grpc.SearchServiceServicer()  # type: ignore[abstract]
    return ServiceServer(
        "metrics-test",
        settings,
        pool=pool,
        bindings=[bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)],
    )


async def test_metrics_listener_binds_its_own_host(tmp_path: Path) -> None:
    # Any 127/8 address is loopback on Linux: the listener must be on 127.0.0.2 and only there.
    server = _search_server(tmp_path, metrics_host="127.0.0.2", metrics_port=0)
    port_file = tmp_path / "search.port"
    await server.start(port_file=port_file)
    try:
        port = int(listener_port_file(port_file, "metrics").read_text())
        code, _ = await asyncio.to_thread(http, "GET", f"http://127.0.0.2:{port}/metrics", None)
        assert code == 200
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await server.stop(grace=0)


async def test_a_taken_metrics_port_fails_start_naming_the_listener(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = _search_server(tmp_path, metrics_port=taken.getsockname()[1])
        try:
            with pytest.raises(OSError, match="metrics listener"):
                await server.start()
        finally:
            await server.stop(grace=0)
