"""The searcher: a query in, a ranked page of verified matches out, over one index snapshot.

A search runs in four steps, all on one pinned snapshot, each in its own module:

1. Plan (here). The query (or, with `regex=True`, one RE2 pattern) becomes a trigram plan
   (plan.py) and a match tree (matchtree.py) of content, path, language, repository and
   symbol terms; recently compiled trees are reused.
2. Candidates (candidates.py). The plan is evaluated on each segment's roaring bitmaps and
   intersected with its live set; cheap metadata terms prune without touching content.
3. Verify (searchrun.py). Each candidate's stored content is run through the content terms'
   LineMatchers (RE2 semantics, line-oriented, native byte loops), so there are never false
   positives; matching files are scored (rank.py). Deadline and cancellation are checked
   between files.
4. Page (page.py). Only the files on the returned page get their line text, columns,
   context lines and enclosing symbols built; totals, limit flags and the next cursor
   come from the run's counters.

FIRST_PAGE mode stops early once it has a good page (`stats.exact_order` says whether it
is provably the best); EXHAUSTIVE mode verifies every candidate and counts true totals. A
page requested with a cursor is always computed in exact order, so concatenated pages equal
the exhaustive result (after an approximate first page, they equal it as a set: see
cursor.py). A page cut short by the deadline or the match limit carries no cursor.

Each run gets a `request.RunContext` (clock, cursor encoder, worker processes), never the
Searcher itself, so nothing below this module imports it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from services.search.engine.errors import SearchCancelled, SearchDeadlineError
from services.search.engine.index.index import Index
from services.search.engine.query.matchtree import MatchTree, compile_query, compile_regex_query
from services.search.engine.query.query import Query
from services.search.engine.record import replace
from services.search.engine.search.candidates import evaluate_plan
from services.search.engine.search.request import DEFAULT_LIMIT_FILES, PROCESS_MIN, RunContext, SearchRequest
from services.search.engine.search.results import SearchMode, SearchResult
from services.search.engine.search.stream import MatchStream

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from services.search.engine.index.index import Snapshot
    from services.search.engine.search.cursor import Cursor
    from services.search.engine.symbols.symsearch import SymbolSearchResult

__all__ = [
    "DEFAULT_LIMIT_FILES",
    "PROCESS_MIN",
    "SearchCancelled",
    "SearchRequest",
    "Searcher",
    "evaluate_plan",
]

# Recently compiled queries kept per searcher.
COMPILED_CACHE = 256


class Searcher:
    """Searcher answers queries over an open Index; it is safe to share between threads.

    `cursor_key` keys the cursors' integrity tag (cursor.py); `clock` is the time source
    deadlines are compared with (`time.monotonic` unless a test supplies its own);
    candidates are verified on the calling thread; with `processes` > 1, exact-order searches
    with at least `process_min` candidates are split over that many processes (this one
    included; see `searchrun.Run._verify_processes`), which start on the first such search,
    never for a small one. Call `close` to stop them.
    """

    def __init__(
        self,
        index: Index,
        *,
        cursor_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        processes: int = 1,
        process_min: int = PROCESS_MIN,
    ) -> None:
        self.index = index
        self.clock = clock
        self.processes = max(1, processes)
        self.process_min = process_min
        self._process_pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._trees: collections.OrderedDict[tuple[str, bool, bool], MatchTree] = collections.OrderedDict()
        self._compile_lock = threading.Lock()
        self._cursor_key = cursor_key

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

    def run(self, request: SearchRequest, *, snapshot: Snapshot | None = None) -> SearchResult:
        """run executes a SearchRequest on a fresh snapshot of the index, or on `snapshot`.

        A caller that keeps a snapshot open (the search service pins the one a first page
        used) passes it to serve later pages of the same generation; it stays open after.
        """
        started = time.perf_counter()
        if request.limit_files is not None and request.limit_files < 1:
            raise ValueError("limit_files must be at least 1")
        if request.context_lines < 0:
            raise ValueError("context_lines must not be negative")
        if request.regex and not isinstance(request.query, str):
            raise TypeError("regex=True needs the pattern as a string")
        self._check_deadline(request.deadline)
        # Imported here: cursors (hashlib, base64) serve pages, never a stream or a count.
        from services.search.engine.search.cursor import decode_cursor, query_fingerprint

        tree = self.compiled(request.query, request.regex)
        fingerprint = query_fingerprint(str(tree), "regex" if request.regex else "query")
        cursor = None
        if request.cursor:
            cursor = (
                decode_cursor(request.cursor, key=self._cursor_key)
                if self._cursor_key
                else decode_cursor(request.cursor)
            )
        # Imported here: a stream or a count never ranks.
        from services.search.engine.search.searchrun import Run

        with contextlib.nullcontext(snapshot) if snapshot else self.index.snapshot() as snap:
            if cursor is not None:
                cursor.check(generation=snap.generation, fingerprint=fingerprint)
            result = Run(self.context(), snap, tree, request, cursor, fingerprint).execute()
        stats = replace(result.stats, duration_seconds=time.perf_counter() - started)
        return replace(result, stats=stats)

    def _check_deadline(self, deadline: float | None) -> None:
        # A deadline that passes mid-search gives a partial result marked DEADLINE; one that
        # had passed before the search started gives nothing worth returning.
        if deadline is not None and self.clock() >= deadline:
            raise SearchDeadlineError("the deadline passed before the search started")

    def context(self) -> RunContext:
        """context is what this searcher lends each run (request.RunContext)."""
        return RunContext(
            encode=self.encode,
            index_path=str(self.index.path),
            clock=self.clock,
            processes=self.processes,
            process_min=self.process_min,
            process_pool=self.process_pool,
        )

    @contextlib.contextmanager
    def stream(
        self,
        query: str | Query,
        *,
        regex: bool = False,
        lines: bool = True,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[MatchStream]:
        """stream yields a MatchStream of every matching file in index order (stream.py).

        The snapshot stays pinned until the `with` block ends; `lines=False` only counts,
        which is how exact totals are taken without an object per matching line.
        """
        self._check_deadline(deadline)
        tree = self.compiled(query, regex)
        with self.index.snapshot() as snap:
            yield MatchStream(snap, tree, lines=lines, deadline=deadline, cancel=cancel, clock=self.clock)

    def compiled(self, query: str | Query, regex: bool) -> MatchTree:
        """compiled parses, plans and compiles a query, reusing recent ones.

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
        # Imported here: symsearch loads the tree-sitter kinds, which a text search never needs.
        from services.search.engine.search.candidates import symbol_candidates, symbol_search_screen
        from services.search.engine.symbols.symsearch import SymbolCandidate, search_symbols

        screen = symbol_search_screen(pattern, case_sensitive=case_sensitive)
        with self.index.snapshot() as snap:

            def candidates() -> Iterator[SymbolCandidate]:
                for segment in snap.segments:
                    for ordinal, found in symbol_candidates(segment, screen):
                        doc = segment.doc(ordinal)
                        for symbol in found:
                            yield SymbolCandidate(symbol, doc.path, doc.repository, doc.language)

            return search_symbols(
                pattern, candidates(), kind=kind, limit=limit, case_sensitive=case_sensitive
            )

    def process_pool(self) -> ProcessPoolExecutor:
        """process_pool returns the verification worker processes, starting them on first use.

        The forkserver start method is safe in a threaded parent (a gRPC server). Imported
        here: a one-shot CLI search never starts the pool.
        """
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with self._pool_lock:
            if self._process_pool is None:
                context = multiprocessing.get_context("forkserver")
                self._process_pool = ProcessPoolExecutor(self.processes - 1, mp_context=context)
            return self._process_pool

    def close(self) -> None:
        """close stops the verification processes (the index is the caller's to close)."""
        with self._pool_lock:
            if self._process_pool is not None:
                self._process_pool.shutdown(wait=True, cancel_futures=True)
                self._process_pool = None

    def encode(self, cursor: Cursor) -> str:
        """encode turns a cursor into the token handed to the caller."""
        from services.search.engine.search.cursor import encode_cursor

        return encode_cursor(cursor, key=self._cursor_key) if self._cursor_key else encode_cursor(cursor)
