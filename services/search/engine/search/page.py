"""Page assembly: a finished search run's best hits turned into the SearchResult it returns.

Only the files on the page get their line text, columns, context lines and enclosing symbols
built (hits.file_match); the totals, the limit flag and the cursor for the next page come
from the run's counters. A page cut short by the deadline or the match limit carries no
cursor: continuing after it could skip files nobody verified (see searcher.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from services.search.engine.index.index import Snapshot
from services.search.engine.query.matchtree import MatchTree
from services.search.engine.search.cursor import Cursor, Position, exclusion_digests
from services.search.engine.search.hits import Hit, file_match
from services.search.engine.search.request import SearchRequest
from services.search.engine.search.results import LimitReason, SearchResult, SearchStats


class FinishedRun(Protocol):
    """FinishedRun is what a page is assembled from: a finished run's counters and best hits.

    searchrun.Run provides it; this module never imports that one (runs call down into pages).
    """

    @property
    def heap(self) -> Sequence[Hit]: ...
    @property
    def snap(self) -> Snapshot: ...
    @property
    def tree(self) -> MatchTree: ...
    @property
    def request(self) -> SearchRequest: ...
    @property
    def cursor(self) -> Cursor | None: ...
    @property
    def fingerprint(self) -> bytes: ...
    @property
    def encode(self) -> Callable[[Cursor], str]: ...
    @property
    def exact(self) -> bool: ...
    @property
    def file_count(self) -> int: ...
    @property
    def match_count(self) -> int: ...
    @property
    def verified(self) -> int: ...
    @property
    def eligible(self) -> int: ...
    @property
    def proven(self) -> bool: ...
    @property
    def limit_reason(self) -> LimitReason | None: ...


def assemble_result(run: FinishedRun, candidates: int, scan: bool, stopped_early: bool) -> SearchResult:
    """assemble_result builds the result of `run`, which verified `candidates` documents' worth.

    `scan` says the plan had no usable trigram; `stopped_early` that a first page stopped
    before verifying every candidate.
    """
    ordered = sorted(run.heap, key=lambda f: f.key)
    files = tuple(
        file_match(
            run.snap.segments[f.segment],
            f,
            context_lines=run.request.context_lines,
            with_symbols=run.request.with_symbols,
        )
        for f in ordered
    )
    # Every match after the cursor competed for the page; more exist if some did not fit,
    # or if verification stopped early with candidates left.
    more = run.eligible > len(ordered) or stopped_early
    next_cursor: str | None = None
    carried = run.cursor.exclude if run.cursor is not None else frozenset()
    if run.limit_reason in (LimitReason.DEADLINE, LimitReason.MATCH_LIMIT):
        # A page cut short by a deadline or the match limit is partial: continuing after
        # its last file would skip better files nobody verified. The caller starts over.
        pass
    elif stopped_early and run.limit_reason is LimitReason.FILE_LIMIT and not run.proven:
        shown = exclusion_digests((f.repository, f.path, f.external_id) for f in ordered)
        next_cursor = run.encode(Cursor(run.snap.generation, run.fingerprint, None, carried | shown))
    elif more and ordered:
        last = ordered[-1]
        next_cursor = run.encode(
            Cursor(
                run.snap.generation,
                run.fingerprint,
                Position(last.score, last.path, last.repository, last.external_id),
                carried,
            )
        )
    return SearchResult(
        files=files,
        file_count=run.file_count,
        match_count=run.match_count,
        limit_hit=run.limit_reason is not None,
        limit_reason=run.limit_reason,
        stats=SearchStats(
            candidates=candidates,
            files_verified=run.verified,
            segments_searched=len(run.snap.segments),
            scan_fallback=scan,
            exact_order=run.exact or not stopped_early or run.proven,
            plan=str(run.tree.plan),
        ),
        next_cursor=next_cursor,
        generation=run.snap.generation,
    )
