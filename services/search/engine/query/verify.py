"""Verification of candidate documents: exact, line-oriented matching with RE2 semantics.

`LineMatcher` finds every matching line of a document like `rg --json` does: a match never
spans a newline, `^`/`$` (and `\\A`/`\\z`, as ripgrep treats them) match at line boundaries,
and within a line matches are leftmost-first and non-overlapping, with an empty match that
abuts the previous match skipped (Rust's `find_iter`). Offsets are UTF-8 byte offsets.

Four strategies, chosen once per pattern. The byte work runs in the C extension
`_fastscan` (GIL released, on the memory-mapped content directly); RE2 stays the judge of
every regex match. Measured over Linux's `fs/` (2,078 files, 42 MB, one core of the shared
2-core machine, find() over every file, best of 3), before -> after the native scanner:

* a literal (or a regex that parses to one) is found by `_fastscan.find_literal`: a
  substring search (`find_needle`: SSE2 tests of the needle's first and last bytes, 16
  positions a step; 10x glibc's memmem for a two-byte needle), line bounds and line numbers
  in one pass. Case-sensitive: `spin_lock_irqsave` 13.4 ->
  5.4 ms. Case-insensitive (ASCII needles) on a vectorised ASCII-folded copy, falling back
  to RE2 for a document that holds KELVIN SIGN or LONG S when the needle has `k`/`s` (RE2's
  `(?i)` matches them): `(?i)fixme` 18.2 (RE2) -> 15.1 ms, `spin_lock` case-insensitive
  87.9 -> 15.2 ms, `(?i)struct` 446 -> 47 ms;
* a regex that contains a required literal of 3+ bytes (every match holds it; the longest
  is taken) runs RE2 only on the lines holding it, found by `find_needle` in one native pass
  (`_fastscan.regex_scan_needle`/`regex_count_needle`): `\\bkzalloc\\b.*GFP_ATOMIC` 14.0 ->
  6.9 ms over `fs/`; over the Linux candidates of `static int \\w+_probe\\(struct
  platform_device`, 154 -> 48 ms against screening documents for its literals and running
  RE2 over each whole file (2026-12-07);
* a regex without such a literal but with a rare run of bytes every match holds
  (`class_run`: `[A-Z]{20,}`, `[0-9a-f]{40}`, the digits of `\\w+\\d{6}`) runs RE2 only on the
  lines holding such a run, found by `find_run` in C, which probes every run-length-th byte:
  over Linux, `--count '[A-Z]{20,}'` 1.18 -> 0.28 s and `[0-9a-f]{40}` 1.05 -> 0.23 s from a
  fresh process (2026-12-07); not when the pattern starts with literal text, which RE2 finds
  itself (`0x[0-9a-f]{8}`, 540k matching lines: 25 % slower with its run);
* everything else runs RE2 over the whole buffer in multi-line mode, from C
  (`_fastscan.regex_scan`/`regex_count`, RE2 linked into the extension, GIL released):
  one RE2 call finds each matching line and one more each further match in it, with no
  Python call per line (`0x[0-9a-f]{8}` over Linux: 540k lines, 1.1 M calls, were 13.5 s
  of Python loop through the binding).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast

import re2
from re2 import _re2

from services.search.engine import _fastscan
from services.search.engine.errors import InvalidPatternError as InvalidPatternError
from services.search.engine.query import regexsyntax as rx

# UTF-8 continuation bytes: deleting them from a byte string leaves one byte per character.
_CONTINUATION = bytes(range(0x80, 0xC0))
# Required literals shorter than this hit too often to be worth a prefilter pass.
_MIN_PREFILTER = 3
# ASCII letters whose RE2 case orbit has a non-ASCII member (KELVIN SIGN, LONG S).
_UNSAFE_FOLD = frozenset("ksKS")
_UNSAFE_FOLD_BYTES = frozenset(map(ord, _UNSAFE_FOLD))


class LineMatch(NamedTuple):
    """LineMatch is one matching line.

    `line_number` is 1-based; `line_start`/`line_end` are byte offsets of the line in the
    document (`line_end` excludes the newline); `ranges` are the `(start, end)` byte offsets of
    every match relative to `line_start`. It is a NamedTuple so the native scanner can build
    it without a Python-level constructor call per line.
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
    source = _source(pattern, literal)
    regexp = _re2.RE2(source.encode("utf-8", "surrogatepass"), options)
    if not regexp.ok():
        message = bytes(regexp.error()).decode("utf-8", "replace")
        # RE2 quotes the pattern it saw; show the user's pattern, not our multi-line wrapper.
        raise InvalidPatternError(message.replace(source, pattern) if source != pattern else message)
    return cast(CompiledRegex, regexp)


