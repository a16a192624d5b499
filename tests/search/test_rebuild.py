"""Rebuilding a tenant from Postgres (rebuild.py, buildstream.py): same index, bounded, cancellable.

Documents are written through the ingest RPC (tree-sitter symbols stored by ingest), plus
symbol rows written directly with the shapes ingest may leave (no qualified name, no parent,
multi-byte names). Then:

* the stream's packed symbols equal the engine's own encoding of the stored symbols, and a
  build equals an index written document by document from `SearchStore.documents` (the
  Symbol-object path the tailer uses);
* a build whose fetch runs ahead of the writer and whose segments are built in worker
  processes yields the same documents, symbols and search results as a sequential one;
* with a slow writer, the fetch runs ahead only as far as its queue allows;
* a build cancelled mid-way (as on shutdown) leaves no directory, connection or process behind;
* the first search of a tenant starts its build, which goes on when that caller goes away, and
  ends cleanly when the server stops.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.common.server import LazyPool
from services.search import rebuild
from services.search.buildstream import TenantSize, open_stream
from services.search.config import SearchSettings
from services.search.engine.index.builder import encode_symbols
from services.search.engine.index.index import Index
from services.search.engine.index.writer import IndexWriter
from services.search.engine.search.results import SearchMode
from services.search.engine.search.searcher import Searcher
from services.search.rebuild import Built, build_tenant, source_document
from services.search.store import SearchStore
from services.search.tailer import RevisionRule
from tests.conftest import UserFactory
from tests.search.conftest import Services, start_search_server

PY = """class Shape{i}:
    \"\"\"A shape.\"\"\"

    def area_{i}(self) -> float:
        return {i} * 2.5

    def naïve_{i}(self) -> str:
        return "ünïcode {i}"


def helper_{i}(x: int) -> int:
    return x + {i}
"""


@pytest.fixture
async def build_pool(database_url: str) -> AsyncIterator[LazyPool]:
    """build_pool is a pool of the test's own, so its connections can be counted."""
    pool = LazyPool(SearchSettings(database_url=database_url))
    await pool.connect()
    try:
        yield pool
    finally:
        await pool.close(5)


async def _tenant(services: Services, user_factory: UserFactory, pool: asyncpg.Pool) -> uuid.UUID:
    """_tenant writes a tenant of 14 documents (12 with symbols) and adds odd symbol rows to one."""
    user = await user_factory()
    files = {f"pkg/mod_{i:02d}.py": PY.format(i=i) for i in range(12)}
    files["README.md"] = "a tenant to rebuild\n"
    files["notes/ünï.txt"] = "multi-byte path\n"
    await services.write(user, files)
    document = await pool.fetchval(
        "select id from public.documents where user_id = $1 and path = 'pkg/mod_03.py'", user
    )
    # Shapes ingest may store: no qualified name, no parent, multi-byte names, equal start lines.
    await pool.executemany(
        "insert into public.symbols (document_id, user_id, name, kind, qualified_name, start_line,"
        " end_line, name_start_byte, name_end_byte, parent) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        [
            (document, user, "ζeta", "function", None, 2, 3, 4, 8, None),
            (document, user, "λ", "variable", "Shape3.λ", 2, 2, 0, 2, "Shape3"),
            (document, user, "zz_last", "constant", "zz_last", 40, 41, 1, 8, ""),
        ],
    )
    return user


def _documents(path: Path) -> dict[str, tuple[Any, ...]]:
    """_documents reads every live document of an index: names, content and decoded symbols."""
    found: dict[str, tuple[Any, ...]] = {}
    with Index.open(path) as index, index.snapshot() as snap:
        for segment in snap.segments:
            for ordinal in segment.live:
                record = segment.doc(ordinal)
                found[record.external_id] = (
                    record.path,
                    record.repository,
                    record.language,
                    bytes(segment.content(ordinal)),
                    segment.symbols(ordinal),
                )
    return found


def _answers(path: Path) -> list[Any]:
    """_answers runs a few exhaustive searches; each answer as the sorted (path, line numbers) pairs."""
    out: list[Any] = []
    with Index.open(path) as index:
        searcher = Searcher(index)
        queries = (("def ", False), ("ünïcode", False), (r"return \d+ \* 2\.5", True), ("sym:helper_", False))
        for query, regex in queries:
            result = searcher.search(query, limit_files=1000, mode=SearchMode.EXHAUSTIVE, regex=regex)
            out.append(sorted((f.path, tuple(m.line_number for m in f.line_matches)) for f in result.files))
        searcher.close()
    return out


async def _build(
    services: Services, pool: LazyPool, tenant: uuid.UUID, data_dir: Path, executor: Any = None, **opts: Any
) -> Built:
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    manager = services.manager
    with executor or ThreadPoolExecutor(2) as pool_executor:
        return await build_tenant(
            pool, RevisionRule(), manager.store, tenant, data_dir, pool_executor, durable=False, **opts
        )


