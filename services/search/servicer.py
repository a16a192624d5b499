"""SearchServicer: the thin gRPC layer of the search service (proto in, domain call, proto out).

The tenant is always the verified caller's (`require_identity`), never a request field; the
rules live in searches.py, the indexes in tenants.py.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.errors import PermissionDenied
from services.common.identity import require_identity
from services.search import convert
from services.search.searches import CodeAnswer, Searches
from services.search.streams import StreamBatch

# Files per StreamSearchCode message.
STREAM_BATCH_FILES = 20


def _tenant() -> uuid.UUID:
    """_tenant is the verified caller's tenant; a service credential acting for no tenant is refused."""
    identity = require_identity()
    if identity.user_id is None:
        raise PermissionDenied("search needs a caller with a tenant", reason="TENANT_REQUIRED")
    return identity.user_id


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """SearchServicer answers `kotadb.v1.SearchService`; it translates and delegates, nothing more."""

    def __init__(self, searches: Searches, replica: str = "") -> None:
        self._searches = searches
        self._replica = replica or socket.gethostname()

    async def SearchCode(
        self, request: search_pb2.SearchCodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.SearchCodeResponse:
        """SearchCode runs a query and returns one page of file matches."""
        tenant = _tenant()
        query = convert.code_query_from_proto(request)
        lines = query.max_matches_per_file

        def render(answer: CodeAnswer) -> search_pb2.SearchCodeResponse:
            return convert.code_answer_to_proto(answer, lines)

        return await self._searches.code_rendered(tenant, query, context.time_remaining(), render)

    async def StreamSearchCode(
        self, request: search_pb2.StreamSearchCodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[search_pb2.StreamSearchCodeResponse]:
        """StreamSearchCode streams file matches in batches as they are verified, then a summary message."""
        tenant = _tenant()
        query = convert.stream_query_from_proto(request)
        lines = query.max_matches_per_file

        def render(batch: StreamBatch) -> search_pb2.StreamSearchCodeResponse:
            return convert.stream_batch_to_proto(batch, lines)

        async for part in self._searches.stream(
            tenant, query, request.max_file_count, context.time_remaining(), STREAM_BATCH_FILES, render
        ):
            if isinstance(part, CodeAnswer):
                yield convert.stream_summary_to_proto(part)
            else:
                yield part

    async def SearchSymbols(
        self, request: search_pb2.SearchSymbolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.SearchSymbolsResponse:
        """SearchSymbols finds symbol definitions by name."""
        tenant = _tenant()
        query = convert.symbol_query_from_proto(request)
        answer = await self._searches.symbols(tenant, query, context.time_remaining())
        return convert.symbol_answer_to_proto(answer)

    async def GetIndexStatus(
        self, request: search_pb2.GetIndexStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.IndexStatus:
        """GetIndexStatus reports the caller's index coverage and size."""
        answer = await self._searches.status(_tenant(), context.time_remaining())
        return convert.status_to_proto(answer, self._replica)

    async def RebuildIndex(
        self, request: search_pb2.RebuildIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> search_pb2.RebuildIndexResponse:
        """RebuildIndex rebuilds the caller's index from Postgres (admin key or the owner's session)."""
        answer = await self._searches.rebuild(_tenant())
        return search_pb2.RebuildIndexResponse(index_status=convert.status_to_proto(answer, self._replica))