def _source(pattern: str, literal: bool) -> str:
    """_source is the pattern RE2 compiles: multi-line, with ripgrep's line anchors (regexsyntax)."""
    return pattern if literal else "(?m)" + rx.line_anchored(pattern)


def compile_native(
    pattern: str, *, case_sensitive: bool = True, literal: bool = False, run: ClassRun | None = None
) -> object:
    """compile_native compiles a pattern like compile_regex, for the C extension's regex scans.

    With `run` (class_run's), whole-buffer scans give RE2 only the lines holding such a run.
    Raises InvalidPatternError with RE2's message when RE2 rejects the pattern.
    """
    source = _source(pattern, literal)
    flags, length = (None, 0) if run is None else (run.flags, run.length)
    try:
        return _fastscan.regex_compile(
            source.encode("utf-8", "surrogatepass"), case_sensitive, literal, flags, length
        )
    except ValueError as exc:
        # RE2 quotes the pattern it saw; show the user's pattern, not our multi-line wrapper.
        message = str(exc).replace(source, pattern) if source != pattern else str(exc)
        raise InvalidPatternError(message) from None


def _literal_of(node: rx.Node) -> rx.Literal | None:
    """_literal_of returns the pattern as one literal when it is nothing else."""
    if isinstance(node, rx.Literal):
        return node
    if isinstance(node, rx.Concat) and all(isinstance(item, rx.Literal) for item in node.items):
        items = [item for item in node.items if isinstance(item, rx.Literal)]
        if len({item.fold for item in items}) == 1:
            return rx.Literal("".join(item.text for item in items), items[0].fold)
    return None


def _required_literals(node: rx.Node) -> list[rx.Literal]:
    """_required_literals lists the runs of literals every match must contain, in pattern order."""
    items = node.items if isinstance(node, rx.Concat) else (node,)
    runs: list[rx.Literal] = []
    run: list[rx.Literal] = []
    for item in (*items, None):
        if isinstance(item, rx.Literal) and (not run or run[0].fold == item.fold):
            run.append(item)
            continue
        if run:
            runs.append(rx.Literal("".join(r.text for r in run), run[0].fold))
        run = [item] if isinstance(item, rx.Literal) else []
    return runs


def _required_literal(node: rx.Node) -> rx.Literal | None:
    """_required_literal is the longest run of literals every match must contain, if any."""
    best: rx.Literal | None = None
    for joined in _required_literals(node):
        if best is None or len(joined.text.encode()) > len(best.text.encode()):
            best = joined
    return best


def required_text(pattern: str, *, case_sensitive: bool) -> str | None:
    """required_text is the longest run of literal text every match of the RE2 `pattern` holds, if any.

    None when the pattern has none or does not parse. Under `case_sensitive=False` the text
    holds wherever a match does, compared as RE2's `(?i)` compares.
    """
    try:
        root = rx.parse_regex(pattern, case_insensitive=not case_sensitive).root
    except (rx.RegexSyntaxError, RecursionError):
        return None
    found = _literal_of(root) or _required_literal(root)
    return None if found is None else found.text


class ClassRun(NamedTuple):
    """ClassRun says every match holds `length` bytes in a row, each flagged in `flags` (256 bytes)."""

    flags: bytes
    length: int


