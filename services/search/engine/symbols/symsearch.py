"""Symbol search: ranking definitions by how well their names match a pattern.

`search_symbols` is pure: it takes candidates (a symbol with its document's path, repository
and language) from wherever the caller keeps them and returns the best `limit` matches with
the true number of matching symbols. Each matching symbol lands in the best tier it reaches:

    EXACT            the name equals the pattern
    EXACT_NOCASE     the name equals the pattern ignoring case
    PREFIX           the name starts with the pattern (ignoring case unless case_sensitive)
    SUBSTRING        the name contains the pattern (likewise)
    REGEX            the name matches the pattern as an RE2 regex (skipped when the pattern
                     is not a valid regex, or is a plain identifier the tiers above covered)

A pattern containing `.` or `::` is a qualified-name query: it is compared with the symbol's
qualified name, with `.` and `::` treated alike (so `Widget::size` finds Python's
`Widget.size` too), and an exact tier hit may be a suffix that starts at a separator
(`Widget::size` is exact for `ns::Widget::size`).

Within a tier, definitions in test or vendored files come after the others; ties then break
on (path, start line, qualified name), so results are deterministic.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import re2

from services.search.engine.languages import is_test, is_vendored
from services.search.engine.model import Symbol
from services.search.engine.symbols.symbols import KINDS


class MatchTier(enum.IntEnum):
    """MatchTier orders how a symbol's name matched; lower is better."""

    EXACT = 0
    EXACT_NOCASE = 1
    PREFIX = 2
    SUBSTRING = 3
    REGEX = 4


class SymbolCandidate(NamedTuple):
    """SymbolCandidate is a symbol with the document it was found in; plain 4-tuples work too."""

    symbol: Symbol
    path: str
    repository: str = ""
    language: str = ""


@dataclass(frozen=True, slots=True)
class SymbolMatch:
    """SymbolMatch is one ranked result of `search_symbols`.

    `demoted` is true for definitions in test or vendored files, which rank after the others
    within their tier.
    """

    symbol: Symbol
    path: str
    repository: str
    language: str
    tier: MatchTier
    demoted: bool


@dataclass(frozen=True, slots=True)
class SymbolSearchResult:
    """SymbolSearchResult holds the best matches, best first, and how many symbols matched in all."""

    matches: tuple[SymbolMatch, ...]
    total: int

    @property
    def limit_hit(self) -> bool:
        """limit_hit reports whether more symbols matched than were returned."""
        return self.total > len(self.matches)


# Identifiers, optionally joined by `.` or `::`: the regex tier cannot add to the literal ones.
_PLAIN = re.compile(r"[\w$]*(?:(?:\.|::)[\w$]+)*")
_QUALIFIED_SEPARATOR = re.compile(r"::|\.")
# Candidates the literal tiers miss are regex-matched this many at a time (see _Batch).
_REGEX_BATCH = 4096


def _regex(pattern: str, case_sensitive: bool) -> _Regex | None:
    r"""_regex compiles the pattern for the regex tier, or returns None when RE2 rejects it.

    The compiled form runs over many names joined by newlines at once: `never_nl` keeps a
    match inside one name and `(?m)` makes `^`/`$` mean the start and end of each name.
    Searching name by name costs ~4 µs a call in the binding; one search over 4096 joined
    names costs ~0.15 µs a name. Patterns using `\A`/`\z` (text anchors) come back as they
    are, with `batched` false, and are searched name by name.
    """
    options = re2.Options()
    options.log_errors = False  # An invalid pattern is an ordinary query here, not an error.
    options.case_sensitive = case_sensitive
    try:
        alone = re2.compile(pattern, options)  # Validate alone: wrapping could mask `a)|(b`.
        if "\\A" in pattern or "\\z" in pattern:
            return _Regex(alone, batched=False)
        options.never_nl = True
        return _Regex(re2.compile(f"(?m)(?:{pattern})", options), batched=True)
    except re2.error:
        return None


@dataclass(frozen=True, slots=True)
class _Regex:
    """_Regex is the compiled regex tier and whether it may run over newline-joined names."""

    compiled: re2._Regexp
    batched: bool


