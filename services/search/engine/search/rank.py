"""Ranking: how a matching file's score is made, and the cheap prior used to order work.

A file's score is the product of two parts:

* content tier, the best of its matches: a match covering a symbol definition's name (100), a
  whole-word match (10), any other match (1), or no content match at all (0, a file that
  matched only through `type:path` or `file:`); plus 5 when the query's pattern also matches
  the file's base name (filename match);
* a path weight: 1 for ordinary files, 0.3 for tests, 0.2 for vendored code, 0.1 for
  generated files (multiplied when several apply).

Scores are discrete on purpose: most files in a large result set tie (a whole-word call
site in an ordinary file scores 10), and the tie-break by path in cursor.rank_key then
gives a stable, readable order. Match counts are deliberately not part of the score: a
file that mentions a name 40 times is not a better answer than one that defines it.

`prior_weights` bounds a file's weight from the path facts stored in its segment (format.py's
document facts; a content marker can only lower it), and the searcher verifies candidates in
that order times the best possible tier, so a first page sees ordinary files first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.search.engine.model import Symbol
from services.search.engine.record import Record

DEFINITION = 100.0
WHOLE_WORD = 10.0
SUBSTRING = 1.0
FILENAME = 5.0

TEST_WEIGHT = 0.3
VENDORED_WEIGHT = 0.2
GENERATED_WEIGHT = 0.1

# Up to this many (range, symbol) pairs the definition check is one broadcast comparison.
_BROADCAST_LIMIT = 4096


class RankSignals(Record):
    """RankSignals are the facts about one matching file that its score is computed from."""

    definition: bool = False
    whole_word: bool = False
    content_match: bool = False
    filename_match: bool = False
    test: bool = False
    vendored: bool = False
    generated: bool = False


def path_weight(*, test: bool, vendored: bool, generated: bool) -> float:
    """path_weight is the multiplier that pushes tests, vendored and generated files down."""
    weight = 1.0
    if test:
        weight *= TEST_WEIGHT
    if vendored:
        weight *= VENDORED_WEIGHT
    if generated:
        weight *= GENERATED_WEIGHT
    return weight


# path_weight of every combination of the three path bits of a document's facts (format.py).
_PRIOR_WEIGHTS = np.array(
    [path_weight(test=bool(f & 1), vendored=bool(f & 2), generated=bool(f & 4)) for f in range(8)],
    dtype=np.float64,
)


def prior_weights(facts: NDArray[np.uint8]) -> NDArray[np.float64]:
    """prior_weights maps documents' facts bits to their path-only weights (bounding the final ones)."""
    weights: NDArray[np.float64] = _PRIOR_WEIGHTS[facts & 7]
    return weights


def facts_weight(facts: int) -> float:
    """facts_weight is a document's final path weight from all its facts bits (content marker included)."""
    return path_weight(test=bool(facts & 1), vendored=bool(facts & 2), generated=bool(facts & 12))


def content_tier(signals: RankSignals) -> float:
    """content_tier is the value of a file's best content match (see the module docstring)."""
    if signals.definition:
        return DEFINITION
    if signals.whole_word:
        return WHOLE_WORD
    if signals.content_match:
        return SUBSTRING
    return 0.0


def score(signals: RankSignals, weight: float | None = None) -> float:
    """score computes a file's rank score from its signals; higher ranks first.

    `weight`, when given, is the file's path weight already worked out (the searcher caches
    it per document); otherwise it comes from the signals' test/vendored/generated flags.
    """
    base = content_tier(signals) + (FILENAME if signals.filename_match else 0.0)
    if weight is None:
        weight = path_weight(test=signals.test, vendored=signals.vendored, generated=signals.generated)
    return round(base * weight, 6)


def _is_word_byte(b: int) -> bool:
    # ASCII word characters, matching RE2's \b so "whole word" agrees with /\bname\b/.
    return (48 <= b <= 57) or (65 <= b <= 90) or (97 <= b <= 122) or b == 95