def _byte_share(b: int) -> float:
    """_byte_share is roughly how often byte `b` occurs in source code (for choosing a run and
    whether to use one): lower-case letters and spaces are most of it; upper case, digits and
    punctuation much rarer; bytes above 0x7F rarer still."""
    if b == 0x20:
        return 0.15
    if b == 0x09:
        return 0.03
    if 0x61 <= b <= 0x7A:
        return 0.45 / 26
    if 0x41 <= b <= 0x5A:
        return 0.06 / 26
    if 0x30 <= b <= 0x39:
        return 0.04 / 10
    if b == 0x5F:
        return 0.02
    if 0x21 <= b <= 0x7E:
        return 0.2 / 31
    return 0.01 / 128 if b >= 0x80 else 0.0


_BYTE_SHARE = tuple(_byte_share(b) for b in range(256))
# A run is used when a random position starts one with a chance below 2**-_MIN_RUN_BITS
# (`[A-Z]{20,}` is ~81 bits, `\d{6}` ~48, `[a-z]{8}` ~9): below that most lines of code
# would hold one, and RE2 a line at a time costs more than RE2 over the whole buffer.
_MIN_RUN_BITS = 20.0


def _atom_bytes(node: rx.Node) -> tuple[frozenset[int], int] | None:
    """_atom_bytes is (the bytes, the fewest bytes) of what one item of a concatenation matches,
    when every byte it matches can be listed: a literal, a character class, or such an item
    repeated; None otherwise."""
    if isinstance(node, rx.Literal):
        data = node.text.encode("utf-8", "surrogatepass")
        found = set(data)
        if node.fold:
            if not node.text.isascii():
                return None
            found |= set(node.text.lower().encode()) | set(node.text.upper().encode())
            if found & _UNSAFE_FOLD_BYTES:
                found |= set(range(0x80, 0x100))  # KELVIN SIGN and LONG S fold to k and s
        return frozenset(found), len(data)
    if isinstance(node, rx.CharClass):
        found = set()
        for lo, hi in node.ranges:
            found.update(range(lo, min(hi, 0x7F) + 1))
            if hi > 0x7F:
                found.update(range(0x80, 0x100))  # a non-ASCII member: UTF-8 bytes >= 0x80
        if node.fold:
            found |= {b ^ 0x20 for b in found if 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A}
            if found & _UNSAFE_FOLD_BYTES:
                found.update(range(0x80, 0x100))
        return frozenset(found), 1
    if isinstance(node, rx.Repeat):
        inner = _atom_bytes(node.item)
        if inner is None:
            return None
        return inner[0], inner[1] * node.min
    return None


def _run_bits(flags: frozenset[int], length: int) -> float:
    share = sum(_BYTE_SHARE[b] for b in flags)
    return 0.0 if share >= 1.0 or length == 0 else -math.log2(max(share, 1e-9)) * length


def _flat_items(node: rx.Node) -> list[rx.Node]:
    """_flat_items lists a concatenation's items with nested concatenations (groups) spliced in."""
    if not isinstance(node, rx.Concat):
        return [node]
    return [leaf for item in node.items for leaf in _flat_items(item)]


def class_run(root: rx.Node) -> ClassRun | None:
    """class_run finds a run of bytes every match of the parsed pattern holds, if one is rare enough.

    Consecutive items of the top-level concatenation that each match listable bytes
    (`_atom_bytes`; zero-width assertions in between keep them consecutive) match a run of
    the union of their bytes, at least as long as their summed minimum lengths; of every
    such stretch (and part of one) the rarest is taken (`_run_bits`), and kept when rarer
    than `_MIN_RUN_BITS`. A newline is never part of a run: matches never span lines.
    """
    stretches: list[list[tuple[frozenset[int], int]]] = [[]]
    for item in _flat_items(root):
        if isinstance(item, rx.Assertion | rx.EmptyMatch):
            continue
        atom = _atom_bytes(item)
        if atom is None:
            stretches.append([])
        else:
            stretches[-1].append(atom)
    best: tuple[float, frozenset[int], int] | None = None
    for stretch in stretches:
        for first in range(len(stretch)):
            flags: frozenset[int] = frozenset()
            length = 0
            for atom_flags, atom_length in stretch[first:]:
                flags |= atom_flags - {0x0A}
                length += atom_length
                bits = _run_bits(flags, length)
                if best is None or bits > best[0]:
                    best = (bits, flags, length)
    if best is None or best[0] < _MIN_RUN_BITS:
        return None
    _, flags, length = best
    return ClassRun(bytes(1 if b in flags else 0 for b in range(256)), length)


