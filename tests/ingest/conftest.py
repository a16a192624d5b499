"""Fixtures shared by the ingest tests: an in-process ingest server, callers, a document writer.

* `ingest_server` is one `services.ingest.server.build(...)` server on port 0 for the test
  module, against the session database, trusting identities signed with `IDENTITY_KEY`; its
  settings are `INGEST_TEST_SETTINGS` (small stream batches, one symbol worker).
* `IngestServer.caller(user_id)` is the gRPC metadata of a request from that user, signed the way
  the gateway's Check signs it; `IngestServer.stub()` a client on a fresh channel.
* `document_writer` is a `DocumentWriter` with its own symbol workers, for tests that write
  through the domain API directly inside `db.as_user` / `db.as_service`.
* `repository_factory` inserts a repository row for a user (as the database owner).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from kotadb.v1 import ingest_pb2_grpc

from services.common.identity import IdentityCodec, IdentitySettings
from services.ingest import server
from services.ingest.config import IngestSettings
from services.ingest.documents import DocumentWriter
from services.ingest.symbolizer import Symbolizer
from tests.callers import caller, signing_channel

IDENTITY_KEY = "ingest-tests-identity-key-0123456789abcdef"
IDENTITY_CODEC = IdentityCodec(IDENTITY_KEY)
# Overrides for the test server: small stream batches so a short stream spans several.
INGEST_TEST_SETTINGS: dict[str, Any] = {
    "stream_batch_items": 3,
    "symbol_workers": 1,
    "readiness_interval": 0.2,
    # No job workers: tests of the job RPCs start servers with their own (tests/ingest/test_jobs_rpc.py).
    "workers": 0,
    # A free port, so servers of parallel tests (and other processes) never collide on 9462.
    "metrics_port": 0,
}


def caller_metadata(
    user_id: uuid.UUID | None, permissions: Sequence[str] = ("read", "write"), kind: str = "user"
) -> tuple[tuple[str, str], ...]:
    """caller_metadata names the caller of a call; `IngestServer.stub()` channels sign it per method."""
    return caller(user_id, permissions, kind)


@dataclass
class IngestServer:
    """IngestServer is a running in-process ingest server: its address and client helpers."""

    address: str
    settings: IngestSettings
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        """stub is an IngestService client on a new channel (closed with the fixture)."""
        channel = signing_channel(
            self.address,
            IDENTITY_CODEC,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.channels.append(channel)
        return ingest_pb2_grpc.IngestServiceStub(channel)

    def caller(
        self, user_id: uuid.UUID | None, permissions: Sequence[str] = ("read", "write")
    ) -> tuple[tuple[str, str], ...]:
        """caller is the metadata of a call made by `user_id` with `permissions`."""
        return caller_metadata(user_id, permissions)


async def start_ingest_server(database_url: str, **overrides: Any) -> tuple[Any, IngestServer]:
    """start_ingest_server builds and starts an ingest server on port 0; returns (server, handle)."""
    settings = IngestSettings(database_url=database_url, port=0, **{**INGEST_TEST_SETTINGS, **overrides})
    built = server.build(settings, identity=IdentitySettings(identity_key=IDENTITY_KEY))
    port = await built.start()
    await built.wait_checked()
    return built, IngestServer(f"127.0.0.1:{port}", settings)


@pytest.fixture(scope="module")
async def ingest_server(database_url: str) -> AsyncIterator[IngestServer]:
    """ingest_server is one in-process ingest server for the module (see INGEST_TEST_SETTINGS)."""
    built, handle = await start_ingest_server(database_url)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(0)


@pytest.fixture(scope="module")
async def document_writer() -> AsyncIterator[DocumentWriter]:
    """document_writer is a DocumentWriter with one symbol worker process, stopped after the module."""
    symbolizer = Symbolizer(1)
    try:
        yield DocumentWriter(symbolizer)
    finally:
        symbolizer.close()


class RepositoryFactory:
    """RepositoryFactory inserts repositories straight into the database (as its owner)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def __call__(self, user_id: uuid.UUID, full_name: str | None = None) -> uuid.UUID:
        """__call__ creates a repository of `user_id` and returns its id."""
        repository_id: uuid.UUID = await self.pool.fetchval(
            "insert into public.repositories (user_id, full_name, url) values ($1, $2, 'https://example.test/r')"
            " returning id",
            user_id,
            full_name or f"org/repo-{secrets.token_hex(4)}",
        )
        return repository_id


@pytest.fixture(scope="session")
def repository_factory(pool: asyncpg.Pool) -> RepositoryFactory:
    """repository_factory creates repositories: `repository_id = await repository_factory(user_id)`."""
    return RepositoryFactory(pool)
