"""The searcher: a query in, a ranked page of verified matches out, over one index snapshot.

A search runs in four steps, all on one pinned snapshot:

1. Plan. The query (or, with `regex=True`, one RE2 pattern) becomes a trigram plan
   (plan.py) and a match tree (matchtree.py) of content, path, language, repository and
   symbol terms.
2. Candidates. Per segment the plan is evaluated on roaring bitmaps (And is intersection,
   Or is union, All is every document) and intersected with the segment's live set; then
   the cheap terms (path, language, repository) prune candidates without touching content.
3. Verify. Each candidate's stored content is run through the content terms' LineMatchers
   (RE2 semantics, line-oriented), so there are never false positives. The deadline and the
   cancellation event are checked between files; a deadline returns the partial result
   marked `limit_hit` with reason DEADLINE.
4. Rank and page. Matching files get rank.py's score and are ordered by cursor.rank_key;
   only the files on the returned page get their line text, columns, context lines and
   enclosing symbols built.

FIRST_PAGE mode verifies candidates in order of their path prior (ordinary files before
tests, vendored and generated ones) and stops once it has `limit_files` files at
whole-word rank or better, or `OVERSAMPLE` times `limit_files` matching files of any rank,
or when what remains cannot outrank what it has. It then ranks what it found: the page is
good, not provably the best, and `stats.exact_order` says which. EXHAUSTIVE mode verifies
every candidate and counts true totals. A page requested with a cursor is always computed
in exact order, so concatenated pages equal the exhaustive result (after an approximate
first page, they equal it as a set: see cursor.py). A page cut short by the deadline or the
match limit carries no cursor: continuing after it could skip files nobody verified.
Candidates can be verified on a thread pool (see `_Run._verify_parallel` for when it pays).

Wrappers (tenant scoping, logging, limits) implement the `SearchBackend` protocol around a
Searcher instead of branching inside it.
"""

from __future__ import annotations

import collections
import heapq
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pyroaring import BitMap

from services.search.engine import rank
from services.search.engine.cursor import (
    Cursor,
    Position,
    decode_cursor,
    encode_cursor,
    exclusion_digests,
    path_digest,
    query_fingerprint,
    rank_key,
)
from services.search.engine.hits import Hit, HitRow, file_match, hit_from_row, hit_to_row, symbol_table
from services.search.engine.index import Index, Snapshot
from services.search.engine.matchtree import DocFacts, MatchTree, compile_query, compile_regex_query
from services.search.engine.plan import All, And, Empty, Or, Plan, Tri
from services.search.engine.query import Query
from services.search.engine.reader import DocRecord, SegmentReader
from services.search.engine.results import (
    LimitReason,
    SearchMode,
    SearchResult,
    SearchStats,
)
from services.search.engine.symsearch import SymbolCandidate, SymbolSearchResult, search_symbols
from services.search.engine.verify import LineMatch as RawLineMatch

# FIRST_PAGE keeps verifying until it has this many times the page in matching files (of any
# rank) before it gives up looking for better-ranked ones.
OVERSAMPLE = 3
DEFAULT_LIMIT_FILES = 50
# Exact-order searches with at least this many candidates verify on the thread pool, in
# chunks of CHUNK candidates (small enough that a limit or deadline stops promptly).
PARALLEL_MIN = 64
CHUNK = 32
# First pages stop as soon as they have enough, so they hand out smaller chunks.
FIRST_PAGE_CHUNK = 8
# Exact-order searches with at least this many candidates are worth splitting over
# processes (below it, pickling results and waking a worker cost more than they save).
PROCESS_MIN = 1024
# Recently compiled queries kept per searcher.
COMPILED_CACHE = 256


