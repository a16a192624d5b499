"""rebuild builds a tenant's index from Postgres, and holds the tenant directory's layout and state file.

Layout of the search volume (`KOTADB_SEARCH_DATA_DIR`)::

    <data_dir>/
      cursor.key                 random page-token key, when no cursor secret is configured
      <tenant uuid>/             one tenant, replaced whole by a rebuild
        state.json               {"version", "tenant", "revision", "rebuilt_at"}
        index/                   the engine's index directory (engine/index/format.py)
      .build-<tenant>-<hex>/     a build in progress (removed at start)
      .old-<tenant>-<hex>/       a replaced build being deleted (removed at start)

`state.json` is written after the index commit it describes, so it never claims more than the
index holds: a crash between the two leaves an older revision, and replaying changes is
idempotent (each change re-reads the document's current row). A build streams the tenant's
live, indexable documents from one REPEATABLE READ snapshot with a server-side cursor, content
and symbols as stored by ingest (nothing is re-parsed; buildstream.py), into a new directory
that then replaces the tenant's directory.

A build is a pipeline: the fetch task reads batches at most `QUEUED_BATCHES` ahead of the
writer (several Postgres backends in one snapshot: documents, and the symbols of earlier
batches), the writer adds them in the write thread, and a tenant above one segment has its segments built by
`BUILD_WORKERS` processes, so the database, this process and the segment builders use the
cores at once. Memory is bounded by the queue (a few batches of documents) plus the writer's
segments in flight (one per worker, each a few times `BUILD_FLUSH_BYTES`). Each phase is timed
(`BuildStats`) and logged with the result.

Measured on Linux 6.1 loaded through ingest (see BENCHMARKS.md, search service).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from services.common.server import LazyPool
from services.search.buildstream import BuildDocument, BuildStream, TenantSize, open_stream
from services.search.engine.index.index import Index
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument, Symbol
from services.search.store import DocumentRow, SearchStore
from services.search.tailer import RevisionRule

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_VERSION = 1
STATE_FILE = "state.json"
INDEX_DIR = "index"
# Segment size of a build: the engine's default, so a large tenant gets the offline build's segments
# (peak memory is a few times this per segment worker; segments this large are never merged again).
BUILD_FLUSH_BYTES = 64 << 20
# Processes building segments for a tenant above one segment: both cores of the target machine.
BUILD_WORKERS = 2
# Batches the fetch may read ahead of the writer (memory: this many batches of build_batch_rows).
QUEUED_BATCHES = 4
# A build logs its progress every this many documents.
PROGRESS_EVERY = 10000


@dataclass(frozen=True, slots=True)
class TenantState:
    """TenantState is a tenant directory's state file: the covered revision and the last rebuild."""

    tenant: uuid.UUID
    revision: int
    rebuilt_at: float

    def save(self, directory: Path) -> None:
        """save writes the state file atomically (temporary file, fsync, rename)."""
        body = {
            "version": STATE_VERSION,
            "tenant": str(self.tenant),
            "revision": self.revision,
            "rebuilt_at": self.rebuilt_at,
        }
        tmp = directory / f".{STATE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(body, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / STATE_FILE)

    @staticmethod
    def load(directory: Path, tenant: uuid.UUID) -> TenantState | None:
        """load reads the state file; None when missing, malformed, of another version or tenant."""
        try:
            body = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
            if body.get("version") != STATE_VERSION or body.get("tenant") != str(tenant):
                return None
            return TenantState(tenant, int(body["revision"]), float(body["rebuilt_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def source_document(row: DocumentRow) -> SourceDocument:
    """source_document turns a stored document and its symbols into the engine's input."""
    return SourceDocument(
        external_id=str(row.id),
        path=row.path,
        content=row.content.encode("utf-8"),
        repository=row.repository,
        language=row.language,
        symbols=tuple(
            Symbol(
                name=s.name,
                kind=s.kind,
                qualified_name=s.qualified_name,
                start_line=s.start_line,
                end_line=s.end_line,
                start_byte=s.name_start_byte,
                end_byte=s.name_end_byte,
                parent=s.parent,
            )
            for s in row.symbols
        ),
    )


def add_documents(writer: IndexWriter, documents: Sequence[BuildDocument]) -> None:
    """add_documents adds a fetched batch to an open writer (runs in the write thread)."""
    for found in documents:
        writer.add(found.document, packed_symbols=(found.symbols, found.symbol_count))


def clean_leftovers(data_dir: Path) -> None:
    """clean_leftovers removes builds and replaced directories a crash left behind."""
    if not data_dir.is_dir():
        return
    for entry in data_dir.iterdir():
        if entry.name.startswith((".build-", ".old-")):
            shutil.rmtree(entry, ignore_errors=True)


@dataclass(slots=True)
class BuildStats:
    """BuildStats is what one build read and where its time went, in seconds.

    `fetching` is the time the index writer waited for Postgres (the fetch runs alongside
    indexing, so this is only the part it did not hide), `indexing` the time spent adding
    documents (segments are built meanwhile), `writing` the final commit (the last segments,
    fsync, the manifest), `total` everything from the first query to the finished directory.
    """

    documents: int = 0
    bytes: int = 0
    symbols: int = 0
    workers: int = 0
    fetching: float = 0.0
    indexing: float = 0.0
    writing: float = 0.0
    total: float = 0.0
    fetched_batches: int = 0
    indexed_batches: int = 0
    max_ahead: int = 0
    """max_ahead is the most batches fetched and not yet indexed at once (the queue's memory bound)."""

    def fields(self) -> dict[str, float | int]:
        """fields is the stats as log fields (seconds rounded to milliseconds)."""
        return {
            "documents": self.documents,
            "bytes": self.bytes,
            "symbols": self.symbols,
            "workers": self.workers,
            "fetch_wait_s": round(self.fetching, 3),
            "index_s": round(self.indexing, 3),
            "write_s": round(self.writing, 3),
            "build_s": round(self.total, 3),
        }


@dataclass(frozen=True, slots=True)
class Built:
    """Built is a finished build waiting for `swap_in`: its directory, state file and stats."""

    path: Path
    state: TenantState
    stats: BuildStats


class _Failed:
    """_Failed carries the fetch's error through the queue to the builder."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def segment_workers(size: TenantSize) -> int:
    """segment_workers is how many processes build a tenant's segments: none for a tenant of one segment.

    Starting a process pool costs about a second, which a tenant below one segment never earns back.
    """
    return BUILD_WORKERS if size.bytes > BUILD_FLUSH_BYTES else 0


async def build_tenant(
    pool: LazyPool,
    rule: RevisionRule,
    store: SearchStore,
    tenant: uuid.UUID,
    data_dir: Path,
    executor: Executor,
    *,
    batch: int,
    durable: bool,
    queued: int = QUEUED_BATCHES,
    workers: Callable[[TenantSize], int] = segment_workers,
    flush_bytes: int = BUILD_FLUSH_BYTES,
    on_progress: Callable[[int], None] | None = None,
) -> Built:
    """build_tenant builds the tenant's index from Postgres into a new directory, ready for `swap_in`.

    The fetch (buildstream.py) runs as its own task, at most `queued` batches ahead of the
    writer, which indexes in `executor` and builds segments in `workers(size)` processes: the
    Postgres backend, this process and the segment builders work at once, in bounded memory.
    The watermark is read before the stream's snapshot, so the covered revision it yields obeys
    tailer.py's rule; changes above it are replayed by the tailer.
    """
    loop = asyncio.get_running_loop()
    stats = BuildStats()
    started = time.monotonic()
    build = data_dir / f".build-{tenant}-{secrets.token_hex(4)}"
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=max(1, queued))
    opened: asyncio.Future[BuildStream] = loop.create_future()
    try:
        # Every step that touches the build directory in a thread is settled before a
        # cancellation goes on: otherwise the cleanup below could run before the directory (or
        # an index inside it) exists, and leave it behind.
        await _settled(loop.run_in_executor(executor, lambda: build.mkdir(parents=True)))
        key = await store.tenant_key(tenant)
        watermark = await rule.read(store)
        fetch = asyncio.create_task(
            _fetch(pool, tenant, batch, opened, queue, stats), name=f"search-fetch-{tenant}"
        )
        try:
            stream = await opened
            revision = rule.safe(watermark, stream.snapshot, key)
            stats.workers = workers(stream.size)
            log.info(
                "building the index of tenant %s: %d documents, %.1f MB, %d segment workers",
                tenant,
                stream.size.documents,
                stream.size.bytes / 1e6,
                stats.workers,
            )
            path = build / INDEX_DIR
            index = await _settled(
                loop.run_in_executor(executor, lambda: Index.create(path, durable=durable))
            )
            try:
                writer = await _settled(
                    loop.run_in_executor(
                        executor, lambda: IndexWriter(index, flush_bytes=flush_bytes, workers=stats.workers)
                    )
                )
                try:
                    await _index_all(loop, executor, writer, queue, stats, tenant, on_progress)
                    mark = time.monotonic()
                    await _settled(loop.run_in_executor(executor, lambda: writer.commit(merge=True)))
                    stats.writing = time.monotonic() - mark
                finally:
                    await loop.run_in_executor(executor, writer.close)
            finally:
                index.close()
        finally:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
        state = TenantState(tenant, revision, time.time())
        await loop.run_in_executor(executor, state.save, build)
    except BaseException:
        await _settled(loop.run_in_executor(executor, lambda: shutil.rmtree(build, ignore_errors=True)))
        raise
    stats.total = time.monotonic() - started
    log.info(
        "built the index of tenant %s: %d documents, %.1f MB, %d symbols, revision %d, %.3f s",
        tenant,
        stats.documents,
        stats.bytes / 1e6,
        stats.symbols,
        revision,
        stats.total,
        extra={"fields": {"tenant": str(tenant), "revision": revision, **stats.fields()}},
    )
    return Built(build, state, stats)


async def _settled(future: asyncio.Future[T]) -> T:
    """_settled awaits writer work in a thread; if cancelled, it first lets that work finish.

    The writer is not thread-safe: closing it (on cancellation) while a batch is still being
    added in another thread of the pool could race, so the batch ends first.
    """
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def _fetch(
    pool: LazyPool,
    tenant: uuid.UUID,
    batch: int,
    opened: asyncio.Future[BuildStream],
    queue: asyncio.Queue[object],
    stats: BuildStats,
) -> None:
    """_fetch streams the tenant into `queue` (waiting while it is full), then _END or the error."""
    try:
        async with open_stream(pool, tenant, batch) as stream:
            opened.set_result(stream)
            async for documents in stream.batches():
                stats.fetched_batches += 1
                stats.max_ahead = max(stats.max_ahead, stats.fetched_batches - stats.indexed_batches)
                await queue.put(documents)
        await queue.put(_END)
    except Exception as exc:
        if not opened.done():
            opened.set_exception(exc)
        else:
            await queue.put(_Failed(exc))


async def _index_all(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    writer: IndexWriter,
    queue: asyncio.Queue[object],
    stats: BuildStats,
    tenant: uuid.UUID,
    on_progress: Callable[[int], None] | None,
) -> None:
    """_index_all adds every queued batch to the writer until the fetch ends; raises the fetch's error."""
    started = time.monotonic()
    while True:
        mark = time.monotonic()
        item = await queue.get()
        stats.fetching += time.monotonic() - mark
        if item is _END:
            return
        if isinstance(item, _Failed):
            raise item.error
        documents = cast(list[BuildDocument], item)
        mark = time.monotonic()
        await _settled(loop.run_in_executor(executor, add_documents, writer, documents))
        stats.indexing += time.monotonic() - mark
        stats.indexed_batches += 1
        before = stats.documents
        stats.documents += len(documents)
        stats.bytes += sum(len(d.document.content) for d in documents)
        stats.symbols += sum(d.symbol_count for d in documents)
        if stats.documents // PROGRESS_EVERY > before // PROGRESS_EVERY:
            log.info(
                "building the index of tenant %s: %d documents, %.1f MB so far, %.1f s",
                tenant,
                stats.documents,
                stats.bytes / 1e6,
                time.monotonic() - started,
            )
        if on_progress is not None:
            on_progress(stats.documents)


def swap_in(data_dir: Path, tenant: uuid.UUID, build: Path) -> None:
    """swap_in replaces the tenant's directory by a finished build (two renames, then deletion)."""
    target = data_dir / str(tenant)
    old = None
    if target.exists():
        old = data_dir / f".old-{tenant}-{secrets.token_hex(4)}"
        os.replace(target, old)
    os.replace(build, target)
    with contextlib.suppress(OSError):
        fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
