"""Verification of candidate documents: exact, line-oriented matching with RE2 semantics.

`LineMatcher` finds every matching line of a document like `rg --json` does: a match never
spans a newline, `^`/`$` (and `\\A`/`\\z`, as ripgrep treats them) match at line boundaries,
and within a line matches are leftmost-first and non-overlapping, with an empty match that
abuts the previous match skipped (Rust's `find_iter`). Offsets are UTF-8 byte offsets.

Three strategies, chosen once per pattern from measurements (2,000 CPython stdlib files,
19 MB, one core of the shared 2-core machine, find() over every file; see the numbers below):

* a case-sensitive literal (or a regex that parses to one) is found with `bytes.find`, which
  is memchr/two-way speed in CPython: `def __init__` 0.021 s vs RE2 0.031 s;
* a regex that does not start with a literal but contains a required literal of 3+ bytes
  looks for that literal first and runs RE2 only on the lines that contain it:
  `\\bcontextmanager\\b` 0.007 s vs RE2 0.041 s, `\\w+_probe\\(struct` 0.007 s vs 0.030 s;
  case-insensitively over an ASCII-lowered copy when the literal is ASCII without `k`/`s`
  (RE2's `(?i)` also lets those match KELVIN SIGN and LONG S): 0.014 s vs 0.031 s;
* everything else runs RE2 over the whole buffer, one call per match, in multi-line mode.
  That includes regexes that start with a literal and case-insensitive literals, where RE2's
  own prefix acceleration wins: `def test_\\w+_unicode` 0.008 s vs prefilter 0.018 s,
  `(?i)http_proxy` 0.012 s vs folded-copy find 0.022 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import re2
from re2 import _re2

from services.search.engine import regexsyntax as rx

_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_NO_SPAN = (-1, -1)
# UTF-8 continuation bytes: deleting them from a byte string leaves one byte per character.
_CONTINUATION = bytes(range(0x80, 0xC0))
# Required literals shorter than this hit too often to be worth a prefilter pass.
_MIN_PREFILTER = 3
# ASCII letters whose RE2 case orbit has a non-ASCII member (KELVIN SIGN, LONG S).
_UNSAFE_FOLD = frozenset("ksKS")


class InvalidPatternError(ValueError):
    """InvalidPatternError carries RE2's message for a pattern it refused to compile."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class LineMatch:
    """LineMatch is one matching line.

    `line_number` is 1-based; `line_start`/`line_end` are byte offsets of the line in the
    document (`line_end` excludes the newline); `ranges` are the `(start, end)` byte offsets of
    every match relative to `line_start`.
    """

    line_number: int
    line_start: int
    line_end: int
    ranges: tuple[tuple[int, int], ...]

    def line(self, content: bytes) -> bytes:
        """LineMatch.line returns the line's bytes (without its newline)."""
        return content[self.line_start : self.line_end]

    def columns(self, content: bytes) -> tuple[tuple[int, int], ...]:
        """LineMatch.columns converts `ranges` to character (code point) offsets in the line."""
        line = self.line(content)
        if line.isascii():
            return self.ranges
        return tuple((char_column(line, start), char_column(line, end)) for start, end in self.ranges)


def char_column(line: bytes, offset: int) -> int:
    """char_column is the number of characters that start before byte `offset` of `line`."""
    head = line[:offset]
    if head.isascii():
        return offset
    return len(head.translate(None, _CONTINUATION))


class CompiledRegex(Protocol):
    """CompiledRegex is the part of the RE2 binding's compiled object the matcher calls."""

    def Match(self, anchor: object, text: bytes, pos: int, endpos: int) -> list[tuple[int, int]]:
        """CompiledRegex.Match returns the spans of the first match in text[pos:endpos]."""
        ...


def compile_regex(pattern: str, *, case_sensitive: bool = True, literal: bool = False) -> CompiledRegex:
    """compile_regex compiles a pattern the way LineMatcher runs it (multi-line, never `\\n`).

    Raises InvalidPatternError with RE2's message when RE2 rejects the pattern.
    """
    options = re2.Options()
    options.never_nl = True
    options.never_capture = True
    options.log_errors = False
    options.case_sensitive = case_sensitive
    options.literal = literal
    source = pattern if literal else "(?m)" + rx.line_anchored(pattern)
    regexp = _re2.RE2(source.encode("utf-8", "surrogatepass"), options)
    if not regexp.ok():
        message = bytes(regexp.error()).decode("utf-8", "replace")
        # RE2 quotes the pattern it saw; show the user's pattern, not our multi-line wrapper.
        raise InvalidPatternError(message.replace(source, pattern) if source != pattern else message)
    return cast(CompiledRegex, regexp)