class SearchCancelled(Exception):
    """SearchCancelled is raised when the caller's cancellation event was set mid-search."""


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """SearchRequest is everything a search needs besides the index.

    `query` is query-language text or a parsed Query; with `regex=True` it is one RE2
    pattern taken whole (no query-language parsing), matched case-sensitively unless it
    says `(?i)`. `limit_files` is the page size (None: every matching file);
    `limit_matches` stops counting once that many matching lines were found (reason
    MATCH_LIMIT). `deadline` is a `time.monotonic()` instant. `cursor` continues a previous
    page of the same query on the same snapshot generation. `with_symbols=False` leaves
    out the enclosing symbol of each line (ranking still uses definitions), which saves
    decoding symbol records when a caller only wants lines.
    """

    query: str | Query
    limit_files: int | None = DEFAULT_LIMIT_FILES
    limit_matches: int | None = None
    context_lines: int = 0
    mode: SearchMode = SearchMode.FIRST_PAGE
    cursor: str | None = None
    deadline: float | None = None
    regex: bool = False
    with_symbols: bool = True
    cancel: threading.Event | None = field(default=None, compare=False)


class SearchBackend(Protocol):
    """SearchBackend is what a searcher wrapper implements and wraps."""

    def run(self, request: SearchRequest) -> SearchResult:
        """run executes one search request."""
        ...


def evaluate_plan(plan: Plan, segment: SegmentReader) -> BitMap | None:
    """evaluate_plan returns the segment's ordinals satisfying plan, or None for "every document".

    Deleted ordinals may be included; the caller intersects with the live set.
    """
    if isinstance(plan, All):
        return None
    if isinstance(plan, Empty):
        return BitMap()
    if isinstance(plan, Tri):
        return segment.postings(plan.gram)
    if isinstance(plan, And):
        result: BitMap | None = None
        # Trigram leaves first: they are cheap and usually the most selective.
        for child in sorted(plan.children, key=lambda c: 0 if isinstance(c, Tri) else 1):
            bits = evaluate_plan(child, segment)
            if bits is None:
                continue
            result = bits if result is None else result & bits
            if not result:
                return result
        return result
    if isinstance(plan, Or):
        union = BitMap()
        for child in plan.children:
            bits = evaluate_plan(child, segment)
            if bits is None:
                return None
            union |= bits
        return union
    raise TypeError(f"unknown plan node {plan!r}")


