"""The verification loop of one search: candidates checked against content, counted, ranked.

`Run` holds one search's state on one snapshot. It takes the candidates (candidates.py),
verifies each one's stored content with the match tree (RE2 semantics, line-oriented; the
byte loops are native, see verify.py), scores matching files (rank.py) and keeps the best in
a heap for the page, which page.py then assembles. The deadline and the cancellation event
are checked between files; a deadline returns the partial result marked `limit_hit` with
reason DEADLINE.

FIRST_PAGE mode verifies candidates in order of their path prior and stops once it has
`limit_files` files at whole-word rank or better, or `OVERSAMPLE` times `limit_files`
matching files of any rank, or when what remains cannot outrank what it has. EXHAUSTIVE mode
(and any page requested with a cursor) verifies every candidate in index order. Candidates
are verified in the calling thread or split over worker processes (`Run._verify_processes`,
with `process_check` running in the workers).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

from services.search.engine import _fastscan
from services.search.engine.errors import SearchCancelled as SearchCancelled
from services.search.engine.index.index import Index, Snapshot
from services.search.engine.index.reader import DocRecord, SegmentReader
from services.search.engine.model import Symbol
from services.search.engine.query.matchtree import DocFacts, MatchTree, compile_query, compile_regex_query
from services.search.engine.query.query import Query
from services.search.engine.query.verify import LineMatch as RawLineMatch
from services.search.engine.search import rank
from services.search.engine.search.candidates import Candidates, collect_candidates
from services.search.engine.search.cursor import Cursor, path_digest, rank_key
from services.search.engine.search.hits import Hit, HitRow, hit_from_row, hit_to_row, symbol_table
from services.search.engine.search.page import assemble_result
from services.search.engine.search.request import RunContext, SearchRequest
from services.search.engine.search.results import LimitReason, SearchMode, SearchResult

# FIRST_PAGE keeps verifying until it has this many times the page in matching files (of any
# rank) before it gives up looking for better-ranked ones.
OVERSAMPLE = 3

# Once SCREEN_AFTER candidates are verified and fewer than one in SCREEN_RATE matched, the
# candidates of a one-term query are screened natively SCREEN_BATCH at a time
# (LineMatcher.count_spans) and only those that match are verified one by one: a scan's
# candidates mostly do not match, and a Python call each was half of its first page
# (`[A-Z]{20,}` on Linux: 47,000 files verified, ~110 of 230 ms). A batch reads at most
# SCREEN_BATCH files past the point where the page is complete.
SCREEN_AFTER = 256
SCREEN_RATE = 4
SCREEN_BATCH = 256


class Run:
    """Run is the state of one search on one snapshot: verification, counting, the page heap."""

    def __init__(
        self,
        context: RunContext,
        snap: Snapshot,
        tree: MatchTree,
        request: SearchRequest,
        cursor: Cursor | None,
        fingerprint: bytes,
    ) -> None:
        self.context = context
        self.encode = context.encode
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
        """execute verifies the candidates and returns the assembled result."""
        found = collect_candidates(self.snap, self.tree, exact=self.exact)
        if self._use_processes(found.count):
            self._verify_processes(found)
            stopped_early = False
        else:
            stopped_early = self._verify_in_order(found)
        if stopped_early and self.limit_reason is None:
            self.limit_reason = LimitReason.FILE_LIMIT
        return assemble_result(self, found.count, found.scan, stopped_early)

    def _use_processes(self, candidates: int) -> bool:
        # Worker processes read the clock themselves and cannot see a threading.Event, so a
        # test clock or a cancellation event keeps the search in this process.
        return (
            self.exact
            and self.context.processes > 1
            and candidates >= self.context.process_min
            and self.context.clock is time.monotonic
            and self.request.cancel is None
        )

    def _verify_processes(self, candidates: Candidates) -> None:
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
        seg_ids, ords = candidates.seg_ids, candidates.ords
        pairs = [(names[seg_ids[at]], ords[at]) for at in candidates.sequence]
        # An even split measured best: giving this process (which also builds every result
        # object) 80% or 60% of a worker's share was 5-25% slower on the queries below.
        parts = self.context.processes
        size = -(-len(pairs) // parts)
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        pool = self.context.process_pool()
        job = (self.context.index_path, self.request.query, self.request.regex, self.request.deadline)
        futures = [pool.submit(process_check, *job, chunk) for chunk in chunks[1:]]
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
                except SegmentGone:
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

    def _verify_in_order(self, found: Candidates) -> bool:
        """_verify_in_order verifies candidates one by one; returns True if it stopped early.

        Candidates a native screen found not to match (`_screen`) are counted as verified
        without a Python call each.
        """
        best_possible = rank.DEFINITION + rank.FILENAME
        seg_ids, ords, sequence = found.seg_ids, found.ords, found.sequence
        screened = bytearray()  # per position of sequence: 1 may match, 0 does not
        screen_from = -1  # where screening starts (-1: not yet)
        for position, at in enumerate(sequence):
            if self._interrupted():
                return False
            if not self.exact and self._enough(found.weight(at) * best_possible):
                return True
            self.verified += 1
            if screen_from < 0 and self._screening_pays(len(sequence) - position):
                screen_from = position
            if screen_from >= 0:
                offset = position - screen_from
                if offset == len(screened):
                    screened += self._screen(found, sequence[position : position + SCREEN_BATCH])
                if not screened[offset]:
                    continue
            hit = self._check(seg_ids[at], ords[at])
            if hit is not None:
                self._accept(hit)
            if self.limit_reason is not None:
                return False
        return False

    def _screening_pays(self, remaining: int) -> bool:
        return (
            self.tree.sole_matcher is not None
            and remaining >= SCREEN_BATCH
            and self.verified > SCREEN_AFTER
            and self.file_count * SCREEN_RATE < self.verified
        )

    def _screen(self, found: Candidates, positions: Sequence[int]) -> bytes:
        """_screen says, per candidate position, whether its content may match (1) or cannot (0).

        The positions' candidates are counted per segment in one native call over their
        verified content (`LineMatcher.count_spans`), as a stream counts them.
        """
        sole = self.tree.sole_matcher
        assert sole is not None
        out = bytearray(len(positions))
        by_segment: dict[int, list[int]] = {}
        for i, at in enumerate(positions):
            by_segment.setdefault(found.seg_ids[at], []).append(i)
        for seg_index, indexes in by_segment.items():
            segment = self.snap.segments[seg_index]
            spans = segment.content_spans([found.ords[positions[i]] for i in indexes])
            counts = memoryview(sole.count_spans(segment.verified_content(spans), spans)).cast("q")
            for i, count in zip(indexes, counts, strict=True):
                out[i] = count > 0
        return bytes(out)

    def _match_limited(self) -> bool:
        return self.limit_reason is LimitReason.MATCH_LIMIT

    def _interrupted(self) -> bool:
        cancel = self.request.cancel
        if cancel is not None and cancel.is_set():
            raise SearchCancelled("search cancelled")
        deadline = self.request.deadline
        if deadline is not None and self.context.clock() >= deadline:
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

    def check(self, seg_index: int, ordinal: int) -> Hit | None:
        """check verifies and scores one document without counting it (how a stream builds entries)."""
        return self._check(seg_index, ordinal)

    def _check(self, seg_index: int, ordinal: int) -> Hit | None:
        """_check verifies one candidate and scores it; it touches no shared run state."""
        segment = self.snap.segments[seg_index]
        sole = self.tree.sole_matcher
        if sole is not None:
            # A query of one content term: its lines are exactly the matcher's
            # (MatchTree.sole_matcher), found on the mapped content without a copy and
            # without walking the tree; only a matching file decodes its record. This halved
            # the cost of a candidate that does not match (most of a selective first page).
            view = segment.content(ordinal)
            lines = sole.find(view)
            if not lines:
                return None
            doc = segment.doc(ordinal)
            base = doc.path.rsplit("/", 1)[-1].encode("utf-8")
            return self._hit(
                seg_index, segment, ordinal, doc, view, lines, (), (), bool(sole.find(base, max_matches=1))
            )
        content = bytes(segment.content(ordinal))
        record: list[DocRecord] = []

        def facts() -> DocFacts:
            record.append(segment.doc(ordinal))
            return DocFacts(path=record[0].path, language=record[0].language, repository=record[0].repository)

        outcome = self.tree.evaluate(facts, content, lambda: segment.symbols(ordinal))
        if outcome is None:
            return None
        doc = record[0] if record else segment.doc(ordinal)
        return self._hit(
            seg_index,
            segment,
            ordinal,
            doc,
            content,
            outcome.lines,
            outcome.symbols,
            outcome.path_ranges,
            outcome.filename_match,
        )

    def _hit(
        self,
        seg_index: int,
        segment: SegmentReader,
        ordinal: int,
        doc: DocRecord,
        content: bytes | memoryview,
        lines: list[RawLineMatch],
        symbols: tuple[Symbol, ...],
        path_ranges: tuple[tuple[int, int], ...],
        filename_match: bool,
    ) -> Hit:
        """_hit scores a matching file and makes its Hit."""
        table = symbol_table(segment, ordinal)
        # The whole-word test is rank.is_whole_word's, run natively over every range (a file
        # with thousands of matching lines cost ~1 ms in Python).
        whole_word = _fastscan.any_whole_word(content, lines)
        # A sym: or type:symbol match is a definition by construction; otherwise absolute
        # spans are built only when the file has definitions to compare them with.
        definition = bool(symbols) or (bool(table) and table.defines(_absolute_ranges(lines)))
        score = rank.score_of(
            definition=definition,
            whole_word=whole_word,
            content_match=bool(lines),
            filename_match=filename_match,
            weight=rank.facts_weight(segment.doc_facts(ordinal, content)),
        )
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
            symbols=symbols,
            path_ranges=path_ranges,
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


def _absolute_ranges(lines: Sequence[RawLineMatch]) -> list[tuple[int, int]]:
    """_absolute_ranges turns line-relative match ranges into byte ranges of the file."""
    return [(m.line_start + s, m.line_start + e) for m in lines for s, e in m.ranges]


class SegmentGone(Exception):
    """SegmentGone tells the parent that a worker could not find a segment by name."""


# One open index and its compiled queries per index directory, per worker process.
_WORKER_STATE: dict[str, tuple[Index, dict[tuple[str, bool], MatchTree]]] = {}


def process_check(
    index_path: str, query: str | Query, regex: bool, deadline: float | None, chunk: list[tuple[str, int]]
) -> tuple[int, list[HitRow], bool]:
    """process_check verifies a part of a search's candidates in a worker process.

    Returns (files verified, matching rows, whether the deadline stopped it).
    """
    state = _WORKER_STATE.get(index_path)
    if state is None:
        state = _WORKER_STATE[index_path] = (Index.open(index_path), {})
    index, trees = state
    key = (str(query), regex)
    tree = trees.get(key)
    if tree is None:
        if regex:
            if not isinstance(query, str):
                raise TypeError("regex=True needs the pattern as a string")
            tree = compile_regex_query(query)
        else:
            tree = compile_query(query)
        trees[key] = tree
    with index.snapshot() as snap:
        index_of = {segment.name: i for i, segment in enumerate(snap.segments)}
        if any(name not in index_of for name, _ in chunk):
            raise SegmentGone(index_path)
        request = SearchRequest(query=query, regex=regex, mode=SearchMode.EXHAUSTIVE, limit_files=None)
        run = Run(RunContext(encode=_no_cursor, index_path=index_path), snap, tree, request, None, b"")
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


def _no_cursor(cursor: Cursor) -> str:
    raise RuntimeError("worker runs hand out no cursors")
