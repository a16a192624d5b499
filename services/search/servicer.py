"""SearchServicer: the thin gRPC layer of the search service (proto in, domain call, proto out).

No search RPC is built yet. Each one raises `Unimplemented` naming its capability and the
search service issue that delivers it, so callers get UNIMPLEMENTED with an `ErrorInfo`, never a
made-up result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.errors import Unimplemented
from services.search.store import SearchStore

DELIVERED_BY = "delivered by the search service issue"


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """SearchServicer answers `kotadb.v1.SearchService`; it translates and delegates, nothing more."""

    def __init__(self, store: SearchStore) -> None:
        self._store = store

    async def SearchCode(
        self, request: search_pb2.SearchCodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.SearchCodeResponse:
        """SearchCode runs a query and returns one page of file matches. Not built yet."""
        raise Unimplemented(f"code search (SearchCode), {DELIVERED_BY}")

    async def StreamSearchCode(
        self, request: search_pb2.StreamSearchCodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[search_pb2.StreamSearchCodeResponse]:
        """StreamSearchCode streams file matches as they are found. Not built yet."""
        raise Unimplemented(f"streaming code search (StreamSearchCode), {DELIVERED_BY}")
        # Unreachable, but it makes this an async generator: the shape grpc.aio streams from.
        yield

    async def SearchSymbols(
        self, request: search_pb2.SearchSymbolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.SearchSymbolsResponse:
        """SearchSymbols finds symbol definitions by name. Not built yet."""
        raise Unimplemented(f"symbol search (SearchSymbols), {DELIVERED_BY}")

    async def GetIndexStatus(
        self, request: search_pb2.GetIndexStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.IndexStatus:
        """GetIndexStatus reports the caller's index coverage and segments. Not built yet."""
        raise Unimplemented(f"index status (GetIndexStatus), {DELIVERED_BY}")

    async def RebuildIndex(
        self, request: search_pb2.RebuildIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.RebuildIndexResponse:
        """RebuildIndex rebuilds the caller's index from Postgres. Not built yet."""
        raise Unimplemented(f"index rebuilds (RebuildIndex), {DELIVERED_BY}")