def _literal_prefix(root: rx.Node) -> bool:
    """_literal_prefix says every match starts with case-sensitive literal text of 2+ bytes.

    RE2 then finds match starts by searching for that text itself, faster than a run's lines
    can be tried one RE2 call at a time when many lines match (`0x[0-9a-f]{8}` over Linux:
    540k lines, `--count` 239 ms as a whole-buffer scan, 308 ms with its run).
    """
    for item in _flat_items(root):
        if isinstance(item, rx.Assertion | rx.EmptyMatch):
            continue
        return isinstance(item, rx.Literal) and not item.fold and len(item.text.encode()) >= 2
    return False


def _searchable(literal: rx.Literal) -> bool:
    """_searchable says the native scanner can look for the literal (see LineMatcher)."""
    return (
        (not literal.fold or literal.text.isascii())
        and len(literal.text.encode("utf-8", "surrogatepass")) >= _MIN_PREFILTER
        and "\n" not in literal.text
    )


class LineMatcher:
    """LineMatcher finds the matching lines of documents for one pattern.

    `case_sensitive=False` is RE2's `(?i)` (Unicode simple case folding); `literal=True` takes
    the pattern as plain text. Construction raises InvalidPatternError for a bad regex.
    """

    def __init__(self, pattern: str, *, case_sensitive: bool, literal: bool = False) -> None:
        self.pattern = pattern
        self.case_sensitive = case_sensitive
        self.literal = literal
        # The needle the native scanner looks for, and whether it compares ASCII-folded.
        self._needle: bytes | None = None
        self._needle_folded = False
        # A folded needle with k or s must give way to RE2 in documents holding KELVIN SIGN
        # or LONG S (RE2's (?i) matches them); the scanner checks while it folds.
        self._guard = False
        # True when the needle alone decides matches (no RE2 run needed); otherwise the
        # needle is a literal every match holds, and RE2 runs only on the lines holding it.
        self._pure_literal = False
        text: str | None = pattern if literal else None
        fold = literal and not case_sensitive
        required: rx.Literal | None = None
        root: rx.Node | None = None
        if not literal:
            try:
                root = rx.parse_regex(pattern, case_insensitive=not case_sensitive).root
            except (rx.RegexSyntaxError, RecursionError):
                root = None
            if root is not None:
                whole = _literal_of(root)
                if whole is not None and (case_sensitive or whole.fold):
                    text, fold = whole.text, whole.fold
                elif whole is None:
                    # The longest literal every match holds: its lines are found by
                    # find_needle and RE2 reads only those (`static int \w+_probe\(struct
                    # platform_device` over 5,082 Linux candidates: 154 -> 48 ms against
                    # RE2 over each whole file that holds both its literals).
                    required = _required_literal(root)
        # Without a needle, a run of bytes every match holds (`[A-Z]{20,}`, `[0-9a-f]{40}`)
        # picks the lines RE2 reads, found natively (find_run) inside the regex scans.
        self._run: ClassRun | None = None
        if text and "\n" not in text and (not fold or text.isascii()):
            self._set_needle(text, fold)
            self._pure_literal = True
        elif required is not None and _searchable(required):
            self._set_needle(required.text, required.fold)
        elif root is not None and not _literal_prefix(root):
            self._run = class_run(root)
        self._regexp = compile_native(pattern, case_sensitive=case_sensitive, literal=literal, run=self._run)

    def _set_needle(self, text: str, fold: bool) -> None:
        self._needle = (text.lower() if fold else text).encode("utf-8", "surrogatepass")
        self._needle_folded = fold
        self._guard = fold and bool(_UNSAFE_FOLD & set(text))

    @property
    def strategy(self) -> str:
        """LineMatcher.strategy names the search path: "literal", "prefilter", "run" or "regex"."""
        if self._pure_literal:
            return "literal"
        if self._needle is not None:
            return "prefilter"
        return "run" if self._run is not None else "regex"

    def matches(self, content: bytes | bytearray | memoryview) -> bool:
        """LineMatcher.matches says whether any line of the document matches."""
        return bool(self.find(content, max_matches=1))

    def find(
        self, content: bytes | bytearray | memoryview, *, max_matches: int | None = None
    ) -> list[LineMatch]:
        """LineMatcher.find returns the matching lines in order, at most `max_matches` of them."""
        if max_matches is not None and max_matches <= 0:
            return []
        limit = max_matches if max_matches is not None else -1
        needle = self._needle
        if needle is not None:
            if self._pure_literal:
                found = _fastscan.find_literal(
                    content, needle, self._needle_folded, self._guard, limit, LineMatch
                )
                if found is not None:
                    return found
            else:
                scanned = _fastscan.regex_scan_needle(
                    self._regexp, content, needle, self._needle_folded, self._guard, limit
                )
                if scanned is not None:
                    return unpack_groups(scanned[0])
        packed, _, _ = _fastscan.regex_scan(self._regexp, content, None, limit)
        return unpack_groups(packed)

    def count(self, content: bytes | bytearray | memoryview) -> int:
        r"""LineMatcher.count returns the number of matching lines of the document.

        Nothing is built per line and nothing runs in Python per line: a literal is counted
        natively; a regex by `_fastscan.regex_count`, RE2 called from C once per matching line
        (a prefiltered regex: once per line holding its required literal).
        """
        needle = self._needle
        if needle is not None:
            if self._pure_literal:
                counted = _fastscan.count_literal(content, needle, self._needle_folded, self._guard)
                if counted is not None:
                    return counted[0]
            else:
                lines = _fastscan.regex_count_needle(
                    self._regexp, content, needle, self._needle_folded, self._guard
                )
                if lines is not None:
                    return lines
        return _fastscan.regex_count(self._regexp, content, None)

    def count_spans(self, data: bytes | memoryview, spans: bytes | memoryview) -> bytes:
        """LineMatcher.count_spans counts the matching lines of many documents in one native call.

        `spans` are int64 (start, end) pairs of `data`; the result holds one int64 count per
        span, what `count` returns for that span alone (`_fastscan.count_spans`).
        """
        return _fastscan.count_spans(
            self._regexp, self._needle, self._pure_literal, self._needle_folded, self._guard, data, spans
        )

    def groups(self, content: bytes | bytearray | memoryview) -> tuple[bytes, int, int]:
        """LineMatcher.groups returns the matching lines packed for `_fastscan.render_lines`.

        Returns (groups, matching lines, matches), scanned and packed natively.
        """
        needle = self._needle
        if needle is not None:
            if self._pure_literal:
                packed = _fastscan.scan_literal(content, needle, self._needle_folded, self._guard)
                if packed is not None:
                    return packed
            else:
                scanned = _fastscan.regex_scan_needle(
                    self._regexp, content, needle, self._needle_folded, self._guard, -1
                )
                if scanned is not None:
                    return scanned
        return _fastscan.regex_scan(self._regexp, content, None, -1)


def unpack_groups(packed: bytes) -> list[LineMatch]:
    """unpack_groups turns packed groups (the layout `_fastscan.render_lines` reads) into LineMatches."""
    values = memoryview(packed).cast("q")
    out: list[LineMatch] = []
    at = 0
    while at < len(values):
        number, start, end, count = values[at : at + 4]
        pairs = values[at + 4 : at + 4 + 2 * count]
        out.append(LineMatch(number, start, end, tuple(zip(pairs[::2], pairs[1::2], strict=True))))
        at += 4 + 2 * count
    return out


def pack_groups(lines: Sequence[LineMatch]) -> bytes:
    """pack_groups packs matching lines in the layout `_fastscan.render_lines` reads (see _fastscan.c)."""
    packed = array("q")
    for line in lines:
        packed.extend((line.line_number, line.line_start, line.line_end, len(line.ranges)))
        for start, end in line.ranges:
            packed.extend((start, end))
    return packed.tobytes()
