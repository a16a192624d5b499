"""A tenant directory deleted under a running search server is rebuilt from Postgres, never INTERNAL.

The server keeps the tenant open while its directory disappears (an operator's `rm -rf`, a volume
cleanup). The next search finds the index unreadable: it answers UNAVAILABLE (INDEX_REBUILDING,
with RetryInfo), the tenant is dropped from memory and built again from Postgres, and the search
after that gives results identical to those before. When the tailer is the first to touch the
lost directory (a write arrives), it drops and rebuilds the tenant the same way and keeps
serving the other tenants; the rebuilt directory is whole (every checksum verified).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.search.engine.index.index import Index
from services.search.rebuild import INDEX_DIR
from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details
from tests.search.conftest import Services, paths, start_search_server

QUERIES = ("lostword", "/lost[a-z]+ [0-9]/", "path:src/ lostword")


@contextlib.asynccontextmanager
async def _server(services: Services, database_url: str, data_dir: Path) -> AsyncIterator[Services]:
    server, manager, address = await start_search_server(database_url, data_dir)
    handle = Services(services.ingest_address, address, manager)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await server.stop(0)


async def _answers(services: Services, user: uuid.UUID, revision: int) -> list[list[str]]:
    return [paths(await services.search(user, q, mode=2, min_revision=revision)) for q in QUERIES]


async def _tenant(services: Services, user_factory: UserFactory) -> tuple[uuid.UUID, int]:
    user = await user_factory()
    files = {f"src/l{i}.py": f"lostword {i}\n" for i in range(4)} | {"doc/l.txt": "lostword doc\n"}
    return user, (await services.write(user, files)).revision


async def test_a_deleted_tenant_directory_is_rebuilt_on_the_next_search(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    async with _server(services, database_url, tmp_path) as handle:
        user, revision = await _tenant(handle, user_factory)
        other, other_revision = await _tenant(handle, user_factory)
        before = await _answers(handle, user, revision)
        theirs = await _answers(handle, other, other_revision)
        assert len(before[0]) == 5

        shutil.rmtree(tmp_path / str(user))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await handle.search(user, "lostword")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        details = unpack_details(status_details(raised.value))
        assert details["ErrorInfo"].reason == "INDEX_REBUILDING"
        assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0

        assert await _answers(handle, user, revision) == before
        assert (tmp_path / str(user) / "state.json").is_file()
        assert await _answers(handle, other, other_revision) == theirs


async def test_the_tailer_rebuilds_a_tenant_whose_directory_is_gone(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    async with _server(services, database_url, tmp_path) as handle:
        user, revision = await _tenant(handle, user_factory)
        other, other_revision = await _tenant(handle, user_factory)
        before = await _answers(handle, user, revision)
        await _answers(handle, other, other_revision)

        shutil.rmtree(tmp_path / str(user))
        later = await handle.write(user, {"src/later.py": "lostword 9\n"})
        more = await handle.write(other, {"src/more.py": "lostword 8\n"})
        after = await _answers(handle, user, later.revision)
        assert set(after[0]) == {*before[0], "src/later.py"}
        # Rebuilt whole on disk, not a new segment under a manifest naming deleted ones.
        with Index.open(tmp_path / str(user) / INDEX_DIR) as index, index.snapshot() as snap:
            snap.verify()
            assert snap.doc_count == 6
        assert "src/more.py" in (await _answers(handle, other, more.revision))[0]
        assert handle.manager.tailer.connected
