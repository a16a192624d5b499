"""Fixtures shared by the search tests: in-process ingest and search servers, tenants, helpers.

* `services` starts one ingest server and one search server (port 0) for the test module,
  against the session database, both trusting identities signed with the ingest tests' key;
  the search server LISTENs on the same database and keeps its index in a temporary directory.
* `Services.write(user, {path: text})` upserts through the ingest RPC and returns the revision;
  `Services.search(user, query, ...)` calls SearchCode with that user's identity.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from kotadb.v1 import document_pb2, ingest_pb2, ingest_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.identity import IdentitySettings
from services.common.server import ServiceServer
from services.search.config import SearchSettings
from services.search.server import assemble
from services.search.tenants import TenantManager
from tests.ingest.conftest import IDENTITY_KEY, caller_metadata, start_ingest_server

SEARCH_TEST_SETTINGS: dict[str, Any] = {
    "poll_interval": 0.5,
    # Small feed batches, so that syncs routinely span several batches.
    "feed_batch_rows": 3,
    "readiness_interval": 0.2,
    "durable": False,
}


async def start_search_server(
    database_url: str, data_dir: Path, **overrides: Any
) -> tuple[ServiceServer, TenantManager, str]:
    """start_search_server builds and starts a search server on port 0; returns (server, manager, address)."""
    settings = SearchSettings(
        database_url=database_url,
        port=0,
        data_dir=data_dir,
        **{"listen_url": database_url, **SEARCH_TEST_SETTINGS, **overrides},
    )
    server, manager = assemble(settings, identity=IdentitySettings(identity_key=IDENTITY_KEY))
    port = await server.start()
    await server.wait_checked()
    return server, manager, f"127.0.0.1:{port}"


@dataclass
class Services:
    """Services is a running ingest server and search server with client helpers."""

    ingest_address: str
    search_address: str
    manager: TenantManager
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.channels.append(channel)
        return channel

    def ingest(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        """ingest is an IngestService client on a new channel."""
        return ingest_pb2_grpc.IngestServiceStub(self._channel(self.ingest_address))

    def search_stub(self, address: str | None = None) -> search_pb2_grpc.SearchServiceAsyncStub:
        """search_stub is a SearchService client on a new channel."""
        return search_pb2_grpc.SearchServiceStub(self._channel(address or self.search_address))

    async def write(
        self,
        user: uuid.UUID,
        files: Mapping[str, str],
        *,
        stub: ingest_pb2_grpc.IngestServiceAsyncStub | None = None,
    ) -> ingest_pb2.UpsertDocumentsResponse:
        """write upserts `files` (path → text) for `user` through the ingest RPC."""
        stub = stub or self.ingest()
        request = ingest_pb2.UpsertDocumentsRequest(
            documents=[document_pb2.Document(path=p, text=t) for p, t in files.items()]
        )
        response: ingest_pb2.UpsertDocumentsResponse = await stub.UpsertDocuments(
            request, metadata=caller_metadata(user)
        )
        return response

    async def delete(self, user: uuid.UUID, document_id: str) -> int:
        """delete tombstones one document through the ingest RPC and returns its revision."""
        response = await self.ingest().DeleteDocument(
            ingest_pb2.DeleteDocumentRequest(id=document_id), metadata=caller_metadata(user)
        )
        return int(response.revision)

    async def search(
        self,
        user: uuid.UUID,
        query: str,
        *,
        stub: search_pb2_grpc.SearchServiceAsyncStub | None = None,
        deadline: float = 30.0,
        **fields: Any,
    ) -> search_pb2.SearchCodeResponse:
        """search runs SearchCode as `user`."""
        stub = stub or self.search_stub()
        request = search_pb2.SearchCodeRequest(query=query, **fields)
        response: search_pb2.SearchCodeResponse = await stub.SearchCode(
            request, metadata=caller_metadata(user), timeout=deadline
        )
        return response


def paths(response: search_pb2.SearchCodeResponse) -> list[str]:
    """paths lists a response's file paths in order."""
    return [f.path for f in response.file_matches]


def caller(user: uuid.UUID | None, permissions: Sequence[str] = ("read", "write")) -> Any:
    """caller is the gRPC metadata of a call made by `user`."""
    return caller_metadata(user, permissions)


@pytest.fixture(scope="module")
async def services(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Services]:
    """services is an ingest server and a search server for the module (see SEARCH_TEST_SETTINGS)."""
    ingest, ingest_handle = await start_ingest_server(database_url)
    search, manager, address = await start_search_server(database_url, tmp_path_factory.mktemp("search-data"))
    handle = Services(ingest_handle.address, address, manager)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await search.stop(0)
        await ingest.stop(0)
