"""The match tree: a parsed query compiled into matchers the searcher runs per document.

query.py says what a query means; this module makes it executable. Each term becomes a
matcher for its field:

* content: verify.LineMatcher over the stored content (RE2, line-oriented);
* file/path: an RE2 search over the UTF-8 path (byte ranges kept for highlighting);
* repo: an RE2 search over the repository name;
* lang: equality with the document's language;
* sym: the document's symbol definitions whose name matches (a literal matches as a
  substring, against the qualified name when it contains `.` or `::`; a regex is searched).

Evaluation is lazy and short-circuits: `prefilter` answers from metadata alone (path,
language, repository), three-valued, so most non-matching candidates of a `file:` or
`lang:` query are dropped before their content is read; `evaluate` then runs content and
symbol terms only as the boolean structure needs them. The lines reported for a matching
document are those of its positive content terms (a term under `-` never highlights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import re2

from services.search.engine.model import Symbol
from services.search.engine.query.plan import Plan, plan_regex
from services.search.engine.query.query import (
    And,
    Field,
    Node,
    Not,
    Or,
    Query,
    ResultType,
    Term,
    parse_query,
    plan_query,
)
from services.search.engine.query.verify import LineMatch, LineMatcher
from services.search.engine.record import Record, field


class DocFacts(Record):
    """DocFacts is the metadata of one document, enough for path, language and repo terms."""

    path: str
    language: str
    repository: str


class Outcome(Record, frozen=False):
    """Outcome is what a matching document contributes: lines, symbols, path ranges.

    `filename_match` is true when a positive content or path term also matches the file's
    base name (a ranking signal).
    """

    lines: list[LineMatch]
    symbols: tuple[Symbol, ...] = ()
    path_ranges: tuple[tuple[int, int], ...] = ()
    filename_match: bool = False


def _compile_re2(pattern: str, case_sensitive: bool) -> re2._Regexp:
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False
    return re2.compile(pattern.encode("utf-8"), options)


class _Compiled(Record, frozen=False):
    """_Compiled is one term with its matcher; `index` keys the per-document cache."""

    term: Term
    index: int
    positive: bool
    line_matcher: LineMatcher | None = None
    regex: re2._Regexp | None = None
    sym_literal: str | None = None
    sym_qualified: bool = False


class _DocState(Record, frozen=False):
    facts_of: Callable[[], DocFacts]
    content: bytes
    symbols: Callable[[], Sequence[Symbol]]
    cache: dict[int, object] = field(default_factory=dict)
    _symbols: Sequence[Symbol] | None = None
    _facts: DocFacts | None = None

    @property
    def facts(self) -> DocFacts:
        if self._facts is None:
            self._facts = self.facts_of()
        return self._facts

    def all_symbols(self) -> Sequence[Symbol]:
        if self._symbols is None:
            self._symbols = self.symbols()
        return self._symbols


class MatchTree:
    """MatchTree is an executable query: its trigram plan and per-document evaluation."""

    def __init__(self, query: Query, plan: Plan, text: str) -> None:
        self.query = query
        self.plan = plan
        self.result_type = query.result_type
        self._text = text
        self._terms: dict[int, _Compiled] = {}
        self._by_node: dict[int, _Compiled] = {}
        self._compile(query.expr, positive=True)
        fields = {c.term.field for c in self._terms.values()}
        self.has_metadata_terms = bool(fields & {Field.FILE, Field.LANG, Field.REPO})
        expr = query.expr
        only = self._by_node.get(id(expr)) if isinstance(expr, Term) else None
        # The LineMatcher of a query that is one content term and nothing else: its matching
        # lines are exactly that matcher's, so streaming and counting call it directly
        # (natively, for a literal) instead of evaluating the tree per document.
        self.sole_matcher: LineMatcher | None = (
            only.line_matcher if only is not None and query.result_type is ResultType.FILE else None
        )

    def __str__(self) -> str:
        return self._text

    def _compile(self, node: Node, *, positive: bool) -> None:
        if isinstance(node, Term):
            compiled = _Compiled(node, len(self._terms), positive)
            if node.field is Field.CONTENT:
                compiled.line_matcher = LineMatcher(
                    node.pattern, case_sensitive=node.case_sensitive, literal=node.literal
                )
            elif node.field in (Field.FILE, Field.REPO):
                compiled.regex = _compile_re2(node.regex, node.case_sensitive)
            elif node.field is Field.SYM:
                if node.literal:
                    compiled.sym_literal = node.pattern if node.case_sensitive else node.pattern.lower()
                    compiled.sym_qualified = "." in node.pattern or "::" in node.pattern
                else:
                    compiled.regex = _compile_re2(node.pattern, node.case_sensitive)
            self._terms[compiled.index] = compiled
            self._by_node[id(node)] = compiled
        elif isinstance(node, Not):
            self._compile(node.child, positive=not positive)
        else:
            for child in node.children:
                self._compile(child, positive=positive)

    # Three-valued evaluation on metadata: True, False, or None (needs content/symbols).
    def prefilter(self, facts: DocFacts) -> bool | None:
        """prefilter decides a document from its metadata alone, or returns None if it cannot."""
        return self._pre(self.query.expr, facts)

    def _pre(self, node: Node, facts: DocFacts) -> bool | None:
        if isinstance(node, Term):
            if node.field in (Field.CONTENT, Field.SYM):
                return None
            return self._meta(self._by_node[id(node)], facts)
        if isinstance(node, Not):
            inner = self._pre(node.child, facts)
            return None if inner is None else not inner
        values = [self._pre(child, facts) for child in node.children]
        if isinstance(node, And):
            if any(v is False for v in values):
                return False
            return True if all(v is True for v in values) else None
        if any(v is True for v in values):
            return True
        return False if all(v is False for v in values) else None

    def _meta(self, compiled: _Compiled, facts: DocFacts) -> bool:
        term = compiled.term
        if term.field is Field.LANG:
            return facts.language == term.pattern
        assert compiled.regex is not None
        subject = facts.path if term.field is Field.FILE else facts.repository
        return compiled.regex.search(subject.encode("utf-8")) is not None

    def evaluate(
        self,
        facts: DocFacts | Callable[[], DocFacts],
        content: bytes,
        symbols: Callable[[], Sequence[Symbol]],
    ) -> Outcome | None:
        """evaluate returns the document's Outcome if it matches the query, else None.

        `facts` may be a function: a pure content query then never decodes the metadata of
        a candidate that does not match (most candidates of a selective first page).
        """
        if isinstance(facts, DocFacts):
            known = facts
            state = _DocState(lambda: known, content, symbols)
        else:
            state = _DocState(facts, content, symbols)
        if not self._eval(self.query.expr, state):
            return None
        facts = state.facts  # the match needs the path (filename signal, path ranges)
        lines: list[LineMatch] = []
        found_symbols: list[Symbol] = []
        path_ranges: list[tuple[int, int]] = []
        filename_match = False
        base = facts.path.rsplit("/", 1)[-1].encode("utf-8")
        path_bytes = facts.path.encode("utf-8")
        base_at = len(path_bytes) - len(base)
        content_terms = 0
        for compiled in self._terms.values():
            if not compiled.positive:
                continue
            field_ = compiled.term.field
            if field_ is Field.CONTENT:
                assert compiled.line_matcher is not None
                matched = self._lines(compiled, state)
                if matched:
                    content_terms += 1
                    lines = matched if not lines else _merge_lines(lines, matched)
                if not filename_match and compiled.line_matcher.find(base, max_matches=1):
                    filename_match = True
            elif field_ is Field.FILE:
                assert compiled.regex is not None
                for m in compiled.regex.finditer(path_bytes):
                    if m.end() > m.start():
                        path_ranges.append((m.start(), m.end()))
                        if m.end() > base_at:
                            filename_match = True
            elif field_ is Field.SYM:
                found_symbols.extend(self._symbols(compiled, state))
        if self.result_type is not ResultType.FILE and not content_terms:
            lines = []
        unique_symbols = tuple(dict.fromkeys(found_symbols))
        return Outcome(lines, unique_symbols, tuple(sorted(set(path_ranges))), filename_match)

    def _eval(self, node: Node, state: _DocState) -> bool:
        if isinstance(node, Term):
            compiled = self._by_node[id(node)]
            field_ = node.field
            if field_ is Field.CONTENT:
                return bool(self._lines(compiled, state))
            if field_ is Field.SYM:
                return bool(self._symbols(compiled, state))
            return self._meta(compiled, state.facts)
        if isinstance(node, Not):
            return not self._eval(node.child, state)
        # Cheap terms first: metadata, then symbols, then content.
        children = sorted(node.children, key=_cost)
        if isinstance(node, And):
            return all(self._eval(child, state) for child in children)
        assert isinstance(node, Or)
        return any(self._eval(child, state) for child in children)

    def _lines(self, compiled: _Compiled, state: _DocState) -> list[LineMatch]:
        cached = state.cache.get(compiled.index)
        if cached is None:
            assert compiled.line_matcher is not None
            cached = compiled.line_matcher.find(state.content)
            state.cache[compiled.index] = cached
        assert isinstance(cached, list)
        return cached

    def _symbols(self, compiled: _Compiled, state: _DocState) -> list[Symbol]:
        cached = state.cache.get(compiled.index)
        if cached is None:
            cached = [s for s in state.all_symbols() if _symbol_matches(compiled, s)]
            state.cache[compiled.index] = cached
        assert isinstance(cached, list)
        return cached


def _symbol_matches(compiled: _Compiled, symbol: Symbol) -> bool:
    if compiled.sym_literal is not None:
        subject = symbol.qualified_name if compiled.sym_qualified else symbol.name
        if not compiled.term.case_sensitive:
            subject = subject.lower()
        return compiled.sym_literal in subject
    assert compiled.regex is not None
    return (
        compiled.regex.search(symbol.name.encode("utf-8")) is not None
        or compiled.regex.search(symbol.qualified_name.encode("utf-8")) is not None
    )


def _cost(node: Node) -> int:
    if isinstance(node, Term):
        return {Field.LANG: 0, Field.FILE: 1, Field.REPO: 1, Field.SYM: 2}.get(node.field, 3)
    if isinstance(node, Not):
        return _cost(node.child)
    return max(_cost(child) for child in node.children)


def _merge_lines(a: list[LineMatch], b: list[LineMatch]) -> list[LineMatch]:
    """_merge_lines unions two sorted line lists, merging the ranges of a line both hit."""
    by_line: dict[int, LineMatch] = {m.line_number: m for m in a}
    for m in b:
        have = by_line.get(m.line_number)
        if have is None:
            by_line[m.line_number] = m
            continue
        spans = sorted(set(have.ranges) | set(m.ranges))
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        by_line[m.line_number] = LineMatch(m.line_number, have.line_start, have.line_end, tuple(merged))
    return [by_line[n] for n in sorted(by_line)]


def compile_query(query: str | Query) -> MatchTree:
    """compile_query parses (if needed) and compiles a query-language query."""
    parsed = parse_query(query) if isinstance(query, str) else query
    return MatchTree(parsed, plan_query(parsed), str(parsed))


def compile_regex_query(pattern: str) -> MatchTree:
    """compile_regex_query compiles one RE2 pattern as a case-sensitive content search.

    The pattern carries its own flags (`(?i)`), as with grep -E or ripgrep.
    """
    term = Term(Field.CONTENT, pattern, literal=False, case_sensitive=True)
    query = Query(expr=term)
    return MatchTree(query, plan_regex(pattern, case_insensitive=False), f"regex:{pattern}")
