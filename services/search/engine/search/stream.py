"""stream holds streaming and counting: every match of a query in index order, no ranking or pages.

`kotadb index search --all` and exact totals do not need what a page needs (a score per
file, a heap, line objects with text, columns and symbols); they need every matching line,
fast. A `MatchStream` walks a snapshot's candidates in index order (segments are path
sorted) and yields one `StreamedFile` per matching file: its stored content and its
matching lines packed as int64 groups (`_fastscan.render_lines` turns them into output
without a Python object per line), or, when counting, only its line and match counts. A
query that is one content term is matched directly by its LineMatcher, natively for a
literal (`_fastscan.scan_literal`, `count_literal`); any other query is evaluated with
its match tree, as a ranked search would.

Counting one content term goes a batch of candidates at a time: one native call each
verifies their content blocks, counts their matching lines and reads the names of the
matching ones, so Python touches only matching files (`MatchStream.counts` not even a
StreamedFile). On Linux, `kotadb index search --count` of `0x[0-9a-f]{8}` (37,551
candidates) went from 572 to 423 ms and `^#include <linux/[a-z_]+\\.h>$` from 601 to
457 ms (median of 5, load 3).

The deadline and the cancellation event are checked between files (between batches when
counting); a stream cut short by the deadline ends early with `limit_reason` DEADLINE, so
its totals are lower bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

from services.search.engine.errors import IndexFileError, SearchCancelled
from services.search.engine.index.index import Snapshot
from services.search.engine.index.reader import SegmentReader
from services.search.engine.query.matchtree import DocFacts, MatchTree
from services.search.engine.query.verify import LineMatcher, pack_groups
from services.search.engine.record import Record
from services.search.engine.search.candidates import segment_candidates
from services.search.engine.search.results import LimitReason

# Candidates counted per native call when a stream counts a single content term: large
# enough that Python's cost per batch vanishes, small enough that the deadline and the
# cancellation event are still checked every few milliseconds.
COUNT_BATCH = 128

# What a candidate costs a counting stream besides its bytes, in bytes (MatchStream.middle):
# on Linux, cutting `0x[0-9a-f]{8}` (37,551 candidates) at half the candidates left 37% of
# the bytes in the first half (199 / 239 ms of CPU per half), at half the bytes 243 / 190,
# with 16 KiB per candidate 216 / 225; `^#include <linux/[a-z_]+\\.h>$` 138 / 161 -> 141 / 148.
MIDDLE_COST = 16384


class StreamedFile(Record):
    """StreamedFile is one matching file of a stream.

    `content` is the stored content (a view valid while the stream's snapshot is open);
    `groups` its matching lines packed for `_fastscan.render_lines` (empty when counting,
    or for a file that matched by path only); `match_count` counts matches within those
    lines (0 when counting: only lines are counted). `segment` (its index in the snapshot)
    and `ordinal` say where the file is, so a caller can build its full result entry.
    """

    path: str
    repository: str
    external_id: str
    content: bytes | memoryview
    groups: bytes
    line_count: int
    match_count: int
    segment: int = 0
    ordinal: int = 0


class _Batch(Record):
    """_Batch is the matching files of one batch of a counting stream (MatchStream._batches).

    File i is `ordinals[i]` of segment `segment`, with `counts[i]` matching lines, `names[i]`
    (external_id, path, repository) and content `content[spans[2i]:spans[2i+1]]`.
    """

    segment: int
    ordinals: list[int]
    counts: list[int]
    names: list[tuple[str, str, str]]
    content: memoryview
    spans: list[int]


class _Window(NamedTuple):
    """_Window is candidates at..end-1 of one segment's list (see MatchStream._windows)."""

    seg_index: int
    segment: SegmentReader
    ordinals: Sequence[int]
    spans: memoryview
    first: int
    at: int
    end: int


class MatchStream:
    """MatchStream iterates the matching files of one query on one snapshot, in index order.

    `lines=False` counts only. `file_count`, `match_count` (matching lines) and
    `limit_reason` are complete once the iteration has ended.
    """

    def __init__(
        self,
        snap: Snapshot,
        tree: MatchTree,
        *,
        lines: bool = True,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snap = snap
        self.tree = tree
        self.lines = lines
        self.deadline = deadline
        self.cancel = cancel
        self.clock = clock
        self._candidates: list[tuple[int, Sequence[int]]] | None = None
        self._spans: dict[int, bytes] = {}
        self.verified = 0
        self.file_count = 0
        self.match_count = 0
        self.limit_reason: LimitReason | None = None

    @property
    def candidates(self) -> int:
        """candidates is the number of documents the stream verifies (its plan evaluated once)."""
        return sum(len(ordinals) for _, ordinals in self._found())

    def _found(self) -> list[tuple[int, Sequence[int]]]:
        # Per segment, in index order; plain sequences: a stream never needs numpy.
        if self._candidates is None:
            self._candidates = [
                (i, segment_candidates(self.tree, segment)) for i, segment in enumerate(self.snap.segments)
            ]
        return self._candidates

    def __iter__(self) -> Iterator[StreamedFile]:
        return self.files(0, self.candidates)

    def middle(self) -> int:
        """middle is the candidate that cuts the stream's work in two halves, for two processes.

        A stream counting one content term weighs each candidate by its content's bytes
        (every byte is checksummed and scanned) plus MIDDLE_COST for the rest of its work;
        any other stream cuts its candidates in half. Reads only document records.
        """
        total = self.candidates
        if self.tree.sole_matcher is None or self.lines or total < 2:
            return total // 2
        cost = MIDDLE_COST
        weights: list[tuple[memoryview, int]] = []  # per segment: its spans and their weight
        for seg_index, _ in self._found():
            try:
                spans = memoryview(self.spans(seg_index)).cast("q")
            except IndexFileError:
                return total // 2  # the stream itself will report the corruption where it lies
            weights.append((spans, sum(spans[1::2]) - sum(spans[0::2]) + cost * (len(spans) // 2)))
        half, acc, at = sum(weight for _, weight in weights) / 2, 0, 0
        for spans, weight in weights:
            if acc + weight < half:
                acc += weight
                at += len(spans) // 2
                continue
            for i in range(len(spans) // 2):
                acc += spans[2 * i + 1] - spans[2 * i] + cost
                if acc >= half:
                    return at + i + 1
        return total

    def _ranges(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """_ranges yields (segment index, lo, hi, first) per segment holding candidates [start, stop).

        Its candidates lo..hi-1 (positions in the segment's list) are candidates first+lo..
        first+hi-1 of the stream.
        """
        at = 0
        for seg_index, ordinals in self._found():
            lo, hi = max(start - at, 0), min(stop - at, len(ordinals))
            if lo < hi:
                yield seg_index, lo, hi, at
            at += len(ordinals)
            if at >= stop:
                return

    def files(self, start: int, stop: int) -> Iterator[StreamedFile]:
        """files yields the matching files among candidates [start, stop), in index order.

        Contiguous ranges let a caller split one stream over processes (the CLI forks for a
        large one) and still print in index order.
        """
        sole = self.tree.sole_matcher
        if sole is not None:
            return self._grouped(sole, start, stop) if self.lines else self._counted(sole, start, stop)
        return self._each(start, stop, handover=True)

    def _stopped(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            raise SearchCancelled("search cancelled")
        if self.deadline is not None and self.clock() >= self.deadline:
            self.limit_reason = LimitReason.DEADLINE
            return True
        return False

    def spans(self, seg_index: int) -> bytes:
        """spans returns the content.bin (start, end) int64 pairs of a segment's candidates, read once."""
        found = self._spans.get(seg_index)
        if found is None:
            ordinals = self._found()[seg_index][1]
            found = self._spans[seg_index] = self.snap.segments[seg_index].content_spans(ordinals)
        return found

    def counts(self, start: int, stop: int) -> Iterator[tuple[str, int]]:
        """counts yields (path, matching lines) of the matching files among candidates [start, stop).

        It is `files` for a caller that prints only counts (`kotadb index search --count`):
        when the stream counts a single content term, no StreamedFile is built.
        """
        sole = self.tree.sole_matcher
        if sole is None or self.lines:
            for file in self._each(start, stop):
                yield file.path, file.line_count
            return
        for batch in self._batches(sole, start, stop):
            if isinstance(batch, StreamedFile):
                yield batch.path, batch.line_count
            else:
                for (_, path, _), line_count in zip(batch.names, batch.counts, strict=True):
                    yield path, line_count

    def _counted(self, sole: LineMatcher, start: int, stop: int) -> Iterator[StreamedFile]:
        """_counted is `files` when counting a single content term (see `_batches`)."""
        for batch in self._batches(sole, start, stop):
            if isinstance(batch, StreamedFile):
                yield batch
                continue
            content, spans, seg_index = batch.content, batch.spans, batch.segment
            for i, (external_id, path, repository) in enumerate(batch.names):
                view = content[spans[2 * i] : spans[2 * i + 1]]
                line_count, ordinal = batch.counts[i], batch.ordinals[i]
                yield StreamedFile(
                    path, repository, external_id, view, b"", line_count, 0, seg_index, ordinal
                )

    def _batches(self, sole: LineMatcher, start: int, stop: int) -> Iterator[_Batch | StreamedFile]:
        """_batches counts candidates [start, stop) natively, COUNT_BATCH at a time.

        Per batch, one call verifies the candidates' content blocks, one counts their
        matching lines (`LineMatcher.count_spans`) and one reads the matching files' names:
        Python touches only the matching files. A batch that fails a check is verified again
        file by file (`_each`, whose StreamedFiles are yielded as they are), so the files
        before the corrupt one still come out and the error is raised where it lies.
        """
        for window in self._windows(start, stop):
            if isinstance(window, StreamedFile):
                yield window
                continue
            if self._stopped():
                return
            seg_index, segment, ordinals, spans, first, at, end = window
            batch = spans[2 * at : 2 * end]
            try:
                content = segment.verified_content(batch)
                counts = memoryview(sole.count_spans(content, batch)).cast("q")
                hits = [i for i, n in enumerate(counts) if n]
                matched = [ordinals[at + i] for i in hits]
                names = segment.names_of(matched)
            except IndexFileError:
                yield from self._each(first + at, first + end)
                if self.limit_reason is not None:
                    return
                continue
            self.verified += end - at
            if not hits:
                continue
            lines = [counts[i] for i in hits]
            self.file_count += len(hits)
            self.match_count += sum(lines)
            wanted = [spans[2 * (at + i) + k] for i in hits for k in (0, 1)]
            yield _Batch(seg_index, matched, lines, names, content, wanted)

    def _windows(self, start: int, stop: int, *, handover: bool = False) -> Iterator[_Window | StreamedFile]:
        """_windows cuts candidates [start, stop) into windows of COUNT_BATCH within a segment.

        Each comes with the segment's content spans (read once per segment); a segment whose
        spans cannot be read is streamed file by file (`_each`) instead, its files yielded as
        they are, so a corrupt table is reported where it lies.
        """
        segments = self.snap.segments
        for seg_index, lo, hi, first in self._ranges(start, stop):
            try:
                spans = memoryview(self.spans(seg_index)).cast("q")
            except IndexFileError:
                yield from self._each(first + lo, first + hi, handover=handover)
                if self.limit_reason is not None:
                    return
                continue
            ordinals = self._found()[seg_index][1]
            for at in range(lo, hi, COUNT_BATCH):
                end = min(at + COUNT_BATCH, hi)
                yield _Window(seg_index, segments[seg_index], ordinals, spans, first, at, end)

    def _grouped(self, sole: LineMatcher, start: int, stop: int) -> Iterator[StreamedFile]:
        """_grouped is `files` with lines for a single content term, COUNT_BATCH candidates at a time.

        Per batch, one call verifies the candidates' content blocks and one reads the matching
        files' names; each file's lines are found natively on a slice of the mapped content.
        A file at a time, this bookkeeping (a record, a region check and the names per file)
        was ~40 % of `--all ab` over Linux's 54,000 matching files. The deadline is checked
        before each candidate and cancellation before each file yielded, as `_each` does; a
        caller that sets `lines` to False midway has the rest counted (`_counted`), and a
        batch that fails a check is verified again file by file (`_each`), so the error is
        raised where it lies.
        """
        for window in self._windows(start, stop, handover=True):
            if isinstance(window, StreamedFile):
                yield window
                continue
            seg_index, segment, ordinals, spans, first, at, end = window
            picked: list[tuple[int, bytes, int, int]] = []
            done = at
            try:
                content = segment.verified_content(spans[2 * at : 2 * end])
                while done < end and not self._stopped():
                    view = content[spans[2 * done] : spans[2 * done + 1]]
                    groups, line_count, match_count = sole.groups(view)
                    if line_count:
                        picked.append((done, groups, line_count, match_count))
                    done += 1
                names = segment.names_of([ordinals[i] for i, _, _, _ in picked])
            except IndexFileError:
                yield from self._each(first + at, first + end, handover=True)
                if self.limit_reason is not None:
                    return
                continue
            counted = at  # candidates reported verified: up to the file being yielded
            for (i, groups, line_count, match_count), (external_id, path, repository) in zip(
                picked, names, strict=True
            ):
                if self.cancel is not None and self.cancel.is_set():
                    raise SearchCancelled("search cancelled")
                self.verified += i + 1 - counted
                counted = i + 1
                if not self.lines:
                    groups, match_count = b"", 0  # told to count midway
                self.file_count += 1
                self.match_count += line_count
                view = content[spans[2 * i] : spans[2 * i + 1]]
                yield StreamedFile(
                    path,
                    repository,
                    external_id,
                    view,
                    groups,
                    line_count,
                    match_count,
                    seg_index,
                    ordinals[i],
                )
            self.verified += done - counted
            if done < end:
                return  # the deadline
            if not self.lines:
                yield from self._counted(sole, first + end, stop)
                return

    def _each(self, start: int, stop: int, *, handover: bool = False) -> Iterator[StreamedFile]:
        """_each is `files` one candidate at a time (a query tree, or lines wanted).

        With `handover`, a caller that sets `lines` to False mid-stream (the search service,
        once it has the files it shows) has the rest counted in batches (`_counted`).
        """
        sole = self.tree.sole_matcher
        segments = self.snap.segments
        for seg_index, lo, hi, first in self._ranges(start, stop):
            segment = segments[seg_index]
            ordinals = self._found()[seg_index][1]
            for i in range(lo, hi):
                if handover and sole is not None and not self.lines:
                    yield from self._counted(sole, first + i, stop)
                    return
                if self._stopped():
                    return
                ordinal = ordinals[i]
                self.verified += 1
                content = segment.content(ordinal)
                if sole is not None:
                    if self.lines:
                        groups, line_count, match_count = sole.groups(content)
                    else:
                        groups, line_count, match_count = b"", sole.count(content), 0
                    if not line_count:
                        continue
                    external_id, path, repository = segment.names(ordinal)
                else:
                    data = bytes(content)
                    record = segment.doc(ordinal)
                    facts = DocFacts(path=record.path, language=record.language, repository=record.repository)
                    outcome = self.tree.evaluate(facts, data, partial(segment.symbols, ordinal))
                    if outcome is None:
                        continue
                    external_id, path, repository = record.external_id, record.path, record.repository
                    groups = pack_groups(outcome.lines) if self.lines else b""
                    line_count = len(outcome.lines)
                    match_count = sum(len(line.ranges) for line in outcome.lines) if self.lines else 0
                self.file_count += 1
                self.match_count += line_count
                yield StreamedFile(
                    path,
                    repository,
                    external_id,
                    content,
                    groups,
                    line_count,
                    match_count,
                    seg_index,
                    ordinal,
                )
