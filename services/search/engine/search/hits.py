"""Hits: verified matches on their way to becoming result entries.

The searcher verifies candidates into `Hit`s (score, rank key, raw line matches), keeps the
best of them for the page, and only then turns the page's hits into `FileMatch`es with line
text, columns, context lines and enclosing symbols (`file_match`). A hit crosses a process
boundary as a plain tuple (`HitRow`) when verification is split over worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.search.engine.index.format import SYMBOL_RECORD
from services.search.engine.index.reader import SegmentReader
from services.search.engine.model import Symbol
from services.search.engine.query.verify import LineMatch as RawLineMatch
from services.search.engine.record import Record
from services.search.engine.search import rank
from services.search.engine.search.cursor import RankKey, rank_key
from services.search.engine.search.results import ContextLine, FileMatch, LineMatch, MatchRange, match_range


class Hit(Record, frozen=False):
    """Hit is one verified, matching file before its page entry is built."""

    key: RankKey
    segment: int
    ordinal: int
    path: str
    repository: str
    language: str
    external_id: str
    score: float
    lines: list[RawLineMatch]
    symbols: tuple[Symbol, ...] = ()
    path_ranges: tuple[tuple[int, int], ...] = ()
    table: rank.SymbolTable | None = None

    def __lt__(self, other: Hit) -> bool:
        # heapq keeps the worst page entry on top: invert the rank order.
        return self.key > other.key


# A verified match as it crosses a process boundary: segment name, ordinal, document
# strings, score, raw lines (line number, start, end, ranges), symbols, path ranges.
HitRow = tuple[
    str,
    int,
    str,
    str,
    str,
    str,
    float,
    list[tuple[int, int, int, tuple[tuple[int, int], ...]]],
    tuple[Symbol, ...],
    tuple[tuple[int, int], ...],
]


def hit_to_row(found: Hit, name: str) -> HitRow:
    """hit_to_row flattens a hit for pickling; `name` is its segment's name."""
    lines = [(m.line_number, m.line_start, m.line_end, m.ranges) for m in found.lines]
    return (
        name,
        found.ordinal,
        found.path,
        found.repository,
        found.language,
        found.external_id,
        found.score,
        lines,
        found.symbols,
        found.path_ranges,
    )


def hit_from_row(row: HitRow, index_of: dict[str, int]) -> Hit:
    """hit_from_row rebuilds a hit, mapping the segment name to this snapshot's index."""
    name, ordinal, path, repository, language, external_id, score, lines, symbols, path_ranges = row
    return Hit(
        key=rank_key(score, path, repository, external_id),
        segment=index_of[name],
        ordinal=ordinal,
        path=path,
        repository=repository,
        language=language,
        external_id=external_id,
        score=score,
        lines=[RawLineMatch(n, start, end, ranges) for n, start, end, ranges in lines],
        symbols=symbols,
        path_ranges=path_ranges,
    )


def file_match(segment: SegmentReader, found: Hit, *, context_lines: int, with_symbols: bool) -> FileMatch:
    """file_match builds a hit's result entry: line text, columns, context, enclosing symbols."""
    view = segment.content(found.ordinal)
    context = context_lines
    content = bytes(view) if context and found.lines else b""
    table = None
    if found.lines and with_symbols:
        table = found.table if found.table is not None else symbol_table(segment, found.ordinal)
    line_starts: list[int] | None = None
    line_matches: list[LineMatch] = []
    enclosing = table.enclosing_many([raw.line_number for raw in found.lines]) if table else None
    for at, raw in enumerate(found.lines):
        line = bytes(view[raw.line_start : raw.line_end])
        if line.isascii():
            # One byte per column: no need to count characters.
            ranges = _ascii_ranges(raw.ranges)
            text = line.decode("ascii")
        else:
            ranges = tuple(match_range(line, s, e) for s, e in raw.ranges)
            text = line.decode("utf-8", "replace")
        before: tuple[ContextLine, ...] = ()
        after: tuple[ContextLine, ...] = ()
        if context:
            if line_starts is None:
                line_starts = _line_starts(content)
            before, after = _context(content, line_starts, raw.line_number, context)
        line_matches.append(
            LineMatch(
                line_number=raw.line_number,
                line_start=raw.line_start,
                text=text,
                ranges=ranges,
                before=before,
                after=after,
                symbol=enclosing[at] if enclosing is not None else None,
            )
        )
    return FileMatch(
        path=found.path,
        repository=found.repository,
        language=found.language,
        external_id=found.external_id,
        score=found.score,
        match_count=len(found.lines),
        line_matches=tuple(line_matches),
        path_ranges=found.path_ranges,
        symbols=found.symbols,
    )


# MatchRanges are immutable, so ASCII lines with the same byte ranges share one tuple of them:
# an exhaustive `spin_lock_irqsave` over Linux builds 17,848 lines with few distinct ranges.
_ASCII_RANGES: dict[tuple[tuple[int, int], ...], tuple[MatchRange, ...]] = {}
_ASCII_RANGES_MAX = 1 << 16


def _ascii_ranges(ranges: tuple[tuple[int, int], ...]) -> tuple[MatchRange, ...]:
    """_ascii_ranges returns the MatchRanges of byte ranges in an ASCII line (column = byte + 1)."""
    found = _ASCII_RANGES.get(ranges)
    if found is None:
        found = tuple(MatchRange(s, e, s + 1, e + 1) for s, e in ranges)
        if len(_ASCII_RANGES) >= _ASCII_RANGES_MAX:
            _ASCII_RANGES.clear()
        _ASCII_RANGES[ranges] = found
    return found


def symbol_table(segment: SegmentReader, ordinal: int) -> rank.SymbolTable:
    """symbol_table reads a document's symbol spans without decoding names (see rank.SymbolTable).

    The records are read in place from the segment's mapped symbols.bin
    (`SegmentReader.symbol_spans`); one symbol's strings are decoded only when it is reported
    as a match's enclosing definition.
    """
    spans = segment.symbol_spans(ordinal)
    if not spans.count:
        return rank.SymbolTable.empty()
    return rank.SymbolTable(spans.records, spans.count, SYMBOL_RECORD.size, spans.symbol)


def _line_starts(content: bytes) -> list[int]:
    starts = [0]
    at = content.find(b"\n")
    while at >= 0:
        starts.append(at + 1)
        at = content.find(b"\n", at + 1)
    return starts


def _context(
    content: bytes, starts: Sequence[int], line_number: int, count: int
) -> tuple[tuple[ContextLine, ...], tuple[ContextLine, ...]]:
    """_context returns up to `count` lines before and after a 1-based line."""
    last_line = len(starts) if starts[-1] < len(content) else len(starts) - 1

    def text(n: int) -> ContextLine:
        begin = starts[n - 1]
        end = starts[n] - 1 if n < len(starts) else len(content)
        return ContextLine(n, content[begin:end].decode("utf-8", "replace"))

    before = tuple(text(n) for n in range(max(1, line_number - count), line_number))
    after = tuple(text(n) for n in range(line_number + 1, min(last_line, line_number + count) + 1))
    return before, after
