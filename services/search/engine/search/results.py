"""The shapes a search returns: files with line matches, totals, limits, stats and a cursor.

Everything here is a frozen Record (record.py) so that results can cross threads, be cached
and be compared in tests. Byte offsets are UTF-8 byte offsets; columns count Unicode code points,
1-based, as editors and `grep --column` do. A `LineMatch`'s ranges are relative to the start
of its line, so a client can highlight `line` without knowing the rest of the file.
"""

from __future__ import annotations

import enum

from services.search.engine.model import Symbol
from services.search.engine.record import Record, field


class SearchMode(enum.StrEnum):
    """SearchMode chooses between a fast first page and exact totals.

    FIRST_PAGE verifies candidates in a cheap prior order and stops once it has enough
    well-ranked files; EXHAUSTIVE verifies every candidate, so totals and order are exact.
    """

    FIRST_PAGE = "first_page"
    EXHAUSTIVE = "exhaustive"


class LimitReason(enum.StrEnum):
    """LimitReason says why a search stopped counting before it had seen every candidate."""

    FILE_LIMIT = "file_limit"
    MATCH_LIMIT = "match_limit"
    DEADLINE = "deadline"


class MatchRange(Record):
    """MatchRange is one match within a line: byte offsets and 1-based code-point columns.

    `start`/`end` are byte offsets relative to the line's first byte (end exclusive);
    `start_column` is the column of the first matched character and `end_column` the column
    just past the last one.
    """

    start: int
    end: int
    start_column: int
    end_column: int


class ContextLine(Record):
    """ContextLine is a non-matching line shown around a match."""

    line_number: int
    text: str


class LineMatch(Record):
    """LineMatch is one matching line of a file.

    `line_start` is the byte offset of the line in the file; `text` is the line without its
    newline (invalid UTF-8 cannot occur: such files are never indexed). `symbol` is the
    innermost definition whose line span contains the line, when symbols are known.
    """

    line_number: int
    line_start: int
    text: str
    ranges: tuple[MatchRange, ...]
    before: tuple[ContextLine, ...] = ()
    after: tuple[ContextLine, ...] = ()
    symbol: Symbol | None = None


class FileMatch(Record):
    """FileMatch is one matching file with its score and the lines that matched.

    `match_count` counts matching lines truly; `line_matches` may hold fewer when the
    per-search match limit cut them. `path_ranges` are byte ranges in `path` matched by the
    query's path terms (for highlighting `type:path` results); `symbols` lists the symbol
    definitions a `sym:` query matched. `score` is rank.py's; higher ranks first.
    """

    path: str
    repository: str
    language: str
    external_id: str
    score: float
    match_count: int
    line_matches: tuple[LineMatch, ...] = ()
    path_ranges: tuple[tuple[int, int], ...] = ()
    symbols: tuple[Symbol, ...] = ()


class SearchStats(Record):
    """SearchStats describes the work a search did.

    `candidates` is the number of documents the trigram plan (and filters) left to verify;
    `files_verified` how many of those were read and run through the matcher;
    `scan_fallback` is set when the plan had no usable trigram and every live document was a
    candidate (bounded by the limits and deadline like any other search); `plan` is the
    plan's canonical string.
    """

    candidates: int = 0
    files_verified: int = 0
    segments_searched: int = 0
    duration_seconds: float = 0.0
    scan_fallback: bool = False
    exact_order: bool = True
    plan: str = ""


class SearchResult(Record):
    """SearchResult is one page of a search.

    `file_count` and `match_count` are the true numbers of matching files and lines when
    `limit_hit` is false, and lower bounds otherwise (with `limit_reason` saying why counting
    stopped). `files` holds at most the requested page, best first. `next_cursor` continues
    after this page, or is None when there is nothing more. `generation` names the index
    snapshot the page was computed on.
    """

    files: tuple[FileMatch, ...]
    file_count: int
    match_count: int
    limit_hit: bool = False
    limit_reason: LimitReason | None = None
    stats: SearchStats = field(default_factory=SearchStats)
    next_cursor: str | None = None
    generation: int = 0


def columns_for(line: bytes, start: int, end: int) -> tuple[int, int]:
    """columns_for converts a byte range within a UTF-8 line into 1-based code-point columns.

    A code point starts at every byte that is not a continuation byte (0b10xxxxxx), so the
    column of byte offset `b` is one plus the number of such bytes before it.
    """
    start_col = 1 + _count_char_starts(line, 0, start)
    end_col = start_col + _count_char_starts(line, start, end)
    return start_col, end_col


def _count_char_starts(data: bytes, lo: int, hi: int) -> int:
    chunk = data[lo:hi]
    if chunk.isascii():
        return len(chunk)
    return sum(1 for b in chunk if b & 0xC0 != 0x80)


def match_range(line: bytes, start: int, end: int) -> MatchRange:
    """match_range builds a MatchRange for bytes [start, end) of line."""
    start_col, end_col = columns_for(line, start, end)
    return MatchRange(start=start, end=end, start_column=start_col, end_column=end_col)
