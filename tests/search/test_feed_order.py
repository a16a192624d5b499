"""The change-feed tailer never misses a change committed out of revision order (tailer.py's rule).

Writers are forced into an interleaving with explicit transactions on the session database:
revision r1 is drawn first but committed last. Until it commits, the tenant's covered revision
must stay below r1 (so a search demanding r2 > r1 cannot answer), while r2's document is
already searchable; once r1 commits, a search demanding r2 sees both documents. A long
transaction that holds an xid but writes no document must not hold anyone back.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import grpc
import pytest
from kotadb.v1 import search_pb2

from tests.conftest import UserFactory
from tests.search.conftest import Services, caller, paths


async def _insert(conn: Any, user: uuid.UUID, path: str, text: str) -> int:
    revision: int = await conn.fetchval(
        "insert into public.documents (user_id, path, content) values ($1, $2, $3) returning revision",
        user,
        path,
        text,
    )
    return revision


async def _covered(services: Services, user: uuid.UUID) -> int:
    status = await services.search_stub().GetIndexStatus(
        search_pb2.GetIndexStatusRequest(), metadata=caller(user)
    )
    return int(status.revision)


async def test_a_lower_revision_committed_later_is_not_skipped(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    alice = await user_factory()
    await services.search(alice, "warmup")  # builds alice's (empty) index
    async with pool.acquire() as slow, pool.acquire() as fast:
        slow_tx = slow.transaction()
        await slow_tx.start()
        r1 = await _insert(slow, alice, "first.txt", "ordered needle one\n")
        async with fast.transaction():
            r2 = await _insert(fast, alice, "second.txt", "ordered needle two\n")
        assert r1 < r2
        # r2 is visible and applied at once, but the index cannot claim to cover it yet.
        with pytest.raises(grpc.aio.AioRpcError) as waiting:
            await services.search(alice, "ordered needle", min_revision=r2, timeout={"seconds": 1})
        assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _covered(services, alice) < r1
        seen = await services.search(alice, "ordered needle")
        assert paths(seen) == ["second.txt"]
        await slow_tx.commit()
    both = await services.search(alice, "ordered needle", min_revision=r2)
    assert sorted(paths(both)) == ["first.txt", "second.txt"]
    assert both.index_revision >= r2


async def test_interleaved_tenants_each_see_all_their_writes(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    alice, bob = await user_factory(), await user_factory()
    for user in (alice, bob):
        await services.search(user, "warmup")
    async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        ra = await _insert(a, alice, "a1.txt", "braid strand\n")
        rb = await _insert(b, bob, "b1.txt", "braid strand\n")
        async with c.transaction():
            rc = await _insert(c, alice, "a2.txt", "braid strand\n")
        await tb.commit()
        bob_seen = await services.search(bob, "braid", min_revision=rb)
        assert paths(bob_seen) == ["b1.txt"]
        await ta.commit()
    alice_seen = await services.search(alice, "braid", min_revision=max(ra, rc))
    assert sorted(paths(alice_seen)) == ["a1.txt", "a2.txt"]


async def test_a_long_transaction_that_writes_no_document_does_not_stall(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    alice = await user_factory()
    await services.search(alice, "warmup")
    async with pool.acquire() as idle:
        tx = idle.transaction()
        await tx.start()
        # An xid held open: pg_snapshot_xmin stays at it until this transaction ends.
        held = await idle.fetchval("select pg_current_xact_id()::text")
        written = await services.write(alice, {"late.txt": "unstalled marker\n"})
        xmin = await pool.fetchval("select pg_snapshot_xmin(pg_current_snapshot())::text")
        assert xmin == held  # the plain xmin rule would wait for this transaction
        found = await services.search(alice, "unstalled marker", min_revision=written.revision)
        assert paths(found) == ["late.txt"]
        await tx.rollback()
