"""The search query language: parsing into a small typed tree, and planning a whole query.

The language is Zoekt's and GitHub code search's, in short:

    foo bar            both terms (AND is implicit)
    foo or bar         either (`or` binds looser than the implicit AND; `OR` works too)
    "foo(bar"          a literal phrase; `\\"` and `\\\\` escape inside it
    /fo+\\(/            an RE2 regex; `\\/` is a slash inside it
    -foo  -(a or b)    negation
    (a or b) c         grouping
    content:foo        a content term (what bare terms are by default)
    file:\\.py$  path:  a regex on the document path (`file:"x.py"` is a literal); -file: excludes
    repo:kota          a regex on the repository name
    lang:python        the document's language (aliases like `py`, `golang` are accepted)
    sym:Parser         a symbol definition name (a literal; `sym:/re/` for a regex)
    case:yes|no|auto   case sensitivity for every term; auto: sensitive iff it has an upper-case letter
    type:file|path|symbol   what the results are: lines in files (default), paths, or symbols;
                       under type:path bare terms match paths, under type:symbol symbol names

`parse_query` returns a normalised `Query` whose `str()` is canonical (an s-expression such as
`(and content:"foo"i (or file:/\\.py$/i (not lang:go)))`, where a trailing `i` marks a
case-insensitive term). Errors raise `QuerySyntaxError` with the 0-based position and what was
expected there. `plan_query` turns a query into the trigram plan the index evaluates.
"""

from __future__ import annotations

import enum

import re2

from services.search.engine.errors import QuerySyntaxError as QuerySyntaxError
from services.search.engine.query.plan import ALL, Plan, and_, or_, plan_literal, plan_regex
from services.search.engine.query.regexsyntax import has_upper_literal
from services.search.engine.query.verify import InvalidPatternError, compile_regex
from services.search.engine.record import Record


class Field(enum.StrEnum):
    """Field names what a term is matched against."""

    CONTENT = "content"
    FILE = "file"
    REPO = "repo"
    LANG = "lang"
    SYM = "sym"


class Case(enum.StrEnum):
    """Case is the `case:` setting."""

    YES = "yes"
    NO = "no"
    AUTO = "auto"


class ResultType(enum.StrEnum):
    """ResultType is the `type:` setting: what a search returns."""

    FILE = "file"
    PATH = "path"
    SYMBOL = "symbol"


class Term(Record):
    """Term is one pattern matched against one field.

    `literal` terms match their text exactly; others are RE2 regexes. `case_sensitive` is
    already resolved from `case:`. For `lang:` the pattern is the canonical language name.
    """

    field: Field
    pattern: str
    literal: bool = True
    case_sensitive: bool = False

    @property
    def regex(self) -> str:
        """Term.regex is the term as an RE2 pattern (literals escaped)."""
        return str(re2.escape(self.pattern)) if self.literal else self.pattern

    def __str__(self) -> str:
        if self.field is Field.LANG:
            return f"lang:{self.pattern}"
        if self.literal:
            body = '"' + self.pattern.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            body = "/" + self.pattern.replace("/", "\\/") + "/"
        return f"{self.field}:{body}{'' if self.case_sensitive else 'i'}"


class Not(Record):
    """Not matches documents its child does not match."""

    child: Node

    def __str__(self) -> str:
        return f"(not {self.child})"


class And(Record):
    """And matches documents all of its children match (at least two children)."""

    children: tuple[Node, ...]

    def __str__(self) -> str:
        return "(and " + " ".join(map(str, self.children)) + ")"


class Or(Record):
    """Or matches documents any of its children match (at least two children)."""

    children: tuple[Node, ...]

    def __str__(self) -> str:
        return "(or " + " ".join(map(str, self.children)) + ")"


Node = Term | Not | And | Or