class Searcher:
    """Searcher answers queries over an open Index; it is safe to share between threads.

    `cursor_key` keys the cursors' integrity tag (cursor.py); `clock` is the time source
    deadlines are compared with (`time.monotonic` unless a test supplies its own);
    `workers` threads verify candidates (1, the default: everything on the calling thread;
    see `_Run._verify_parallel` for why more does not pay today); with `processes` > 1,
    exact-order searches with many candidates are split over that many processes (this one
    included; see `_Run._verify_processes`). Call `close` to stop threads and processes.
    """

    def __init__(
        self,
        index: Index,
        *,
        cursor_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        workers: int = 1,
        processes: int = 1,
        process_min: int = PROCESS_MIN,
    ) -> None:
        self.index = index
        self.clock = clock
        self.workers = max(1, workers)
        self.processes = max(1, processes)
        self.process_min = process_min
        self._process_pool: ProcessPoolExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._trees: collections.OrderedDict[tuple[str, bool, bool], MatchTree] = collections.OrderedDict()
        self._compile_lock = threading.Lock()
        self._cursor_key = cursor_key
        self._path_cache: dict[str, tuple[NDArray[np.uint8], NDArray[np.float64]]] = {}
        self._generated: dict[str, dict[int, bool]] = {}
        self._weights_lock = threading.Lock()

    def search(
        self,
        query: str | Query,
        *,
        limit_files: int | None = DEFAULT_LIMIT_FILES,
        limit_matches: int | None = None,
        context_lines: int = 0,
        mode: SearchMode = SearchMode.FIRST_PAGE,
        cursor: str | None = None,
        deadline: float | None = None,
        regex: bool = False,
        with_symbols: bool = True,
        cancel: threading.Event | None = None,
    ) -> SearchResult:
        """search runs one query; see SearchRequest for the arguments."""
        return self.run(
            SearchRequest(
                query=query,
                limit_files=limit_files,
                limit_matches=limit_matches,
                context_lines=context_lines,
                mode=mode,
                cursor=cursor,
                deadline=deadline,
                regex=regex,
                with_symbols=with_symbols,
                cancel=cancel,
            )
        )

    def run(self, request: SearchRequest) -> SearchResult:
        """run executes a SearchRequest on a fresh snapshot of the index."""
        started = time.perf_counter()
        if request.limit_files is not None and request.limit_files < 1:
            raise ValueError("limit_files must be at least 1")
        if request.context_lines < 0:
            raise ValueError("context_lines must not be negative")
        if request.regex and not isinstance(request.query, str):
            raise TypeError("regex=True needs the pattern as a string")
        tree = self._compiled(request.query, request.regex)
        fingerprint = query_fingerprint(str(tree), "regex" if request.regex else "query")
        cursor = None
        if request.cursor:
            cursor = (
                decode_cursor(request.cursor, key=self._cursor_key)
                if self._cursor_key
                else decode_cursor(request.cursor)
            )
        with self.index.snapshot() as snap:
            if cursor is not None:
                cursor.check(generation=snap.generation, fingerprint=fingerprint)
            result = _Run(self, snap, tree, request, cursor, fingerprint).execute()
        stats = replace(result.stats, duration_seconds=time.perf_counter() - started)
        return replace(result, stats=stats)

    def _compiled(self, query: str | Query, regex: bool) -> MatchTree:
        """_compiled parses, plans and compiles a query, reusing recent ones.

        Compiling costs about a millisecond (regex parse, plan, RE2 compile), a tenth of a
        first page's budget; a MatchTree holds no per-search state, so reuse is safe.
        """
        key = (query if isinstance(query, str) else str(query), regex, isinstance(query, str))
        with self._compile_lock:
            tree = self._trees.get(key)
            if tree is not None:
                self._trees.move_to_end(key)
                return tree
        if regex:
            assert isinstance(query, str)
            tree = compile_regex_query(query)
        else:
            tree = compile_query(query)
        with self._compile_lock:
            self._trees[key] = tree
            while len(self._trees) > COMPILED_CACHE:
                self._trees.popitem(last=False)
        return tree

    def symbols(
        self,
        pattern: str,
        *,
        kind: str | None = None,
        limit: int = 50,
        case_sensitive: bool = False,
    ) -> SymbolSearchResult:
        """symbols ranks the definitions of every live document by how well their names match.

        Ranking and counting are symsearch.search_symbols'; this feeds it one snapshot.
        """
        with self.index.snapshot() as snap:

            def candidates() -> Iterator[SymbolCandidate]:
                for segment in snap.segments:
                    for ordinal in segment.live:
                        found = segment.symbols(ordinal)
                        if not found:
                            continue
                        doc = segment.doc(ordinal)
                        for symbol in found:
                            yield SymbolCandidate(symbol, doc.path, doc.repository, doc.language)

            return search_symbols(
                pattern, candidates(), kind=kind, limit=limit, case_sensitive=case_sensitive
            )

    def weights(self, segment: SegmentReader) -> NDArray[np.float64]:
        """weights returns each ordinal's path-only weight (rank.path_weight), cached per segment."""
        return self._path_facts(segment)[1]

    def path_flags(self, segment: SegmentReader) -> NDArray[np.uint8]:
        """path_flags returns each ordinal's path classification: 1 test, 2 vendored, 4 generated."""
        return self._path_facts(segment)[0]

    def _path_facts(self, segment: SegmentReader) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
        # Segments are immutable, so the cache (keyed by segment directory) never goes stale;
        # on the Linux corpus it costs ~0.1 s once and saves two regex searches per verified file.
        key = str(segment.data.path)
        cached = self._path_cache.get(key)
        if cached is not None:
            return cached
        paths = segment.paths
        flags = np.zeros(len(paths), dtype=np.uint8)
        values = np.empty(len(paths), dtype=np.float64)
        for i, path in enumerate(paths):
            test, vendored, generated = rank.path_flags(path)
            flags[i] = (1 if test else 0) | (2 if vendored else 0) | (4 if generated else 0)
            values[i] = rank.path_weight(test=test, vendored=vendored, generated=generated)
        with self._weights_lock:
            self._path_cache[key] = (flags, values)
        return flags, values

    def generated_marker(self, segment: SegmentReader, ordinal: int, content: bytes) -> bool:
        """generated_marker reports whether the content says it is generated, cached per document."""
        key = str(segment.data.path)
        cache = self._generated.get(key)
        if cache is None:
            with self._weights_lock:
                cache = self._generated.setdefault(key, {})
        known = cache.get(ordinal)
        if known is None:
            known = rank.content_generated(content)
            cache[ordinal] = known
        return known

    def pool(self) -> ThreadPoolExecutor:
        """pool returns the verification thread pool, starting it on first use."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kotadb-verify")
            return self._pool

    def process_pool(self) -> ProcessPoolExecutor:
        """process_pool returns the verification worker processes, starting them on first use.

        The forkserver start method is safe in a threaded parent (a gRPC server).
        """
        with self._pool_lock:
            if self._process_pool is None:
                context = multiprocessing.get_context("forkserver")
                self._process_pool = ProcessPoolExecutor(self.processes - 1, mp_context=context)
            return self._process_pool

    def close(self) -> None:
        """close stops verification threads and processes (the index is the caller's to close)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            if self._process_pool is not None:
                self._process_pool.shutdown(wait=True, cancel_futures=True)
                self._process_pool = None

    def encode(self, cursor: Cursor) -> str:
        """encode turns a cursor into the token handed to the caller."""
        return encode_cursor(cursor, key=self._cursor_key) if self._cursor_key else encode_cursor(cursor)


class _Run:
    """_Run is the state of one search on one snapshot."""

    def __init__(
        self,
        searcher: Searcher,
        snap: Snapshot,
        tree: MatchTree,
        request: SearchRequest,
        cursor: Cursor | None,
        fingerprint: bytes,
    ) -> None:
        self.searcher = searcher
        self.snap = snap
        self.tree = tree
        self.request = request
        self.cursor = cursor
        self.fingerprint = fingerprint
        self.exact = cursor is not None or request.mode is SearchMode.EXHAUSTIVE
        self.page_size = request.limit_files
        self.heap: list[Hit] = []
        self.file_count = 0
        self.match_count = 0
        self.good = 0  # matching files at whole-word rank or better (first-page stop rule)
        self.verified = 0
        self.eligible = 0  # matching files after the cursor position (candidates for this page)
        self.proven = False  # FIRST_PAGE stopped early, but provably with the exact top page
        self.limit_reason: LimitReason | None = None

    def execute(self) -> SearchResult:
        segments = self.snap.segments
        plan = self.tree.plan
        scan = isinstance(plan, All)
        order: list[tuple[int, NDArray[np.int64]]] = []
        weights_all: list[NDArray[np.float64]] = []
        candidates = 0
        for seg_index, segment in enumerate(segments):
            bits = evaluate_plan(plan, segment)
            live = segment.live if bits is None else bits & segment.live
            ordinals = np.asarray(live.to_array(), dtype=np.int64)
            if self.tree.has_metadata_terms and len(ordinals):
                ordinals = self._prefilter(segment, ordinals)
            candidates += len(ordinals)
            order.append((seg_index, ordinals))
            weights_all.append(self.searcher.weights(segment)[ordinals] if len(ordinals) else np.empty(0))
        seg_ids: NDArray[np.int64] = (
            np.concatenate([np.full(len(o), i, dtype=np.int64) for i, o in order])
            if order
            else np.empty(0, dtype=np.int64)
        )
        ords = np.concatenate([o for _, o in order]) if order else np.empty(0, dtype=np.int64)
        weights = np.concatenate(weights_all) if weights_all else np.empty(0)
        # FIRST_PAGE: ordinary files first; within a weight, index order (segments are path-sorted).
        sequence = np.arange(len(ords)) if self.exact else np.lexsort((ords, seg_ids, -weights))
        if self._use_processes(len(sequence)):
            self._verify_processes(sequence, seg_ids, ords)
            stopped_early = False
        elif self.searcher.workers > 1 and len(sequence) >= PARALLEL_MIN:
            stopped_early = self._verify_parallel(sequence, seg_ids, ords, weights)
        else:
            stopped_early = self._verify_in_order(sequence, seg_ids, ords, weights)
        if stopped_early and self.limit_reason is None:
            self.limit_reason = LimitReason.FILE_LIMIT
        return self._result(candidates, scan, stopped_early)

    def _use_processes(self, candidates: int) -> bool:
        # Worker processes read the clock themselves and cannot see a threading.Event, so a
        # test clock or a cancellation event keeps the search in this process.
        return (
            self.exact
            and self.searcher.processes > 1
            and candidates >= self.searcher.process_min
            and self.searcher.clock is time.monotonic
            and self.request.cancel is None
        )

    def _verify_processes(
        self, sequence: NDArray[np.int64], seg_ids: NDArray[np.int64], ords: NDArray[np.int64]
    ) -> None:
        """_verify_processes splits an exact-order search's candidates over worker processes.

        The candidates are cut into `processes` contiguous parts; this process verifies the
        first while workers (each with the index open, see `_process_check`) verify the
        others, and results are merged in part order, so totals and pages equal the
        sequential ones. Workers look segments up by name (segments are immutable); if one
        is gone (merged away by another process's writer), its part is verified here.

        Measured on the Linux corpus, exhaustive, median of 5, one process vs two: on an
        idle host `spin_lock_irqsave` 478 vs 414 ms, `(?i)fixme` 215 vs 137 ms,
        `static int \\w+_probe\\(struct platform_device` 343 vs 240 ms, `MODULE_LICENSE`
        246 vs 163 ms; while other jobs kept both cores busy (load ~3) two were slower
        (`(?i)fixme` 420 vs 261 ms: there was no idle core to win). Hence opt-in
        (`processes=2`), for hosts with a core to spare; the benchmark passes it.
        """
        names = [segment.name for segment in self.snap.segments]
        index_of = {name: i for i, name in enumerate(names)}
        pairs = [
            (names[s], o) for s, o in zip(seg_ids[sequence].tolist(), ords[sequence].tolist(), strict=True)
        ]
        # An even split measured best: giving this process (which also builds every result
        # object) 80% or 60% of a worker's share was 5-25% slower on the queries below.
        parts = self.searcher.processes
        size = -(-len(pairs) // parts)
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        pool = self.searcher.process_pool()
        job = (str(self.searcher.index.path), self.request.query, self.request.regex, self.request.deadline)
        futures = [pool.submit(_process_check, *job, chunk) for chunk in chunks[1:]]
        try:
            for name, ordinal in chunks[0]:
                if self._interrupted():
                    break
                self.verified += 1
                found = self._check(index_of[name], ordinal)
                if found is not None:
                    self._accept(found)
                if self.limit_reason is not None:
                    break
            for chunk, future in zip(chunks[1:], futures, strict=True):
                if self.limit_reason is not None:
                    break
                try:
                    done, rows, timed_out = future.result()
                except _SegmentGone:
                    done, rows, timed_out = self._check_here(chunk, index_of)
                self.verified += done
                for row in rows:
                    self._accept(hit_from_row(row, index_of))
                    if self._match_limited():
                        break
                if timed_out and self.limit_reason is None:
                    self.limit_reason = LimitReason.DEADLINE
        finally:
            for future in futures:
                future.cancel()

    def _check_here(
        self, chunk: list[tuple[str, int]], index_of: dict[str, int]
    ) -> tuple[int, list[HitRow], bool]:
        done = 0
        rows: list[HitRow] = []
        for name, ordinal in chunk:
            if self._interrupted():
                return done, rows, True
            done += 1
            found = self._check(index_of[name], ordinal)
            if found is not None:
                rows.append(hit_to_row(found, name))
        return done, rows, False

    def _verify_in_order(
        self,
        sequence: NDArray[np.int64],
        seg_ids: NDArray[np.int64],
        ords: NDArray[np.int64],
        weights: NDArray[np.float64],
    ) -> bool:
        """_verify_in_order verifies candidates one by one; returns True if it stopped early."""
        best_possible = rank.DEFINITION + rank.FILENAME
        for position, at in enumerate(sequence.tolist()):
            if self._interrupted():
                return False
            if not self.exact and self._enough(float(weights[at]) * best_possible):
                return position < len(sequence)
            self.verified += 1
            found = self._check(int(seg_ids[at]), int(ords[at]))
            if found is not None:
                self._accept(found)
            if self.limit_reason is not None:
                return False
        return False

    def _verify_parallel(
        self,
        sequence: NDArray[np.int64],
        seg_ids: NDArray[np.int64],
        ords: NDArray[np.int64],
        weights: NDArray[np.float64],
    ) -> bool:
        """_verify_parallel verifies candidates in chunks on the searcher's thread pool.

        RE2 releases the GIL while it scans, so two threads could overlap the regex work of
        one file with the Python bookkeeping of another. Measured on the Linux corpus (2 cores
        shared with other work, median of 5): exhaustive `spin_lock_irqsave` 460 ms with one
        thread vs 644 ms with two, `(?i)fixme` 209 vs 474 ms, `\\bkzalloc\\b.*GFP_ATOMIC` 125
        vs 122 ms. Most of a file's cost is Python under the GIL (line bookkeeping, ranking),
        so threads mostly contend; the default is one worker and this path stays for hosts
        with idle cores and regex-heavy queries. Chunks are submitted a few at a time
        and merged in order, so exhaustive totals and pages equal the sequential ones; a
        limit or deadline stops the remaining chunks. FIRST_PAGE applies its stop rule
        between chunks (so it may verify up to a chunk more than sequentially); returns True
        if it stopped early.
        """
        stop = threading.Event()
        pairs = list(zip(seg_ids[sequence].tolist(), ords[sequence].tolist(), strict=True))
        bounds = (weights[sequence] * (rank.DEFINITION + rank.FILENAME)).tolist()
        size = CHUNK if self.exact else FIRST_PAGE_CHUNK
        starts = range(0, len(pairs), size)

        def work(chunk: list[tuple[int, int]]) -> tuple[int, list[Hit]]:
            done = 0
            out: list[Hit] = []
            for seg_index, ordinal in chunk:
                if stop.is_set() or self._interrupted():
                    break
                done += 1
                found = self._check(seg_index, ordinal)
                if found is not None:
                    out.append(found)
            return done, out

        pool = self.searcher.pool()
        window = 2 * self.searcher.workers
        pending: collections.deque[tuple[int, Future[tuple[int, list[Hit]]]]] = collections.deque()
        next_start = iter(starts)
        stopped_early = False
        try:
            while True:
                while len(pending) < window:
                    start = next(next_start, None)
                    if start is None:
                        break
                    pending.append((start, pool.submit(work, pairs[start : start + size])))
                if not pending:
                    break
                start, future = pending.popleft()
                if not self.exact and self._enough(bounds[start]):
                    stopped_early = True
                    break
                done, found = future.result()
                self.verified += done
                for item in found:
                    self._accept(item)
                    if self._match_limited():
                        break
                if self.limit_reason is not None:
                    break
        finally:
            stop.set()
            for _, future in pending:
                future.cancel()
            # Let running chunks notice `stop` before the snapshot they read is released.
            wait([f for _, f in pending])
        return stopped_early

    def _match_limited(self) -> bool:
        return self.limit_reason is LimitReason.MATCH_LIMIT

    def _interrupted(self) -> bool:
        cancel = self.request.cancel
        if cancel is not None and cancel.is_set():
            raise SearchCancelled("search cancelled")
        deadline = self.request.deadline
        if deadline is not None and self.searcher.clock() >= deadline:
            self.limit_reason = LimitReason.DEADLINE
            return True
        return False

    def _enough(self, next_bound: float) -> bool:
        """_enough is the FIRST_PAGE stop rule, checked before verifying the next candidate."""
        page = self.page_size
        if page is None or len(self.heap) < page:
            return False
        worst = self.heap[0]
        if next_bound < -worst.key[0]:
            # Nothing left can outrank the page: the order is exact after all.
            self.proven = True
            return True
        return self.good >= page or self.file_count >= OVERSAMPLE * page

    def _prefilter(self, segment: SegmentReader, ordinals: NDArray[np.int64]) -> NDArray[np.int64]:
        keep = np.zeros(len(ordinals), dtype=bool)
        paths = segment.paths
        for i, ordinal in enumerate(ordinals.tolist()):
            doc = segment.doc(ordinal) if self.tree.needs_doc_record else None
            facts = DocFacts(
                path=paths[ordinal],
                language=doc.language if doc else "",
                repository=doc.repository if doc else "",
            )
            keep[i] = self.tree.prefilter(facts) is not False
        return ordinals[keep]

    def _check(self, seg_index: int, ordinal: int) -> Hit | None:
        """_check verifies one candidate and scores it; it touches no shared state (threads)."""
        segment = self.snap.segments[seg_index]
        content = bytes(segment.content(ordinal))
        record: list[DocRecord] = []

        def facts() -> DocFacts:
            record.append(segment.doc(ordinal))
            return DocFacts(path=record[0].path, language=record[0].language, repository=record[0].repository)

        outcome = self.tree.evaluate(facts, content, lambda: segment.symbols(ordinal))
        if outcome is None:
            return None
        doc = record[0] if record else segment.doc(ordinal)
        lines = outcome.lines
        table = symbol_table(segment, ordinal)
        flags = int(self.searcher.path_flags(segment)[ordinal])
        weight = rank.path_weight(
            test=bool(flags & 1),
            vendored=bool(flags & 2),
            generated=bool(flags & 4) or self.searcher.generated_marker(segment, ordinal, content),
        )
        signals = self._signals(content, lines, outcome.filename_match, table)
        if outcome.symbols:
            # A sym: or type:symbol match is a definition by construction.
            signals = replace(signals, definition=True)
        score = rank.score(signals, weight)
        return Hit(
            key=rank_key(score, doc.path, doc.repository, doc.external_id),
            segment=seg_index,
            ordinal=ordinal,
            path=doc.path,
            repository=doc.repository,
            language=doc.language,
            external_id=doc.external_id,
            score=score,
            lines=lines,
            symbols=outcome.symbols,
            path_ranges=outcome.path_ranges,
            table=table,
        )

    def _accept(self, found: Hit) -> None:
        """_accept counts a matching file and offers it to the page (main thread only)."""
        self.file_count += 1
        self.match_count += len(found.lines)
        limit = self.request.limit_matches
        if limit is not None and self.match_count >= limit:
            self.limit_reason = LimitReason.MATCH_LIMIT
        if found.score >= rank.WHOLE_WORD:
            self.good += 1
        cursor = self.cursor
        if cursor is not None:
            if not cursor.after(found.key):
                return
            if (
                cursor.exclude
                and path_digest(found.repository, found.path, found.external_id) in cursor.exclude
            ):
                return
        self.eligible += 1
        page = self.page_size
        if page is None or len(self.heap) < page:
            heapq.heappush(self.heap, found)
        elif found.key < self.heap[0].key:
            heapq.heapreplace(self.heap, found)

    def _signals(
        self,
        content: bytes,
        lines: Sequence[RawLineMatch],
        filename_match: bool,
        table: rank.SymbolTable,
    ) -> rank.RankSignals:
        whole_word = False
        spans: list[tuple[int, int]] = []
        for match in lines:
            base = match.line_start
            if not whole_word:
                line = content[base : match.line_end]
                whole_word = any(rank.is_whole_word(line, s, e) for s, e in match.ranges)
            spans.extend((base + s, base + e) for s, e in match.ranges)
        return rank.RankSignals(
            definition=table.defines(spans),
            whole_word=whole_word,
            content_match=bool(lines),
            filename_match=filename_match,
        )

    def _result(self, candidates: int, scan: bool, stopped_early: bool) -> SearchResult:
        ordered = sorted(self.heap, key=lambda f: f.key)
        files = tuple(
            file_match(
                self.snap.segments[f.segment],
                f,
                context_lines=self.request.context_lines,
                with_symbols=self.request.with_symbols,
            )
            for f in ordered
        )
        # Every match after the cursor competed for the page; more exist if some did not fit,
        # or if verification stopped early with candidates left.
        more = self.eligible > len(ordered) or stopped_early
        next_cursor: str | None = None
        carried = self.cursor.exclude if self.cursor is not None else frozenset()
        if self.limit_reason in (LimitReason.DEADLINE, LimitReason.MATCH_LIMIT):
            # A page cut short by a deadline or the match limit is partial: continuing after
            # its last file would skip better files nobody verified. The caller starts over.
            pass
        elif stopped_early and self.limit_reason is LimitReason.FILE_LIMIT and not self.proven:
            shown = exclusion_digests((f.repository, f.path, f.external_id) for f in ordered)
            next_cursor = self.searcher.encode(
                Cursor(self.snap.generation, self.fingerprint, None, carried | shown)
            )
        elif more and ordered:
            last = ordered[-1]
            next_cursor = self.searcher.encode(
                Cursor(
                    self.snap.generation,
                    self.fingerprint,
                    Position(last.score, last.path, last.repository, last.external_id),
                    carried,
                )
            )
        return SearchResult(
            files=files,
            file_count=self.file_count,
            match_count=self.match_count,
            limit_hit=self.limit_reason is not None,
            limit_reason=self.limit_reason,
            stats=SearchStats(
                candidates=candidates,
                files_verified=self.verified,
                segments_searched=len(self.snap.segments),
                scan_fallback=scan,
                exact_order=self.exact or not stopped_early or self.proven,
                plan=str(self.tree.plan),
            ),
            next_cursor=next_cursor,
            generation=self.snap.generation,
        )


class _SegmentGone(Exception):
    """_SegmentGone tells the parent that a worker could not find a segment by name."""


# One open index and searcher per index directory, per worker process.
_WORKER_STATE: dict[str, tuple[Index, Searcher]] = {}


def _process_check(
    index_path: str, query: str | Query, regex: bool, deadline: float | None, chunk: list[tuple[str, int]]
) -> tuple[int, list[HitRow], bool]:
    """_process_check verifies a part of a search's candidates in a worker process.

    Returns (files verified, matching rows, whether the deadline stopped it).
    """
    state = _WORKER_STATE.get(index_path)
    if state is None:
        index = Index.open(index_path)
        state = (index, Searcher(index))
        _WORKER_STATE[index_path] = state
    _, searcher = state
    tree = searcher._compiled(query, regex)
    with searcher.index.snapshot() as snap:
        index_of = {segment.name: i for i, segment in enumerate(snap.segments)}
        if any(name not in index_of for name, _ in chunk):
            raise _SegmentGone(index_path)
        request = SearchRequest(query=query, regex=regex, mode=SearchMode.EXHAUSTIVE, limit_files=None)
        run = _Run(searcher, snap, tree, request, None, b"")
        rows: list[HitRow] = []
        done = 0
        for name, ordinal in chunk:
            if deadline is not None and time.monotonic() >= deadline:
                return done, rows, True
            done += 1
            found = run._check(index_of[name], ordinal)
            if found is not None:
                rows.append(hit_to_row(found, name))
        return done, rows, False