async def test_packed_symbols_and_the_build_equal_the_symbol_object_path(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool, build_pool: LazyPool, tmp_path: Path
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    store = SearchStore(build_pool)
    ids = [r["id"] for r in await pool.fetch("select id from public.documents where user_id = $1", tenant)]
    rows = await store.documents(tenant, ids)

    for connections in (1, 2, 3):
        streamed: list[str] = []
        async with open_stream(build_pool, tenant, 5, symbol_connections=connections) as stream:
            assert stream.size.documents == len(rows) == 14
            async for batch in stream.batches():
                for found in batch:
                    reference = source_document(rows[uuid.UUID(found.document.external_id)])
                    assert found.document.content == reference.content
                    assert found.symbols == encode_symbols(reference.symbols)
                    assert found.symbol_count == len(reference.symbols)
                    streamed.append(found.document.path)
        assert sorted(streamed) == sorted(r.path for r in rows.values())  # each document once
    assert sum(len(r.symbols) for r in rows.values()) > 12 * 4  # ingest stored symbols, plus ours

    built = await _build(services, build_pool, tenant, tmp_path / "data", batch=4, queued=1)
    assert built.stats.documents == 14
    reference_dir = tmp_path / "reference"
    with Index.create(reference_dir) as index, IndexWriter(index) as writer:
        for row in rows.values():
            writer.add(source_document(row))
        writer.commit()
    assert _documents(built.path / rebuild.INDEX_DIR) == _documents(reference_dir)


async def test_a_concurrent_build_in_worker_processes_equals_a_sequential_one(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool, build_pool: LazyPool, tmp_path: Path
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    sequential = await _build(
        services, build_pool, tenant, tmp_path / "seq", batch=100, queued=1, workers=lambda _: 0
    )
    concurrent = await _build(
        services,
        build_pool,
        tenant,
        tmp_path / "conc",
        batch=2,
        queued=3,
        workers=lambda _: 2,
        flush_bytes=600,  # several segments, built by the two worker processes
    )
    assert sequential.stats.workers == 0 and concurrent.stats.workers == 2
    with Index.open(concurrent.path / rebuild.INDEX_DIR) as index:
        assert len(index.manifest.segments) > 1
    assert sequential.state.revision == concurrent.state.revision
    seq_dir, conc_dir = sequential.path / rebuild.INDEX_DIR, concurrent.path / rebuild.INDEX_DIR
    assert _documents(conc_dir) == _documents(seq_dir)
    answers = _answers(seq_dir)
    assert all(answers) and _answers(conc_dir) == answers
    assert _segment_workers() == []


def _segment_workers() -> list[multiprocessing.process.BaseProcess]:
    """_segment_workers lists the writer's spawned processes still alive (ingest's forkserver aside)."""
    return [p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")]


class _SlowAdds(ThreadPoolExecutor):
    """_SlowAdds is a write executor whose document batches take `delay` seconds longer."""

    def __init__(self, delay: float) -> None:
        super().__init__(2)
        self.delay = delay

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is rebuild.add_documents:
            delay = self.delay

            def slow(*inner: Any) -> Any:
                time.sleep(delay)
                return fn(*inner)

            return super().submit(slow, *args)
        return super().submit(fn, *args, **kwargs)


async def test_the_fetch_runs_ahead_of_a_slow_writer_only_as_far_as_its_queue(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool, build_pool: LazyPool, tmp_path: Path
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    built = await _build(
        services, build_pool, tenant, tmp_path / "slow", executor=_SlowAdds(0.3), batch=1, queued=2
    )
    stats = built.stats
    assert stats.fetched_batches == stats.indexed_batches == stats.documents == 14
    # One batch being indexed, `queued` waiting, one held by the blocked put: never more.
    assert 2 <= stats.max_ahead <= 2 + 2
    assert stats.fetching < stats.indexing  # the writer, not the fetch, was the bottleneck


async def test_a_cancelled_build_leaves_nothing_behind(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool, build_pool: LazyPool, tmp_path: Path
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    data_dir = tmp_path / "cancelled"
    data_dir.mkdir()
    progressed = asyncio.Event()
    task = asyncio.create_task(
        _build(
            services,
            build_pool,
            tenant,
            data_dir,
            executor=_SlowAdds(0.3),
            batch=1,
            queued=2,
            workers=lambda _: 2,
            flush_bytes=600,
            on_progress=lambda _n: progressed.set(),
        )
    )
    await asyncio.wait_for(progressed.wait(), 60)
    assert list(data_dir.iterdir())  # the build directory exists while it runs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(data_dir.iterdir()) == []
    assert build_pool.connections("in_use") == 0
    assert _segment_workers() == []
    # The pool's connections are usable again: the stream's transactions were ended.
    async with open_stream(build_pool, tenant, 100) as stream:
        assert stream.size == TenantSize(14, stream.size.bytes) and stream.size.bytes > 0


async def test_a_caller_going_away_does_not_cancel_the_build_it_started(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    manager = services.manager
    caller = asyncio.create_task(manager.get(tenant))
    for _ in range(3):
        await asyncio.sleep(0)  # the build has started: its first queries are in flight
    assert not manager.is_open(tenant)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    deadline = time.monotonic() + 60
    while not manager.is_open(tenant):
        assert time.monotonic() < deadline, "the build was abandoned with its first caller"
        await asyncio.sleep(0.05)
    opened = await manager.get(tenant)
    with opened.index.snapshot() as snap:
        assert snap.doc_count == 14


async def test_stopping_the_server_ends_a_first_build_cleanly(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    tenant = await _tenant(services, user_factory, pool)
    data_dir = tmp_path / "stopping"
    server, manager, _address = await start_search_server(database_url, data_dir)
    try:
        caller = asyncio.create_task(manager.get(tenant))
        for _ in range(3):
            await asyncio.sleep(0)  # the opening task runs: its build has started
        assert not manager.is_open(tenant)
    finally:
        await server.stop(0)
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not manager.is_open(tenant)
    assert [p.name for p in data_dir.iterdir() if p.name.startswith((".build-", ".old-"))] == []
    assert not (data_dir / str(tenant)).exists()
    assert _segment_workers() == []