@dataclass(slots=True)
class _Matcher:
    """_Matcher classifies one name (or qualified name) into a literal tier for a fixed pattern."""

    pattern: str
    folded: str
    qualified: bool
    case_sensitive: bool
    regex: _Regex | None

    @classmethod
    def build(cls, pattern: str, case_sensitive: bool) -> _Matcher:
        qualified = "." in pattern or "::" in pattern
        text = _normalize(pattern) if qualified else pattern
        regex = None if _PLAIN.fullmatch(pattern) else _regex(pattern, case_sensitive)
        return cls(text, text.lower(), qualified, case_sensitive, regex)

    def subject(self, symbol: Symbol) -> str:
        """subject is the text the regex tier searches: the name, or the qualified name."""
        return symbol.qualified_name if self.qualified else symbol.name

    def tier(self, symbol: Symbol) -> MatchTier | None:
        """tier returns the best literal tier the symbol reaches, or None (regex is batched)."""
        if self.qualified:
            text = _normalize(symbol.qualified_name)
            if text == self.pattern or text.endswith("." + self.pattern):
                return MatchTier.EXACT
        else:
            text = symbol.name
            if text == self.pattern:
                return MatchTier.EXACT
        if self.case_sensitive:
            needle, hay = self.pattern, text
        else:
            needle, hay = self.folded, text.lower()
            if hay == needle or (self.qualified and hay.endswith("." + needle)):
                return MatchTier.EXACT_NOCASE
        if hay.startswith(needle) or (self.qualified and ("." + needle) in hay):
            return MatchTier.PREFIX
        if needle in hay:
            return MatchTier.SUBSTRING
        return None

    def regex_hits(self, subjects: Sequence[str]) -> list[int]:
        """regex_hits returns the indexes of the subjects the regex matches, in one RE2 search."""
        assert self.regex is not None
        compiled = self.regex.compiled
        if not self.regex.batched:
            return [i for i, subject in enumerate(subjects) if compiled.search(subject) is not None]
        text = "\n".join(subjects)
        starts: list[int] = []
        offset = 0
        for subject in subjects:
            starts.append(offset)
            offset += len(subject) + 1
        hits: list[int] = []
        for match in compiled.finditer(text):
            index = bisect.bisect_right(starts, match.start()) - 1
            if not hits or hits[-1] != index:
                hits.append(index)
        return hits


_KIND_ALIASES: dict[str, str] = {
    "func": "function", "fn": "function", "def": "function", "fun": "function",
    "meth": "method", "cls": "class", "struct": "struct", "union": "struct",
    "iface": "interface", "protocol": "interface", "typedef": "type", "alias": "type",
    "const": "constant", "var": "variable", "let": "variable", "global": "variable",
    "mod": "module", "package": "module", "ns": "namespace", "define": "macro",
    "property": "field", "attribute": "field", "member": "field",
}  # fmt: skip


def normalize_kind(name: str) -> str | None:
    """normalize_kind maps a kind as users type it to the extractor's vocabulary, or None.

    Vocabulary names (symbols.KINDS) map to themselves; `func`, `fn`, `const`, `typedef` and
    similar aliases map to `function`, `constant`, `type`, ...
    """
    key = name.strip().lower()
    key = _KIND_ALIASES.get(key, key)
    return key if key in KINDS else None


def _normalize(name: str) -> str:
    """_normalize writes every qualified-name separator (`::` or `.`) as `.`."""
    return _QUALIFIED_SEPARATOR.sub(".", name) if "::" in name else name


def symbol_needle(pattern: str, required: Callable[[str], str | None] | None = None) -> str | None:
    """symbol_needle is ASCII text every matching symbol with an ASCII name holds, or None if there is none.

    A symbol search may then decode only the symbols whose name or qualified name holds the
    needle under ASCII case folding, plus every symbol with a non-ASCII byte in those names
    (`_fastscan.symbol_hits`): case folds beyond ASCII (KELVIN SIGN lowers to `k`, I WITH DOT
    ABOVE to `i` and a combining dot, RE2's `(?i)` matches LONG S with `s`), so only an ASCII
    name is judged by the needle alone. For a plain pattern (identifiers joined by `.` or `::`,
    no regex tier) the needle is the longest piece between separators: every match holds it
    in its name or qualified name, ignoring case. For a regex, `required` gives text every
    regex match holds (the query layer's RE2 analysis); it serves only when it lies within the
    pattern itself, so that the literal tiers' matches, which hold the whole pattern, hold it
    too, and has no separator (`.` or `:`), which the qualified tiers rewrite.
    """
    pattern = pattern.strip()
    if not pattern.isascii():
        return None
    if _PLAIN.fullmatch(pattern):
        needle = max(_QUALIFIED_SEPARATOR.split(pattern), key=len)
    else:
        if required is None or "::" in pattern or _regex(pattern, case_sensitive=False) is None:
            return None
        found = required(pattern)
        if found is None or not found.isascii() or any(c in found for c in ".:\n"):
            return None
        if found.lower() not in pattern.lower():
            return None
        needle = found
    return needle or None


class RegexScreen(NamedTuple):
    """RegexScreen is what a regex symbol search without a needle can screen symbols by natively.

    Every literal-tier match holds `piece` in its name or qualified name (ASCII folding);
    every regex-tier match's subject (the qualified name when `qualified`, else the name)
    matches `source` as RE2 compiles it with `never_nl` (None: the pattern has no regex tier).
    """

    piece: str
    qualified: bool
    source: str | None