def is_whole_word(line: bytes, start: int, end: int) -> bool:
    """is_whole_word reports whether line[start:end] is bounded by non-word bytes or the line ends.

    An empty range is never a whole word. A match that itself starts or ends with a non-word
    byte (`foo(`) counts as whole at that edge, as a user reading it would expect.
    """
    if end <= start:
        return False
    left_ok = start == 0 or not _is_word_byte(line[start - 1]) or not _is_word_byte(line[start])
    right_ok = end == len(line) or not _is_word_byte(line[end]) or not _is_word_byte(line[end - 1])
    return left_ok and right_ok


class SymbolTable:
    """SymbolTable answers "which definition is this line in" and "is this match a definition".

    It works on an (n, 4) array of `start_line, end_line, start_byte, end_byte` per symbol,
    so a file's hundreds of definitions are checked with a few numpy operations instead of
    decoding every name: on the stdlib corpus, decoding full Symbol records for each
    matching file took 0.65 s of a 0.73 s exhaustive `def __init__` search. `symbol(i)`
    decodes the i-th full record when an enclosing symbol is reported.
    """

    def __init__(self, spans: NDArray[np.integer[Any]], symbol: Callable[[int], Symbol]) -> None:
        # Views only: building sorted copies here cost ~60 us per matching file, more than the
        # checks below on the few ranges a file usually has.
        self._spans = spans.reshape(-1, 4) if spans.size else np.zeros((0, 4), dtype=np.int64)
        self._symbol = symbol

    @classmethod
    def from_symbols(cls, symbols: Sequence[Symbol]) -> SymbolTable:
        """from_symbols builds a table from decoded symbols (tests, small inputs)."""
        spans = np.array(
            [(s.start_line, s.end_line, s.start_byte, s.end_byte) for s in symbols], dtype=np.int64
        )
        return cls(spans, lambda i: symbols[i])

    def __bool__(self) -> bool:
        return bool(len(self._spans))

    def defines(self, abs_ranges: Sequence[tuple[int, int]]) -> bool:
        """defines reports whether any byte range (absolute in the file) covers a definition's name.

        The whole name must lie inside the match: `Parser` defines at `class Parser`, but a
        match of `parser` inside `Reparser` is only a substring hit. Symbols without recorded
        name offsets (start_byte == end_byte) never count.
        """
        if not len(self._spans) or not abs_ranges:
            return False
        starts = self._spans[:, 2]
        ends = self._spans[:, 3]
        named = ends > starts
        if len(abs_ranges) == 1:
            # The common case, without building a ranges array.
            lo, hi = abs_ranges[0]
            return bool((named & (starts >= lo) & (ends <= hi)).any())
        starts = starts.astype(np.int64)
        ends = ends.astype(np.int64)
        ranges = np.asarray(abs_ranges, dtype=np.int64).reshape(-1, 2)
        if len(ranges) * len(starts) <= _BROADCAST_LIMIT:
            inside = (starts[None, :] >= ranges[:, :1]) & (ends[None, :] <= ranges[:, 1:]) & named[None, :]
            return bool(inside.any())
        # Many ranges and symbols: names of distinct definitions never overlap, so sorted by
        # start their ends ascend too, and only the first name at or after a range can fit.
        order = np.argsort(starts[named], kind="stable")
        name_starts, name_ends = starts[named][order], ends[named][order]
        idx = np.searchsorted(name_starts, ranges[:, 0], side="left")
        valid = idx < len(name_starts)
        return bool((name_ends[idx[valid]] <= ranges[valid, 1]).any())

    def enclosing(self, line_number: int) -> Symbol | None:
        """enclosing returns the innermost definition whose line span contains line_number."""
        spans = self._spans
        if not len(spans):
            return None
        inside = np.flatnonzero((spans[:, 0] <= line_number) & (spans[:, 1] >= line_number))
        if not len(inside):
            return None
        # Innermost: the shortest span; among equals, the one starting last.
        width = spans[inside, 1] - spans[inside, 0]
        best = inside[np.lexsort((-spans[inside, 0], width))[0]]
        return self._symbol(int(best))
