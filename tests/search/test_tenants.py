"""Tenant indexes on the volume: the open-index cap, the disk budget and RebuildIndex.

A server capped at two open tenants serves three: the least recently used is closed and
reopened on its next search with the same results. With a tiny disk budget, closed tenants'
directories are deleted and rebuilt from Postgres on next use. RebuildIndex needs the admin
permission (or the owner's session) and leaves identical results behind.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kotadb.v1 import search_pb2

from tests.conftest import UserFactory
from tests.ingest.conftest import caller_metadata
from tests.search.conftest import Services, caller, paths, start_search_server


@contextlib.asynccontextmanager
async def _server(
    services: Services, database_url: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[Services]:
    server, manager, address = await start_search_server(database_url, data_dir, **overrides)
    handle = Services(services.ingest_address, address, manager)
    try:
        yield handle
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await server.stop(0)


async def _answers(services: Services, users: list[uuid.UUID], revision: int) -> list[list[str]]:
    return [paths(await services.search(u, "capped_marker", min_revision=revision, mode=2)) for u in users]


async def _three_tenants(services: Services, user_factory: UserFactory) -> tuple[list[uuid.UUID], int]:
    users = [await user_factory() for _ in range(3)]
    revision = 0
    for i, user in enumerate(users):
        files = {f"t{i}/{j}.txt": f"capped_marker {i} {j}\n" for j in range(i + 1)}
        revision = max(revision, (await services.write(user, files)).revision)
    return users, revision


async def test_open_tenants_are_capped(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    users, revision = await _three_tenants(services, user_factory)
    async with _server(services, database_url, tmp_path / "capped", max_open_tenants=2) as capped:
        first = await _answers(capped, users, revision)
        assert [len(p) for p in first] == [1, 2, 3]
        assert [capped.manager.is_open(u) for u in users] == [False, True, True]
        # The evicted tenant is reopened from its directory (closing the least recent), same answers.
        assert await _answers(capped, users[:1], revision) == first[:1]
        assert [capped.manager.is_open(u) for u in users] == [True, False, True]
        assert await _answers(capped, users, revision) == first


async def test_the_disk_budget_deletes_least_recently_used_tenants(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    users, revision = await _three_tenants(services, user_factory)
    async with _server(services, database_url, tmp_path / "budget", disk_budget_bytes=1) as budgeted:
        first = await _answers(budgeted, users, revision)
        assert [len(p) for p in first] == [1, 2, 3]
        # The budget (1 byte) leaves only the tenant just built: the others were closed and deleted.
        assert [budgeted.manager.is_open(u) for u in users] == [False, False, True]
        on_disk = {p.name for p in (tmp_path / "budget").iterdir() if not p.name.startswith(".")}
        assert on_disk - {"cursor.key"} == {str(users[2])}
        # Deleted tenants are rebuilt from Postgres on next use, with the same answers.
        assert await _answers(budgeted, users, revision) == first


async def test_rebuild_needs_admin_or_the_owners_session_and_changes_nothing(
    services: Services, user_factory: UserFactory
) -> None:
    user = await user_factory()
    written = await services.write(
        user, {"r/a.py": "def rebuilt():\n    return 1\n", "r/b.txt": "rebuilt twice\n"}
    )
    before = await services.search(user, "rebuilt", min_revision=written.revision, mode=2)
    stub = services.search_stub()
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.RebuildIndex(search_pb2.RebuildIndexRequest(), metadata=caller(user, ("read", "write")))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The owner's session (a user identity) may rebuild; so may an admin key.
    session = caller_metadata(user, (), kind="user")
    answer = await stub.RebuildIndex(search_pb2.RebuildIndexRequest(), metadata=session)
    assert answer.index_status.state in (search_pb2.IndexStatus.REBUILDING, search_pb2.IndexStatus.READY)
    answer = await stub.RebuildIndex(search_pb2.RebuildIndexRequest(), metadata=caller(user, ("admin",)))
    assert answer.index_status.state in (search_pb2.IndexStatus.REBUILDING, search_pb2.IndexStatus.READY)
    manager = services.manager
    for _ in range(1000):
        status = await stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), metadata=caller(user))
        if status.state == search_pb2.IndexStatus.READY and not manager.rebuilding(user):
            break
        await services.search(user, "rebuilt")
    after = await services.search(user, "rebuilt", min_revision=written.revision, mode=2)
    assert [(f.path, f.match_count) for f in after.file_matches] == [
        (f.path, f.match_count) for f in before.file_matches
    ]
    assert status.document_count == 2


async def test_an_index_of_another_state_version_is_rebuilt_at_start(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    user = await user_factory()
    written = await services.write(user, {"v/a.txt": "versioned marker\n"})
    async with _server(services, database_url, tmp_path / "old") as first:
        before = await first.search(user, "versioned", min_revision=written.revision)
    state = tmp_path / "old" / str(user) / "state.json"
    body = json.loads(state.read_text())
    state.write_text(json.dumps({**body, "version": body["version"] + 1}))
    async with _server(services, database_url, tmp_path / "old") as second:
        after = await second.search(user, "versioned", min_revision=written.revision)
    assert paths(after) == paths(before) == ["v/a.txt"]
    rewritten = json.loads(state.read_text())
    assert rewritten["version"] == body["version"] and rewritten["rebuilt_at"] > body["rebuilt_at"]


async def test_without_listen_url_polling_and_waiters_keep_reads_fresh(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    user = await user_factory()
    async with _server(
        services, database_url, tmp_path / "poll", listen_url="", poll_interval=30.0
    ) as polled:
        await polled.search(user, "warm")
        for i in range(3):
            written = await polled.write(user, {f"p/{i}.txt": f"polled marker {i}\n"})
            # No notification arrives; the waiting search asks the tailer for a poll itself.
            found = await polled.search(user, f"polled marker {i}", min_revision=written.revision)
            assert paths(found) == [f"p/{i}.txt"]