def _literal_of(node: rx.Node) -> rx.Literal | None:
    """_literal_of returns the pattern as one literal when it is nothing else."""
    if isinstance(node, rx.Literal):
        return node
    if isinstance(node, rx.Concat) and all(isinstance(item, rx.Literal) for item in node.items):
        items = [item for item in node.items if isinstance(item, rx.Literal)]
        if len({item.fold for item in items}) == 1:
            return rx.Literal("".join(item.text for item in items), items[0].fold)
    return None


def _required_literal(node: rx.Node) -> rx.Literal | None:
    """_required_literal is the longest run of literals every match must contain, if any."""
    items = node.items if isinstance(node, rx.Concat) else (node,)
    best: rx.Literal | None = None
    run: list[rx.Literal] = []
    for item in (*items, None):
        if isinstance(item, rx.Literal) and (not run or run[0].fold == item.fold):
            run.append(item)
            continue
        if run:
            joined = rx.Literal("".join(r.text for r in run), run[0].fold)
            if best is None or len(joined.text.encode()) > len(best.text.encode()):
                best = joined
        run = [item] if isinstance(item, rx.Literal) else []
    return best


def _starts_with_literal(node: rx.Node) -> bool:
    """_starts_with_literal says RE2 can accelerate the search with a literal prefix."""
    first = node.items[0] if isinstance(node, rx.Concat) else node
    return isinstance(first, rx.Literal)


def _fold_safe(text: str) -> bool:
    return text.isascii() and not (_UNSAFE_FOLD & set(text))


