"""StreamSearchCode: batches of files, then a summary; per tenant; a caller that leaves cancels the work."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
from kotadb.v1 import search_pb2

from services.search import convert
from services.search.searches import Searches
from services.search.servicer import STREAM_BATCH_FILES
from services.search.streams import StreamBatch
from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details
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
    found = None
    for millis in (1, 2, 4, 8, 16, 32, 64):
        try:
            found = await services.search(
                user,
                # No usable trigram: a bounded scan, cut by the timeout.
                "(a|b)[0-9]{2}(c|d).*z",
                regex=True,
                mode=search_pb2.SEARCH_MODE_EXHAUSTIVE,
                timeout={"nanos": millis * 1_000_000},
            )
            break
        except grpc.aio.AioRpcError as refused:
            # A budget spent before the engine started (a busy host) is DEADLINE_EXCEEDED,
            # never INTERNAL; a larger one lets the scan start.
            assert refused.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert unpack_details(status_details(refused))["ErrorInfo"].reason == "SEARCH_DEADLINE"
    assert found is not None
    assert found.limit_hit and found.limit_reason == search_pb2.SearchStats.DEADLINE
    assert found.stats.full_scan


async def _stream(
    services: Services, user: uuid.UUID, **fields: object
) -> list[search_pb2.StreamSearchCodeResponse]:
    call = services.search_stub().StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(**fields),  # type: ignore[arg-type]
        metadata=caller(user),
    )
    return [m async for m in call]


async def test_streamed_files_equal_the_exhaustive_search(
    services: Services, user_factory: UserFactory
) -> None:
    user = await user_factory()
    files = {
        f"src/m{i:02d}.py": (
            f"import os\n\ndef handler_{i}(needle):\n    # needle once\n    return needle + {i}\n"
            + "pad\n" * i
            + "# naïve needle ünïcode\n"
        )
        for i in range(45)
    }
    # More matching lines than max_matches_per_file: the entry is cut, its count stays true.
    files["src/many.txt"] = "".join(f"needle {n}\n" for n in range(80))
    files["docs/none.md"] = "nothing to see\n"
    written = await services.write(user, files)
    for fields in (
        {"query": "needle", "context_lines": 2},
        {"query": "needl[e]", "regex": True},
        {"query": "needle file:m0"},
        {"query": "handler_1"},
        {"query": "sym:handler_3", "context_lines": 1},
    ):
        messages = await _stream(services, user, min_revision=written.revision, **fields)
        exhaustive = await services.search(
            user, page_size=1000, mode=search_pb2.SEARCH_MODE_EXHAUSTIVE, **fields
        )
        streamed = [f for m in messages[:-1] for f in m.file_matches]
        assert {f.path: f for f in streamed} == {f.path: f for f in exhaustive.file_matches}, fields
        assert len(streamed) == len(exhaustive.file_matches) > 0
        summary = messages[-1]
        assert summary.done and not summary.file_matches
        assert (summary.total_file_count, summary.total_match_count) == (
            exhaustive.total_file_count,
            exhaustive.total_match_count,
        )
    many = next(
        f
        for m in await _stream(services, user, query="needle")
        for f in m.file_matches
        if f.path == "src/many.txt"
    )
    assert many.match_count == 80 and len(many.line_matches) == 50


async def test_the_first_batch_leaves_before_the_search_has_finished(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    user = await user_factory()
    count = 1200
    # Every file matches once: 60 batches, far more than the stream's queue holds.
    await pool.execute(
        "insert into public.documents (user_id, path, content)"
        " select $1, 'big/' || lpad(i::text, 5, '0') || '.txt',"
        " repeat(md5(i::text) || E'\\n', 20) || 'needle ' || i || E'\\n'"
        " from generate_series(1, $2) i",
        user,
        count,
    )
    head = int(
        await pool.fetchval("select max(revision) from public.document_changes where user_id = $1", user)
    )
    await services.search(user, "warm", min_revision=head)
    manager = services.manager

    # Over gRPC: the first batch says the engine had verified only its own files when it was
    # cut, out of the 1200 the whole search verifies.
    call = services.search_stub().StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(query="needle"), metadata=caller(user)
    )
    messages = [m async for m in call]
    first, summary = messages[0], messages[-1]
    assert len(first.file_matches) == STREAM_BATCH_FILES and not first.done
    assert first.stats.files_verified == STREAM_BATCH_FILES
    assert summary.done and summary.total_file_count == count
    assert summary.stats.files_verified == count
    streamed = [f.path for m in messages for f in m.file_matches]
    assert len(streamed) == len(set(streamed)) == count

    # Under the servicer (no transport buffers in between): while the consumer holds the first
    # batch, the producer can run at most the queue's few batches ahead, so the search is
    # still running, blocked on its bounded queue; closing the stream cancels it.
    searches = Searches(manager.settings, manager)
    query = convert.stream_query_from_proto(search_pb2.StreamSearchCodeRequest(query="needle"))
    parts = searches.stream(user, query, 0, None, STREAM_BATCH_FILES, lambda batch: batch)
    batch = await parts.__anext__()
    assert isinstance(batch, StreamBatch) and batch.verified == STREAM_BATCH_FILES
    assert manager.active_searches == 1
    cancelled = manager.cancelled_searches
    await parts.aclose()
    for _ in range(2000):
        if manager.active_searches == 0:
            break
        await asyncio.sleep(0.01)
    assert manager.active_searches == 0 and manager.cancelled_searches == cancelled + 1