def regex_screen(pattern: str, *, case_sensitive: bool) -> RegexScreen | None:
    """regex_screen describes the native screen of a regex symbol search (see RegexScreen).

    None for a plain pattern (symbol_needle serves it), a non-ASCII one, or one whose text
    has no piece between separators. `piece` is the longest run of the pattern's text between
    `.` and `:`: a literal tier compares the whole pattern with the name, or with the qualified
    name whose `::` are rewritten as `.`, so each such piece lies within the raw names. The
    source is `_regex`'s, whose per-name search it equals (names hold no newline; one that
    does is kept by the screen).
    """
    pattern = pattern.strip()
    if not pattern.isascii() or _PLAIN.fullmatch(pattern):
        return None
    piece = max(re.split(r"[.:]", pattern), key=len)
    if not piece:
        return None
    qualified = "." in pattern or "::" in pattern
    compiled = _regex(pattern, case_sensitive)
    if compiled is None:
        return RegexScreen(piece, qualified, None)
    source = pattern if not compiled.batched else f"(?m)(?:{pattern})"
    return RegexScreen(piece, qualified, source)


def search_symbols(
    pattern: str,
    candidates: Iterable[SymbolCandidate | tuple[Symbol, str, str, str]],
    *,
    kind: str | Collection[str] | None = None,
    limit: int = 50,
    case_sensitive: bool = False,
) -> SymbolSearchResult:
    """search_symbols ranks the candidates whose names match `pattern` (see the module docstring).

    `kind` keeps only symbols of that kind (or kinds; aliases such as `func` are accepted,
    see `normalize_kind`); `limit` caps the matches returned
    (`total` still counts them all); `case_sensitive` drops the case-insensitive tier and
    makes prefix, substring and regex matching exact in case. An empty pattern matches nothing.
    """
    pattern = pattern.strip()
    if not pattern:
        return SymbolSearchResult((), 0)
    wanted = [kind] if isinstance(kind, str) else kind
    kinds = None if wanted is None else {normalize_kind(k) or k for k in wanted}
    matcher = _Matcher.build(pattern, case_sensitive)
    ranking = _Ranking(limit)
    waiting: list[tuple[int, Symbol, str, str, str]] = []  # Missed the literal tiers.
    for sequence, (symbol, path, repository, language) in enumerate(candidates):
        if kinds is not None and symbol.kind not in kinds:
            continue
        tier = matcher.tier(symbol)
        if tier is not None:
            ranking.add(tier, sequence, symbol, path, repository, language)
        elif matcher.regex is not None:
            waiting.append((sequence, symbol, path, repository, language))
            if len(waiting) >= _REGEX_BATCH:
                _regex_tier(matcher, waiting, ranking)
    if waiting:
        _regex_tier(matcher, waiting, ranking)
    return ranking.result()


def _regex_tier(
    matcher: _Matcher, waiting: list[tuple[int, Symbol, str, str, str]], ranking: _Ranking
) -> None:
    """_regex_tier ranks the waiting candidates the regex matches, then empties the list."""
    subjects = [matcher.subject(symbol) for _, symbol, _, _, _ in waiting]
    for index in matcher.regex_hits(subjects):
        sequence, symbol, path, repository, language = waiting[index]
        ranking.add(MatchTier.REGEX, sequence, symbol, path, repository, language)
    waiting.clear()


class _Ranking:
    """_Ranking counts matches and keeps the best `limit` in a bounded heap (top = worst kept)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.best: list[_Ranked] = []
        self._demoted: dict[str, bool] = {}  # Per path: many symbols share a file.

    def add(
        self, tier: MatchTier, sequence: int, symbol: Symbol, path: str, repository: str, language: str
    ) -> None:
        """add counts one match and keeps it if it ranks among the best so far."""
        self.total += 1
        if self.limit <= 0:
            return
        demoted = self._demoted.get(path)
        if demoted is None:
            demoted = self._demoted[path] = is_test(path) or is_vendored(path)
        key = (int(tier), demoted, path, symbol.start_line, symbol.qualified_name, sequence)
        if len(self.best) >= self.limit and key >= self.best[0].key:
            return
        ranked = _Ranked(key, SymbolMatch(symbol, path, repository, language, tier, demoted))
        if len(self.best) >= self.limit:
            heapq.heapreplace(self.best, ranked)
        else:
            heapq.heappush(self.best, ranked)

    def result(self) -> SymbolSearchResult:
        """result returns the kept matches, best first, with the total count."""
        ordered = sorted(self.best, key=lambda item: item.key)
        return SymbolSearchResult(tuple(item.match for item in ordered), self.total)


_RankKey = tuple[int, bool, str, int, str, int]


class _Ranked:
    """_Ranked pairs a match with its sort key, ordered in reverse so heapq's top is the worst.

    The key is (tier, demoted, path, line, qualified name, input position): a total order, so
    matches themselves are never compared and equal symbols keep their input order.
    """

    __slots__ = ("key", "match")

    def __init__(self, key: _RankKey, match: SymbolMatch) -> None:
        self.key = key
        self.match = match

    def __lt__(self, other: _Ranked) -> bool:
        return self.key > other.key


def enclosing_symbol(symbols: Sequence[Symbol], line: int) -> Symbol | None:
    """enclosing_symbol returns the innermost symbol whose lines contain `line` (1-based), if any."""
    found: Symbol | None = None
    for symbol in symbols:
        if symbol.start_line <= line <= symbol.end_line and (
            found is None or symbol.end_line - symbol.start_line < found.end_line - found.start_line
        ):
            found = symbol
    return found
