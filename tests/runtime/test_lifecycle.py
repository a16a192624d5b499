"""ServiceServer's lifecycle hooks against a real database and a real gRPC client.

The stop hooks must run after in-flight calls are over and while the pool still answers; the
start hooks before the port is bound. A blocking SearchService method is the in-flight call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.errors import Unavailable
from services.common.server import LazyPool, ServiceServer, StartHook, StopHook, bind
from services.search.config import SearchSettings
from services.search.searches import Searches
from services.search.servicer import SearchServicer
from services.search.store import SearchStore
from services.search.tenants import TenantManager


class BlockingServicer(SearchServicer):
    """BlockingServicer holds every SearchSymbols call open until the server cancels it."""

    def __init__(self, store: SearchStore) -> None:
        settings = SearchSettings()
        super().__init__(Searches(settings, TenantManager(settings, store)))
        self.entered = asyncio.Event()
        self.cancelled = False

    async def SearchSymbols(self, request: Any, context: Any) -> search_pb2.SearchSymbolsResponse:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return search_pb2.SearchSymbolsResponse()


def _server(
    database_url: str, tmp_path: Path, on_start: list[StartHook], on_stop: list[StopHook]
) -> tuple[ServiceServer, BlockingServicer]:
    settings = SearchSettings(
        database_url=database_url,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        readiness_interval=0.1,
        shutdown_grace=0.5,
        db_pool_max=2,
        data_dir=tmp_path / "index",
    )
    pool = LazyPool(settings)
    servicer = BlockingServicer(SearchStore(pool))
    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    binding = bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)
    server = ServiceServer(
        "lifecycle-test", settings, pool=pool, bindings=[binding], on_start=on_start, on_stop=on_stop
    )
    return server, servicer


async def test_hooks_run_in_order_around_the_drain_with_the_pool_open(
    database_url: str, tmp_path: Path
) -> None:
    events: list[str] = []

    # The hooks are closures over `server` and `servicer`, bound below before any hook runs.
    async def first_start() -> None:
        events.append(f"start 1, port bound: {server.port is not None}")

    async def second_start() -> None:
        events.append("start 2")

    async def failing_stop(wait: float) -> None:
        events.append("stop 1")
        raise RuntimeError("a broken stop hook must not keep the others from running")

    async def second_stop(wait: float) -> None:
        answer = await server.pool.get().fetchval("select 41 + 1")
        events.append(f"stop 2, wait {wait}, call cancelled: {servicer.cancelled}, database: {answer}")

    server, servicer = _server(
        database_url, tmp_path, [first_start, second_start], [failing_stop, second_stop]
    )
    port = await server.start()
    assert events == ["start 1, port bound: False", "start 2"]
    await server.wait_checked()
    assert server.serving, server.components

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        call = stub.SearchSymbols(search_pb2.SearchSymbolsRequest(), timeout=60)
        await servicer.entered.wait()
        await server.stop()
        with pytest.raises(grpc.aio.AioRpcError):
            await call

    # The grace is 0.5 s; hooks get at least one second.
    assert events[2:] == ["stop 1", "stop 2, wait 1.0, call cancelled: True, database: 42"]
    assert not server.pool.connected
    with pytest.raises(Unavailable):
        server.pool.get()


async def test_a_failing_start_hook_fails_start_before_binding(database_url: str, tmp_path: Path) -> None:
    stopped: list[float] = []

    async def refuse() -> None:
        raise RuntimeError("background part could not start")

    async def record_stop(wait: float) -> None:
        stopped.append(wait)

    server, _ = _server(database_url, tmp_path, [refuse], [record_stop])
    with pytest.raises(RuntimeError, match="background part could not start"):
        await server.start()
    assert server.port is None
    # stop after a failed start still runs the stop hooks and closes the pool.
    await server.stop()
    assert stopped == [1.0]
    assert not server.pool.connected
