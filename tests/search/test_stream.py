"""StreamSearchCode: batches of files, then a summary; per tenant; a caller that leaves cancels the work."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
from kotadb.v1 import search_pb2

from services.search.servicer import STREAM_BATCH_FILES
from tests.conftest import UserFactory
from tests.search.conftest import Services, caller


async def test_stream_sends_batches_then_a_summary_for_the_caller_only(
    services: Services, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    files = {f"s/{i:03d}.txt": f"streamed needle {i}\n" for i in range(STREAM_BATCH_FILES * 2 + 5)}
    written = await services.write(alice, files)
    await services.write(bob, {"bob.txt": "streamed needle\n"})
    call = services.search_stub().StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(query="streamed needle", min_revision=written.revision),
        metadata=caller(alice),
    )
    messages = [m async for m in call]
    assert len(messages) == 4 and [m.done for m in messages] == [False, False, False, True]
    streamed = [f.path for m in messages for f in m.file_matches]
    assert sorted(streamed) == sorted(files)
    summary = messages[-1]
    assert summary.total_file_count == len(files) and summary.total_match_count == len(files)
    assert not summary.limit_hit and summary.index_revision >= written.revision

    capped = [
        m
        async for m in services.search_stub().StreamSearchCode(
            search_pb2.StreamSearchCodeRequest(query="streamed needle", max_file_count=3),
            metadata=caller(alice),
        )
    ]
    # The stream stops at 3 files; the totals stay exact.
    assert sum(len(m.file_matches) for m in capped) == 3 and capped[-1].total_file_count == len(files)


async def _bulk(pool: asyncpg.Pool, user: uuid.UUID, count: int) -> None:
    # Straight into Postgres (as the owner): enough content that one regex scan takes a while.
    await pool.execute(
        "insert into public.documents (user_id, path, content)"
        " select $1, 'bulk/' || i || '.txt', repeat(md5(i::text) || E'\\n', 2000)"
        " from generate_series(1, $2) i",
        user,
        count,
    )


async def test_a_client_that_goes_away_cancels_its_search(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    user = await user_factory()
    await _bulk(pool, user, 1500)
    head = int(
        await pool.fetchval("select max(revision) from public.document_changes where user_id = $1", user)
    )
    await services.search(user, "warm", min_revision=head)
    manager = services.manager
    cancelled = manager.cancelled_searches
    for _ in range(5):
        call = services.search_stub().StreamSearchCode(
            # No usable trigram: every line of every document is verified.
            search_pb2.StreamSearchCodeRequest(query="(a|b)[0-9]{2}(c|d).*z", regex=True),
            metadata=caller(user),
        )
        for _ in range(100_000):
            if manager.active_searches or call.done():
                break
            await asyncio.sleep(0.001)
        call.cancel()
        for _ in range(2000):
            if manager.active_searches == 0:
                break
            await asyncio.sleep(0.01)
        assert manager.active_searches == 0
        if manager.cancelled_searches > cancelled:
            break
    assert manager.cancelled_searches > cancelled
    assert call.cancelled() or (await call.code()) == grpc.StatusCode.CANCELLED


async def test_a_search_past_its_timeout_reports_the_deadline(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    user = await user_factory()
    await _bulk(pool, user, 600)
    head = int(
        await pool.fetchval("select max(revision) from public.document_changes where user_id = $1", user)
    )
    await services.search(user, "warm", min_revision=head)
    found = await services.search(
        user,
        # No usable trigram: a bounded scan, cut by the 1 ms timeout.
        "(a|b)[0-9]{2}(c|d).*z",
        regex=True,
        mode=search_pb2.SEARCH_MODE_EXHAUSTIVE,
        timeout={"nanos": 1_000_000},
    )
    assert found.limit_hit and found.limit_reason == search_pb2.SearchStats.DEADLINE
    assert found.stats.full_scan