class LineMatcher:
    """LineMatcher finds the matching lines of documents for one pattern.

    `case_sensitive=False` is RE2's `(?i)` (Unicode simple case folding); `literal=True` takes
    the pattern as plain text. Construction raises InvalidPatternError for a bad regex.
    """

    def __init__(self, pattern: str, *, case_sensitive: bool, literal: bool = False) -> None:
        self.pattern = pattern
        self.case_sensitive = case_sensitive
        self.literal = literal
        self._regexp = compile_regex(pattern, case_sensitive=case_sensitive, literal=literal)
        # The needle searched with bytes.find, and whether to search an ASCII-lowered copy.
        self._needle: bytes | None = None
        self._needle_folded = False
        # True when the needle alone decides matches (no RE2 run needed).
        self._pure_literal = False
        text: str | None = pattern if literal else None
        prefilter: rx.Literal | None = None
        if not literal:
            try:
                root = rx.parse_regex(pattern, case_insensitive=not case_sensitive).root
            except (rx.RegexSyntaxError, RecursionError):
                root = None
            if root is not None:
                whole = _literal_of(root)
                if whole is not None:
                    text = whole.text if not whole.fold else None
                elif not _starts_with_literal(root):
                    prefilter = _required_literal(root)
        if case_sensitive and text and "\n" not in text:
            self._needle = text.encode("utf-8", "surrogatepass")
            self._pure_literal = True
        elif prefilter is not None and (not prefilter.fold or _fold_safe(prefilter.text)):
            needle = prefilter.text.encode("utf-8", "surrogatepass")
            if len(needle) >= _MIN_PREFILTER and b"\n" not in needle:
                self._needle = needle
                self._needle_folded = prefilter.fold

    @property
    def strategy(self) -> str:
        """LineMatcher.strategy names the search path: "literal", "prefilter" or "regex"."""
        if self._pure_literal:
            return "literal"
        return "prefilter" if self._needle is not None else "regex"

    def matches(self, content: bytes | bytearray | memoryview) -> bool:
        """LineMatcher.matches says whether any line of the document matches."""
        data = content if isinstance(content, bytes) else bytes(content)
        if self._needle is not None:
            found = self._needle.lower() in data.lower() if self._needle_folded else self._needle in data
            if not found:
                return False
            if self._pure_literal:
                return True
        return bool(self.find(data, max_matches=1))

    def find(
        self, content: bytes | bytearray | memoryview, *, max_matches: int | None = None
    ) -> list[LineMatch]:
        """LineMatcher.find returns the matching lines in order, at most `max_matches` of them."""
        data = content if isinstance(content, bytes) else bytes(content)
        limit = max_matches if max_matches is not None and max_matches > 0 else -1
        if max_matches is not None and max_matches <= 0:
            return []
        if self._needle is None:
            return self._find_regex(data, limit)
        if self._needle_folded:
            haystack, needle = data.lower(), self._needle.lower()
        else:
            haystack, needle = data, self._needle
        if self._pure_literal:
            return self._find_literal(haystack, needle, limit)
        return self._find_prefiltered(data, haystack, needle, limit)

    def _find_literal(self, haystack: bytes, needle: bytes, limit: int) -> list[LineMatch]:
        out: list[LineMatch] = []
        size = len(needle)
        end_of_text = len(haystack)
        line_number, counted = 1, 0
        pos = haystack.find(needle)
        while pos >= 0:
            start = haystack.rfind(b"\n", 0, pos) + 1
            end = haystack.find(b"\n", pos)
            if end < 0:
                end = end_of_text
            ranges: list[tuple[int, int]] = []
            # The needle has no newline, so every hit that starts in this line ends in it.
            while pos >= 0:
                ranges.append((pos - start, pos - start + size))
                pos = haystack.find(needle, pos + size, end)
            line_number += haystack.count(b"\n", counted, start)
            counted = start
            out.append(LineMatch(line_number, start, end, tuple(ranges)))
            if len(out) == limit:
                break
            pos = haystack.find(needle, end + 1)
        return out

    def _line_ranges(
        self, data: bytes, start: int, end: int, first: tuple[int, int] | None
    ) -> list[tuple[int, int]]:
        """_line_ranges lists the matches within data[start:end] (one line), given its first."""
        match = self._regexp.Match
        ranges: list[tuple[int, int]] = []
        last_end = -1
        span = first if first is not None else match(_UNANCHORED, data, start, end)[0]
        while span != _NO_SPAN:
            s, e = span
            if s == e and s == last_end:
                # Rust's find_iter (ripgrep) never reports an empty match abutting the last one.
                pos = s + 1
            else:
                ranges.append((s - start, e - start))
                last_end = e
                pos = e if e > s else e + 1
            if pos > end:
                break
            span = match(_UNANCHORED, data, pos, end)[0]
        return ranges

    def _find_regex(self, data: bytes, limit: int) -> list[LineMatch]:
        out: list[LineMatch] = []
        match = self._regexp.Match
        end_of_text = len(data)
        # No line follows a final newline (nor exists in an empty document).
        no_last_line = end_of_text == 0 or data.endswith(b"\n")
        line_number, counted = 1, 0
        pos = 0
        while pos <= end_of_text:
            span = match(_UNANCHORED, data, pos, end_of_text)[0]
            if span == _NO_SPAN:
                break
            s = span[0]
            if s == end_of_text and no_last_line:
                break
            start = data.rfind(b"\n", 0, s) + 1
            end = data.find(b"\n", s)
            if end < 0:
                end = end_of_text
            ranges = self._line_ranges(data, start, end, span)
            line_number += data.count(b"\n", counted, start)
            counted = start
            out.append(LineMatch(line_number, start, end, tuple(ranges)))
            if len(out) == limit:
                break
            pos = end + 1
        return out

    def _find_prefiltered(self, data: bytes, haystack: bytes, needle: bytes, limit: int) -> list[LineMatch]:
        out: list[LineMatch] = []
        end_of_text = len(data)
        line_number, counted = 1, 0
        pos = haystack.find(needle)
        while pos >= 0:
            start = haystack.rfind(b"\n", 0, pos) + 1
            end = haystack.find(b"\n", pos)
            if end < 0:
                end = end_of_text
            ranges = self._line_ranges(data, start, end, None)
            if ranges:
                line_number += data.count(b"\n", counted, start)
                counted = start
                out.append(LineMatch(line_number, start, end, tuple(ranges)))
                if len(out) == limit:
                    break
            pos = haystack.find(needle, end + 1)
        return out
