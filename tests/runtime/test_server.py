"""The shared server bootstrap: readiness-driven health, error mapping, request ids, draining.

A scripted SearchService servicer (the real generated service, with methods overridden to
raise or block) stands in for domain code, so these tests see exactly what a client of any
KotaDB service sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2 as health_check_pb2
from grpc_health.v1 import health_pb2_grpc as health_pb2_grpc_v1
from kotadb.v1 import health_pb2, health_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
)
from services.common.server import LazyPool, ServiceServer, bind
from services.search.config import SearchSettings
from services.search.store import SearchStore
from tests.runtime.rpc import (
    NOT_SERVING,
    SERVING,
    health_status,
    metadata_value,
    status_details,
    unpack_details,
    wait_for_health,
)

SECRET = "secret-detail-hunter2"


class ScriptedServicer(search_pb2_grpc.SearchServiceServicer):
    """ScriptedServicer raises chosen errors and can hold one call open until released."""

    def __init__(self, store: SearchStore) -> None:
        super().__init__()
        self.store = store
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def SearchCode(self, request: Any, context: Any) -> search_pb2.SearchCodeResponse:
        raise InvalidArgument(
            "query is empty",
            field_violations=[
                FieldViolation("query", "must contain at least one positive term", "EMPTY_QUERY")
            ],
            reason="EMPTY_QUERY",
        )

    async def RebuildIndex(self, request: Any, context: Any) -> search_pb2.RebuildIndexResponse:
        raise NotFound(
            "no index for this tenant", resource_type="kotadb.dev/Index", resource_name="tenants/t1"
        )

    async def GetIndexStatus(self, request: Any, context: Any) -> search_pb2.IndexStatus:
        raise RuntimeError(f"{SECRET}: connection string postgresql://user:pw@db")

    async def SearchSymbols(self, request: Any, context: Any) -> search_pb2.SearchSymbolsResponse:
        self.entered.set()
        await self.release.wait()
        return search_pb2.SearchSymbolsResponse()

    async def StreamSearchCode(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield search_pb2.StreamSearchCodeResponse()
        raise ResourceExhausted(
            "monthly quota used up",
            quota_violations=[QuotaViolation("api_key:k1", "1000 of 1000 searches this month")],
            retry_after=1.5,
            reason="QUOTA_EXCEEDED",
        )


def _scripted(database_url: str, tmp_path: Path, **overrides: Any) -> tuple[ServiceServer, ScriptedServicer]:
    options: dict[str, Any] = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "readiness_interval": 0.1,
        "shutdown_grace": 5.0,
        "db_pool_max": 2,
        "db_connect_timeout": 1.0,
        "data_dir": tmp_path / "index",
    }
    options.update(overrides)
    settings = SearchSettings(**options)
    pool = LazyPool(settings)
    servicer = ScriptedServicer(SearchStore(pool))
    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    binding = bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)
    return ServiceServer("search", settings, pool=pool, bindings=[binding]), servicer


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


UNREACHABLE = "postgresql://kotadb@127.0.0.1:{port}/kotadb"


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[ServiceServer, ScriptedServicer, grpc.aio.Channel]]:
    """scripted runs the scripted servicer against an unreachable database (errors need none)."""
    server, servicer = _scripted(UNREACHABLE.format(port=_closed_port()), tmp_path)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, servicer, channel
    finally:
        await channel.close(None)
        await server.stop(grace=0)


async def test_unreachable_database_keeps_health_not_serving(scripted: Any) -> None:
    server, _, channel = scripted
    await server.wait_checked()
    await server.check_ready()
    assert await health_status(channel, "") == NOT_SERVING
    assert await health_status(channel, "kotadb.v1.SearchService") == NOT_SERVING
    health = await health_pb2_grpc.HealthServiceStub(channel).GetHealth(
        health_pb2.GetHealthRequest(), timeout=10
    )
    assert health.status == health_pb2.GetHealthResponse.NOT_SERVING
    database = next(part for part in health.components if part.name == "database")
    assert database.status == health_pb2.GetHealthResponse.NOT_SERVING
    assert database.message


async def test_kota_error_maps_to_code_and_details(scripted: Any) -> None:
    _, _, channel = scripted
    stub = search_pb2_grpc.SearchServiceStub(channel)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SearchCode(search_pb2.SearchCodeRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "query is empty"
    details = unpack_details(status_details(caught.value))
    assert details["ErrorInfo"].reason == "EMPTY_QUERY"
    violation = details["BadRequest"].field_violations[0]
    assert (violation.field, violation.reason) == ("query", "EMPTY_QUERY")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RebuildIndex(search_pb2.RebuildIndexRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = unpack_details(status_details(caught.value))
    assert details["ErrorInfo"].reason == "NOT_FOUND"
    assert details["ResourceInfo"].resource_name == "tenants/t1"


async def test_streaming_error_after_a_message_keeps_its_details(scripted: Any) -> None:
    _, _, channel = scripted
    call = search_pb2_grpc.SearchServiceStub(channel).StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(), timeout=10
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            received.append(response)
    assert len(received) == 1
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = unpack_details(status_details(caught.value))
    assert details["ErrorInfo"].reason == "QUOTA_EXCEEDED"
    assert details["QuotaFailure"].violations[0].subject == "api_key:k1"
    retry = details["RetryInfo"].retry_delay
    assert (retry.seconds, retry.nanos) == (1, 500_000_000)


async def test_unexpected_exception_is_internal_without_internals(
    scripted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, channel = scripted
    stub = search_pb2_grpc.SearchServiceStub(channel)
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetIndexStatus(
            search_pb2.GetIndexStatusRequest(), timeout=10, metadata=(("x-request-id", "rid-500"),)
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "rid-500" in (error.details() or "")
    status = status_details(error)
    everything = f"{error.details()} {status} {error.trailing_metadata()} {error.initial_metadata()}"
    assert SECRET not in everything
    assert "Traceback" not in everything
    assert "pw@db" not in everything
    details = unpack_details(status)
    assert details["ErrorInfo"].reason == "INTERNAL"
    assert details["ErrorInfo"].metadata["request_id"] == "rid-500"
    assert details["RequestInfo"].request_id == "rid-500"

    # The server side keeps the traceback, keyed by the same request id.
    logged = [r for r in caplog.records if r.name == "kotadb.errors"]
    assert logged and logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])
    assert logged[0].fields["request_id"] == "rid-500"  # type: ignore[attr-defined]
    access = [r for r in caplog.records if r.name == "kotadb.access" and "GetIndexStatus" in r.getMessage()]
    assert access and access[-1].fields["code"] == "INTERNAL"  # type: ignore[attr-defined]


async def test_request_id_is_echoed_or_minted(scripted: Any) -> None:
    _, _, channel = scripted
    health = health_pb2_grpc.HealthServiceStub(channel)

    call = health.GetHealth(
        health_pb2.GetHealthRequest(), timeout=10, metadata=(("x-request-id", "abc-123"),)
    )
    await call
    assert metadata_value(await call.initial_metadata(), "x-request-id") == "abc-123"
    assert metadata_value(await call.trailing_metadata(), "x-request-id") == "abc-123"

    call = health.GetHealth(health_pb2.GetHealthRequest(), timeout=10)
    await call
    minted = metadata_value(await call.initial_metadata(), "x-request-id")
    assert isinstance(minted, str) and len(minted) == 32

    # An id that could corrupt logs is replaced rather than trusted.
    call = health.GetHealth(
        health_pb2.GetHealthRequest(), timeout=10, metadata=(("x-request-id", "a b;c" * 40),)
    )
    await call
    replaced = metadata_value(await call.initial_metadata(), "x-request-id")
    assert isinstance(replaced, str) and " " not in replaced and len(replaced) == 32

    stub = search_pb2_grpc.SearchServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SearchCode(
            search_pb2.SearchCodeRequest(), timeout=10, metadata=(("x-request-id", "err-1"),)
        )
    assert metadata_value(caught.value.trailing_metadata(), "x-request-id") == "err-1"
    assert unpack_details(status_details(caught.value))["ErrorInfo"].metadata["request_id"] == "err-1"


class Switchboard:
    """Switchboard is a TCP forwarder to the real database that can be switched off and on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = _closed_port()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def on(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def off(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._links.update((writer, up_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_health_follows_database_reachability(database_url: str, tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(database_url)
    switch = Switchboard(parts.port or 5432)
    routed = parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{switch.port}").geturl()
    server, _ = _scripted(routed, tmp_path)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await server.wait_checked()
        assert await health_status(channel) == NOT_SERVING

        await switch.on()
        await wait_for_health(channel, SERVING, "")
        await wait_for_health(channel, SERVING, "kotadb.v1.SearchService")

        await switch.off()
        await wait_for_health(channel, NOT_SERVING, "")
        assert await health_status(channel, "kotadb.v1.SearchService") == NOT_SERVING

        await switch.on()
        await wait_for_health(channel, SERVING, "")
    finally:
        await channel.close(None)
        await server.stop(grace=0)
        await switch.off()


async def test_stop_drains_in_flight_calls_then_closes_the_pool(database_url: str, tmp_path: Path) -> None:
    server, servicer = _scripted(database_url, tmp_path, shutdown_grace=30.0)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_for_health(channel, SERVING, "")
        assert server.pool.connected
        in_flight = search_pb2_grpc.SearchServiceStub(channel).SearchSymbols(
            search_pb2.SearchSymbolsRequest(), timeout=60
        )
        await servicer.entered.wait()

        watch = health_pb2_grpc_v1.HealthStub(channel).Watch(
            health_check_pb2.HealthCheckRequest(service="kotadb.v1.SearchService")
        )
        assert (await watch.read()).status == SERVING

        stopping = asyncio.create_task(server.stop())
        # Health turns NOT_SERVING first, so load balancers stop sending before calls are refused.
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        # New calls are refused once the server stops accepting; the held call is still running.
        refused = False
        async with asyncio.timeout(30):
            while not refused:
                try:
                    await health_pb2_grpc.HealthServiceStub(channel).GetHealth(
                        health_pb2.GetHealthRequest(), timeout=5
                    )
                except grpc.aio.AioRpcError as error:
                    refused = error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.05)
        assert not stopping.done()

        servicer.release.set()
        response = await in_flight
        assert isinstance(response, search_pb2.SearchSymbolsResponse)
        await stopping
        assert not server.pool.connected
    finally:
        await channel.close(None)
        servicer.release.set()
        await server.stop(grace=0)


async def test_stop_cancels_calls_that_outlive_the_grace_period(tmp_path: Path) -> None:
    server, servicer = _scripted(UNREACHABLE.format(port=_closed_port()), tmp_path)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        in_flight = search_pb2_grpc.SearchServiceStub(channel).SearchSymbols(
            search_pb2.SearchSymbolsRequest(), timeout=60
        )
        await servicer.entered.wait()
        await server.stop(grace=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await in_flight
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        await channel.close(None)


async def test_a_taken_port_fails_loudly(tmp_path: Path) -> None:
    first, _ = _scripted(UNREACHABLE.format(port=_closed_port()), tmp_path)
    async with first:
        assert first.port
        second, _ = _scripted(UNREACHABLE.format(port=_closed_port()), tmp_path, port=first.port)
        with pytest.raises((OSError, RuntimeError)):
            await second.start()
