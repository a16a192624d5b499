"""The first search of a tenant whose index is still being built answers UNAVAILABLE in time, not late.

A fresh search server (empty volume) builds a tenant's index on its first use. The build is held
at a gate (the manager's build is wrapped), standing in for a large tenant on a cold replica:
a search with a short budget answers UNAVAILABLE, reason INDEX_BUILDING, with RetryInfo, before
its deadline; the build goes on in its own task, and once it ends the next search is served by
it (one build, not one per caller). Symbol search and GetIndexStatus answer the same way.
`kotadb search` prints that answer as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kotadb.v1 import search_pb2

from services.cli.client import describe_rpc_error
from services.search.rebuild import Built
from services.search.tenants import BUILD_RETRY_SECONDS
from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details
from tests.search.conftest import Services, caller, paths, start_search_server


@contextlib.asynccontextmanager
async def _gated_server(
    services: Services, database_url: str, data_dir: Path
) -> AsyncIterator[tuple[Services, asyncio.Event, list[uuid.UUID]]]:
    """_gated_server is a search server whose tenant builds wait for the yielded event."""
    server, manager, address = await start_search_server(database_url, data_dir)
    gate = asyncio.Event()
    builds: list[uuid.UUID] = []
    build = manager._build

    async def gated(tenant: uuid.UUID) -> Built:
        builds.append(tenant)
        await gate.wait()
        return await build(tenant)

    manager._build = gated  # type: ignore[method-assign]
    handle = Services(services.ingest_address, address, manager)
    try:
        yield handle, gate, builds
    finally:
        gate.set()
        for channel in handle.channels:
            await channel.close(None)
        await server.stop(0)


async def test_a_search_during_the_first_build_is_unavailable_with_retry_info(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    user = await user_factory()
    files = {f"b{i}.py": f"def building_{i}():\n    return {i}\n" for i in range(4)}
    written = await services.write(user, files)
    async with _gated_server(services, database_url, tmp_path) as (handle, gate, builds):
        # Once with the request's own timeout, once bounded only by the gRPC deadline.
        calls: list[dict[str, Any]] = [{"timeout": {"nanos": 200_000_000}}, {"deadline": 0.5}]
        for fields in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await handle.search(user, "building_", min_revision=written.revision, **fields)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            details = unpack_details(status_details(raised.value))
            assert details["ErrorInfo"].reason == "INDEX_BUILDING"
            delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
            assert delay == BUILD_RETRY_SECONDS
            line = describe_rpc_error(raised.value)
            assert line.startswith("UNAVAILABLE INDEX_BUILDING: the index of this tenant is being built")
            assert line.endswith(f"(retry after {int(BUILD_RETRY_SECONDS)}s)") and "\n" not in line
        # Symbol search and the index status wait for the same build within their deadlines.
        with pytest.raises(grpc.aio.AioRpcError) as symbols:
            await handle.search_stub().SearchSymbols(
                search_pb2.SearchSymbolsRequest(query="building_"), metadata=caller(user), timeout=0.3
            )
        assert symbols.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as status:
            await handle.search_stub().GetIndexStatus(
                search_pb2.GetIndexStatusRequest(), metadata=caller(user), timeout=0.3
            )
        assert status.value.code() == grpc.StatusCode.UNAVAILABLE
        assert unpack_details(status_details(status.value))["ErrorInfo"].reason == "INDEX_BUILDING"
        assert not handle.manager.is_open(user)

        gate.set()
        found = await handle.search(user, "building_", min_revision=written.revision, mode=2)
        assert sorted(paths(found)) == sorted(files)
        assert builds == [user]  # the callers that gave up left the one build running
