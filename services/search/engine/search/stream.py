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

The deadline and the cancellation event are checked between files; a stream cut short by
the deadline ends early with `limit_reason` DEADLINE, so its totals are lower bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

from services.search.engine.errors import SearchCancelled
from services.search.engine.index.index import Snapshot
from services.search.engine.query.matchtree import DocFacts, MatchTree
from services.search.engine.query.verify import pack_groups
from services.search.engine.record import Record
from services.search.engine.search.candidates import segment_candidates
from services.search.engine.search.results import LimitReason


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

    def _pairs(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """_pairs yields (segment index, ordinal) of candidates [start, stop) in index order."""
        at = 0
        for seg_index, ordinals in self._found():
            lo, hi = max(start - at, 0), min(stop - at, len(ordinals))
            for i in range(lo, hi):
                yield seg_index, ordinals[i]
            at += len(ordinals)
            if at >= stop:
                return

    def files(self, start: int, stop: int) -> Iterator[StreamedFile]:
        """files yields the matching files among candidates [start, stop), in index order.

        Contiguous ranges let a caller split one stream over processes (the CLI forks for a
        large one) and still print in index order.
        """
        sole = self.tree.sole_matcher
        segments = self.snap.segments
        for seg_index, ordinal in self._pairs(start, stop):
            if self.cancel is not None and self.cancel.is_set():
                raise SearchCancelled("search cancelled")
            if self.deadline is not None and self.clock() >= self.deadline:
                self.limit_reason = LimitReason.DEADLINE
                return
            self.verified += 1
            segment = segments[seg_index]
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
                path, repository, external_id, content, groups, line_count, match_count, seg_index, ordinal
            )
