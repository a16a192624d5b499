"""streams holds StreamSearchCode's work: matching files sent in batches as they are verified.

A streamed search walks the engine's `MatchStream` (engine/search/stream.py) over one pinned
snapshot, in index order (segment by segment, documents in the order they were added): the
stream rejects non-matching candidates with its native matchers, and each file it yields
becomes the same result entry an exhaustive SearchCode builds for that file (`Run.check`
scores it, `hits.file_match` builds its lines), so a streamed file equals its exhaustive
counterpart; only the order differs (index order, not rank). Every `batch_files` files are
handed to `emit` at once, so the first batch leaves while later candidates are still being
verified. A matching file is verified twice (natively by the stream, then scored with its
line matches by `Run.check`); non-matching candidates, usually the most, only once.

Memory stays bounded: `emit` blocks while the caller's queue is full (a slow client stalls the
search instead of piling batches up), each entry builds at most `max_lines` line matches, and
once `limit` files were sent the rest of the stream only counts (no line objects), which keeps
the totals exact. The cancellation event (set when the client goes away) and the deadline are
checked between files by the stream, and by `emit` while it waits for room.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from services.search.engine import record
from services.search.engine.errors import SearchCancelled
from services.search.engine.index.reader import SegmentReader
from services.search.engine.query.plan import All
from services.search.engine.search.hits import Hit, file_match
from services.search.engine.search.request import SearchRequest
from services.search.engine.search.results import FileMatch, SearchResult, SearchStats
from services.search.engine.search.searcher import Searcher
from services.search.engine.search.searchrun import Run

B = TypeVar("B")

# Seconds a producer blocked on a full queue waits before looking at the cancellation event again.
EMIT_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class StreamBatch:
    """StreamBatch is one batch of a streamed search: its files and the candidates verified so far.

    `verified` counts the candidates the engine had verified when the batch was cut (a
    progress figure: it is below the final `files_verified` whenever the batch left before
    the run finished); `revision` is the revision the index covered.
    """

    files: tuple[FileMatch, ...]
    verified: int
    revision: int


Emit = Callable[[tuple[FileMatch, ...], int], None]


def stream_files(
    searcher: Searcher,
    request: SearchRequest,
    *,
    limit: int,
    batch_files: int,
    max_lines: int,
    emit: Emit,
    cancel: threading.Event,
) -> SearchResult:
    """stream_files runs `request` as a stream, emits its first `limit` files in batches, returns totals.

    The returned result has no files (they were emitted); its counts are exact unless
    `limit_hit` says the deadline cut the stream.
    """
    started = time.perf_counter()
    with searcher.stream(
        request.query, regex=request.regex, deadline=request.deadline, cancel=cancel
    ) as stream:
        snap = stream.snap
        run = Run(searcher.context(), snap, stream.tree, request, None, b"")
        batch: list[FileMatch] = []
        sent = 0
        for found in stream:
            if sent >= limit:
                continue  # counted by the stream only
            hit = run.check(found.segment, found.ordinal)
            if hit is None:
                continue
            batch.append(_entry(snap.segments[found.segment], hit, request, max_lines))
            sent += 1
            if sent == limit:
                # The rest only counts matching lines, natively: totals stay exact, no line objects.
                stream.lines = False
            if len(batch) == batch_files:
                emit(tuple(batch), stream.verified)
                batch = []
        if batch:
            emit(tuple(batch), stream.verified)
        stats = SearchStats(
            candidates=stream.candidates,
            files_verified=stream.verified,
            segments_searched=len(snap.segments),
            duration_seconds=time.perf_counter() - started,
            scan_fallback=isinstance(stream.tree.plan, All),
            exact_order=True,
            plan=str(stream.tree.plan),
        )
        return SearchResult(
            files=(),
            file_count=stream.file_count,
            match_count=stream.match_count,
            limit_hit=stream.limit_reason is not None,
            limit_reason=stream.limit_reason,
            stats=stats,
            generation=snap.generation,
        )


def _entry(segment: SegmentReader, hit: Hit, request: SearchRequest, max_lines: int) -> FileMatch:
    """_entry builds a file's result entry with at most `max_lines` line matches (its count stays true)."""
    context, symbols = request.context_lines, request.with_symbols
    if len(hit.lines) <= max_lines:
        return file_match(segment, hit, context_lines=context, with_symbols=symbols)
    shown = record.replace(hit, lines=hit.lines[:max_lines])
    entry = file_match(segment, shown, context_lines=context, with_symbols=symbols)
    return record.replace(entry, match_count=len(hit.lines))


def queue_emitter(
    queue: asyncio.Queue[B],
    loop: asyncio.AbstractEventLoop,
    revision: int,
    cancel: threading.Event,
    render: Callable[[StreamBatch], B],
) -> Emit:
    """queue_emitter returns an `emit` that puts batches on a loop's bounded queue from a worker thread.

    Each batch is put as `render(batch)`: the servicer's proto conversion runs in the worker
    thread, so the event loop only hands finished messages on. It blocks while the queue is full and raises
    SearchCancelled once `cancel` is set, so a producer never outruns its consumer nor outlives it.
    """

    def emit(files: tuple[FileMatch, ...], verified: int) -> None:
        message = render(StreamBatch(files, verified, revision))
        put = asyncio.run_coroutine_threadsafe(queue.put(message), loop)
        while True:
            try:
                put.result(timeout=EMIT_POLL_SECONDS)
                return
            except TimeoutError:
                if cancel.is_set():
                    put.cancel()
                    raise SearchCancelled("search cancelled") from None

    return emit