class Query(Record):
    """Query is a parsed query: the expression and the query-wide settings."""

    expr: Node
    result_type: ResultType = ResultType.FILE
    case: Case = Case.AUTO

    def __str__(self) -> str:
        suffix = "" if self.result_type is ResultType.FILE else f" type:{self.result_type}"
        return f"{self.expr}{suffix}"

    def terms(self) -> tuple[Term, ...]:
        """Query.terms lists every term of the expression, negated or not, in order."""
        out: list[Term] = []
        _collect_terms(self.expr, out)
        return tuple(out)


def _collect_terms(node: Node, out: list[Term]) -> None:
    if isinstance(node, Term):
        out.append(node)
    elif isinstance(node, Not):
        _collect_terms(node.child, out)
    else:
        for child in node.children:
            _collect_terms(child, out)


def make_and(children: list[Node]) -> Node:
    """make_and builds a normalised AND: nested ANDs flattened, duplicates dropped."""
    return _make_group(And, children)


def make_or(children: list[Node]) -> Node:
    """make_or builds a normalised OR: nested ORs flattened, duplicates dropped."""
    return _make_group(Or, children)


def _make_group(kind: type[And] | type[Or], children: list[Node]) -> Node:
    flat: list[Node] = []
    for child in children:
        for item in child.children if isinstance(child, kind) else (child,):
            if item not in flat:
                flat.append(item)
    return flat[0] if len(flat) == 1 else kind(tuple(flat))


def make_not(child: Node) -> Node:
    """make_not negates a node, cancelling a double negation."""
    return child.child if isinstance(child, Not) else Not(child)


# Fields written `name:value`; `path:` is `file:`, `content:` is an explicit content term.
_FIELDS = {"file", "path", "repo", "lang", "sym", "content", "case", "type"}
_WORD_END = " \t\r\n\f\v"


class _RawTerm(Record):
    """_RawTerm is a term before `case:`/`type:` (which may come later) are applied."""

    field: Field | None  # None: a bare term, whose field depends on `type:`
    pattern: str
    literal: bool


class _RawNot(Record):
    child: _RawNode


class _RawGroup(Record):
    conjunction: bool
    children: tuple[_RawNode, ...]


_RawNode = _RawTerm | _RawNot | _RawGroup


