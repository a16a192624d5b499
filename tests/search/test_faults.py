"""Faults: the search process killed during writes, its volume deleted, a segment corrupted.

The search service runs as a `kotadb serve search` process (tailing the feed with LISTEN);
writes go through an in-process ingest server. After each fault the process is started again
and must converge: every search carrying the last write's revision equals what Postgres holds,
and results after a rebuild are identical to those before it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.supervisor import ChildProcess, Supervisor
from tests.callers import signing_channel
from tests.conftest import UserFactory
from tests.harness import serve, service_env
from tests.ingest.conftest import (
    IDENTITY_CODEC,
    IDENTITY_KEY,
    IngestServer,
    caller_metadata,
    start_ingest_server,
)
from tests.search.conftest import Services

QUERIES = ("burst", "marker1", "/marker[0-9]*7/", "symbol_def")


@pytest.fixture(scope="module")
async def ingest(database_url: str) -> AsyncIterator[IngestServer]:
    built, handle = await start_ingest_server(database_url)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await built.stop(0)


class SearchProcess:
    """SearchProcess starts, kills and restarts one search process over one data directory.

    Each run has its own supervisor, so a run killed on purpose does not fail the next start.
    """

    def __init__(self, workdir: Path, database_url: str) -> None:
        self.supervisor: Supervisor | None = None
        self.workdir = workdir
        self.env = service_env(
            database_url,
            workdir,
            IDENTITY_KEY,
            KOTADB_SEARCH_LISTEN_URL=database_url,
            KOTADB_SEARCH_POLL_INTERVAL="0.2",
            KOTADB_SEARCH_DURABLE="false",
        )
        self.data_dir = Path(self.env["KOTADB_SEARCH_DATA_DIR"])
        self.runs = 0
        self.child: ChildProcess | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> search_pb2_grpc.SearchServiceAsyncStub:
        self.runs += 1
        self.supervisor = Supervisor(grace=10).__enter__()
        address, self.child = serve(self.supervisor, self.workdir, f"search{self.runs}", "search", self.env)
        self.channel = signing_channel(address, IDENTITY_CODEC)
        return search_pb2_grpc.SearchServiceStub(self.channel)

    async def stop(self, *, kill: bool = False) -> None:
        assert self.child is not None and self.channel is not None
        await self.channel.close(None)
        if kill:
            os.killpg(self.child.pid, signal.SIGKILL)
        self.child.stop(grace=10)
        assert self.supervisor is not None
        self.supervisor.__exit__(None, None, None)


async def _results(stub: Any, user: uuid.UUID, revision: int) -> list[list[Any]]:
    out = []
    for query in QUERIES:
        response = await stub.SearchCode(
            search_pb2.SearchCodeRequest(
                query=query, min_revision=revision, mode=search_pb2.SEARCH_MODE_EXHAUSTIVE, page_size=1000
            ),
            metadata=caller_metadata(user),
            timeout=60,
        )
        out.append(
            [response.total_file_count, response.total_match_count]
            + [(f.path, [m.line_number for m in f.line_matches]) for f in response.file_matches]
        )
    return out


async def _live_paths(pool: asyncpg.Pool, user: uuid.UUID, needle: str) -> list[str]:
    rows = await pool.fetch(
        "select path from public.documents"
        " where user_id = $1 and deleted_at is null and strpos(content, $2) > 0",
        user,
        needle,
    )
    return sorted(r["path"] for r in rows)


async def test_killed_deleted_and_corrupted_indexes_converge(
    database_url: str, tmp_path: Path, ingest: IngestServer, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    writer = Services(ingest.address, "", None)  # type: ignore[arg-type]
    user = await user_factory()
    search = SearchProcess(tmp_path, database_url)
    try:
        stub = await search.start()
        first = await writer.write(user, {"k/0.py": "def symbol_def():\n    return 'burst'\n"})
        await _results(stub, user, first.revision)  # builds the tenant's index

        # kill -9 in the middle of a burst of writes and deletes.
        last = first.revision
        ids: list[str] = []
        for i in range(1, 31):
            written = await writer.write(user, {f"k/{i}.txt": f"burst marker{i}\nline two\n"})
            ids.append(written.results[0].id)
            last = written.revision
            if i % 7 == 0:
                last = await writer.delete(user, ids.pop(0))
            if i == 12:
                await search.stop(kill=True)
            await asyncio.sleep(0)
        stub = await search.start()
        before = await _results(stub, user, last)
        got = [path for path, _ in before[0][2:]]
        assert sorted(got) == await _live_paths(pool, user, "burst")

        # Losing the volume loses nothing: identical results after a rebuild from Postgres.
        await search.stop()
        shutil.rmtree(search.data_dir)
        stub = await search.start()
        assert await _results(stub, user, last) == before

        # A corrupted segment file is detected at start and the tenant rebuilt.
        await search.stop()
        tenant_dir = search.data_dir / str(user)
        content = max(tenant_dir.glob("index/seg-*/content.bin"), key=lambda p: p.stat().st_size)
        raw = bytearray(content.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        content.write_bytes(bytes(raw))
        rebuilt_before = (tenant_dir / "state.json").read_text()
        stub = await search.start()
        assert await _results(stub, user, last) == before
        assert (tenant_dir / "state.json").read_text() != rebuilt_before
        status = await stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), metadata=caller_metadata(user))
        assert status.document_count == len(await _live_paths(pool, user, ""))

        # Postgres drops every connection of the search process (pool and listener): searches keep
        # being answered from the index, and the tailer reconnects and catches up by itself.
        assert search.child is not None
        ports = [c.laddr.port for c in psutil.Process(search.child.pid).net_connections("tcp")]
        dropped = await pool.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity"
            " where client_port = any($1::int[])",
            ports,
        )
        assert dropped >= 2
        assert await _results(stub, user, last) == before
        after = await writer.write(user, {"k/after-drop.txt": "burst after the drop\n"})
        found = await _results(stub, user, after.revision)
        assert "k/after-drop.txt" in [path for path, _ in found[0][2:]]
        await search.stop()
    finally:
        if search.supervisor is not None:
            search.supervisor.stop_all()