def _raw_group(conjunction: bool, items: list[_RawNode]) -> _RawNode:
    return items[0] if len(items) == 1 else _RawGroup(conjunction, tuple(items))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.case: Case | None = None
        self.result_type: ResultType | None = None

    def fail(self, message: str, expected: str, position: int | None = None) -> QuerySyntaxError:
        return QuerySyntaxError(message, self.pos if position is None else position, expected)

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek() and self.peek() in _WORD_END:
            self.pos += 1

    def at_end_of_token(self, index: int) -> bool:
        return index >= len(self.text) or self.text[index] in _WORD_END or self.text[index] == ")"

    def at_keyword(self, word: str) -> bool:
        end = self.pos + len(word)
        return self.text[self.pos : end].lower() == word and (
            end >= len(self.text) or self.text[end] in _WORD_END or self.text[end] == "("
        )

    def parse(self) -> Query:
        self.skip_space()
        if self.pos >= len(self.text):
            raise self.fail("empty query", "a search term")
        expr = self.parse_or()
        self.skip_space()
        if self.pos < len(self.text):
            raise self.fail("unexpected ')'", "a search term or the end of the query")
        case = self.case or Case.AUTO
        result_type = self.result_type or ResultType.FILE
        resolved = _resolve(expr, case, result_type)
        if not _positive(resolved):
            raise QuerySyntaxError(
                "a query needs at least one positive term", 0, "a term that is not negated"
            )
        return Query(resolved, result_type, case)

    def parse_or(self) -> _RawNode:
        items = [self.parse_and()]
        while self.at_keyword("or"):
            self.pos += 2
            self.skip_space()
            if self.pos >= len(self.text) or self.peek() == ")":
                raise self.fail("nothing after 'or'", "a search term after 'or'")
            items.append(self.parse_and())
        return _raw_group(False, items)

    def parse_and(self) -> _RawNode:
        items: list[_RawNode] = []
        while True:
            self.skip_space()
            if self.pos >= len(self.text) or self.peek() == ")":
                break
            if self.at_keyword("or"):
                if not items:
                    raise self.fail("unexpected 'or'", "a search term before 'or'")
                break
            if self.at_keyword("and"):
                self.pos += 3
                self.skip_space()
                if not items or self.pos >= len(self.text) or self.peek() == ")":
                    raise self.fail("'and' needs a term on each side", "a search term", self.pos)
                continue
            node = self.parse_unary()
            if node is not None:
                items.append(node)
        if not items:
            raise self.fail("expected a search term", "a search term")
        return _raw_group(True, items)

    def parse_unary(self) -> _RawNode | None:
        start = self.pos
        ch = self.peek()
        if ch == "-":
            if self.at_end_of_token(self.pos + 1) or self.peek(1) == "-":
                raise self.fail("nothing to negate after '-'", "a search term after '-'", self.pos + 1)
            self.pos += 1
            child = self.parse_unary()
            if child is None:
                raise self.fail("settings cannot be negated", "a search term after '-'", start)
            return child.child if isinstance(child, _RawNot) else _RawNot(child)
        if ch == "(":
            self.pos += 1
            self.depth += 1
            self.skip_space()
            if self.peek() == ")":
                raise self.fail("empty parentheses", "a search term")
            expr = self.parse_or()
            self.skip_space()
            if self.peek() != ")":
                raise self.fail("unclosed '('", "')'")
            self.pos += 1
            self.depth -= 1
            return expr
        if ch == ")":
            raise self.fail("unexpected ')'", "a search term")
        if ch == '"':
            return _RawTerm(None, self.phrase(), True)
        if ch == "/":
            return _RawTerm(None, self.regex(), False)
        colon = self.text.find(":", self.pos)
        name = self.text[self.pos : colon] if colon > 0 else ""
        if name.lower() in _FIELDS and name.isalpha():
            self.pos = colon + 1
            return self.field(name.lower(), start)
        return _RawTerm(None, self.word(), True)

    def field(self, name: str, start: int) -> _RawNode | None:
        value_at = self.pos
        ch = self.peek()
        if self.at_end_of_token(self.pos):
            raise self.fail(f"nothing after '{name}:'", f"a value after '{name}:'")
        if name in ("case", "type"):
            self.setting(name, self.word().lower(), value_at)
            return None
        if name == "lang":
            value = self.phrase() if ch == '"' else self.word()
            # Imported here: the language tables (compiled `re` patterns) serve `lang:` only.
            from services.search.engine.languages import normalize_language

            language = normalize_language(value)
            if language is None:
                raise self.fail(
                    f"unknown language '{value}'", "a language name such as python or go", value_at
                )
            return _RawTerm(Field.LANG, language, True)
        field = {"path": Field.FILE, "file": Field.FILE, "repo": Field.REPO, "sym": Field.SYM}.get(
            name, Field.CONTENT
        )
        if ch == "/":
            return _RawTerm(field, self.regex(), False)
        if ch == '"':
            return _RawTerm(field, self.phrase(), True)
        value = self.word()
        if field in (Field.FILE, Field.REPO):
            self.check_regex(value, value_at)
            return _RawTerm(field, value, False)
        return _RawTerm(field, value, True)

    def setting(self, name: str, value: str, value_at: int) -> None:
        if name == "case":
            if value not in {c.value for c in Case}:
                raise self.fail(f"bad case: value '{value}'", "yes, no or auto", value_at)
            if self.case is not None and self.case != value:
                raise self.fail("conflicting case: settings", "one case: setting", value_at - 5)
            self.case = Case(value)
        else:
            if value not in {t.value for t in ResultType}:
                raise self.fail(f"bad type: value '{value}'", "file, path or symbol", value_at)
            if self.result_type is not None and self.result_type != value:
                raise self.fail("conflicting type: settings", "one type: setting", value_at - 5)
            self.result_type = ResultType(value)

    def word(self) -> str:
        start = self.pos
        local = 0
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in _WORD_END:
                break
            if ch == "(":
                local += 1
            elif ch == ")":
                if local > 0:
                    local -= 1
                elif self.depth > 0:
                    # Closes the enclosing group: `(foo or bar)`.
                    break
            self.pos += 1
        return self.text[start : self.pos]

    def phrase(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.fail("unterminated quoted phrase", "'\"'")
            if ch == "\\" and self.peek(1) in ('"', "\\"):
                out.append(self.peek(1))
                self.pos += 2
                continue
            self.pos += 1
            if ch == '"':
                break
            out.append(ch)
        if not out:
            raise self.fail("empty quoted phrase", "text between the quotes", start)
        self.expect_token_end("'\"'")
        return "".join(out)

    def regex(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.fail("unterminated regex", "'/'")
            if ch == "\\" and self.peek(1):
                out.append("/" if self.peek(1) == "/" else ch + self.peek(1))
                self.pos += 2
                continue
            self.pos += 1
            if ch == "/":
                break
            out.append(ch)
        if not out:
            raise self.fail("empty regex", "a pattern between the slashes", start)
        self.expect_token_end("'/'")
        pattern = "".join(out)
        self.check_regex(pattern, start)
        return pattern

    def expect_token_end(self, closer: str) -> None:
        if not self.at_end_of_token(self.pos):
            raise self.fail(f"unexpected text after the closing {closer}", "a space or ')'")
        if self.peek() == ")" and self.depth == 0:
            raise self.fail("unexpected ')'", "a space or the end of the query")

    def check_regex(self, pattern: str, position: int) -> None:
        try:
            compile_regex(pattern)
        except InvalidPatternError as exc:
            raise self.fail(
                f"invalid regex: {exc.message}", "a valid RE2 regular expression", position
            ) from exc


def _default_field(result_type: ResultType) -> Field:
    return {ResultType.FILE: Field.CONTENT, ResultType.PATH: Field.FILE, ResultType.SYMBOL: Field.SYM}[
        result_type
    ]


def _resolve(node: _RawNode, case: Case, result_type: ResultType) -> Node:
    """_resolve fixes each term's field (bare terms follow `type:`) and case sensitivity."""
    if isinstance(node, _RawTerm):
        field = node.field or _default_field(result_type)
        if field is Field.LANG:
            return Term(field, node.pattern, True, False)
        if case is Case.AUTO:
            sensitive = (
                any(c.isupper() for c in node.pattern) if node.literal else has_upper_literal(node.pattern)
            )
        else:
            sensitive = case is Case.YES
        return Term(field, node.pattern, node.literal, sensitive)
    if isinstance(node, _RawNot):
        return make_not(_resolve(node.child, case, result_type))
    children = [_resolve(child, case, result_type) for child in node.children]
    return make_and(children) if node.conjunction else make_or(children)


def _positive(node: Node) -> bool:
    if isinstance(node, Term):
        return True
    if isinstance(node, Not):
        return False
    if isinstance(node, And):
        return any(_positive(child) for child in node.children)
    return all(_positive(child) for child in node.children)


def parse_query(text: str) -> Query:
    """parse_query parses a query string; raises QuerySyntaxError naming position and expectation."""
    return _Parser(text).parse()


def plan_query(query: Query) -> Plan:
    """plan_query is the trigram plan every matching document satisfies.

    Content terms contribute their pattern's plan; negations and path, repository, language and
    symbol terms contribute nothing (the searcher checks them), so an OR with such a branch is ALL.
    """
    return _plan_node(query.expr)


def _plan_node(node: Node) -> Plan:
    if isinstance(node, Term):
        if node.field is not Field.CONTENT:
            return ALL
        if node.literal:
            return plan_literal(node.pattern, case_insensitive=not node.case_sensitive)
        return plan_regex(node.pattern, case_insensitive=not node.case_sensitive)
    if isinstance(node, Not):
        return ALL
    plans = [_plan_node(child) for child in node.children]
    return and_(*plans) if isinstance(node, And) else or_(*plans)
