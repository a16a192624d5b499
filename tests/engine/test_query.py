"""Tests for the query language (services/search/engine/query/query.py)."""

from __future__ import annotations

import pytest

from services.search.engine.query.query import (
    Case,
    Field,
    QuerySyntaxError,
    ResultType,
    Term,
    parse_query,
    plan_query,
)

# (query, canonical form). A trailing `i` marks a case-insensitive term.
CANONICAL: list[tuple[str, str]] = [
    ("foo", 'content:"foo"i'),
    ("foo bar", '(and content:"foo"i content:"bar"i)'),
    ("  foo   bar  ", '(and content:"foo"i content:"bar"i)'),
    ("foo or bar", '(or content:"foo"i content:"bar"i)'),
    ("foo OR bar", '(or content:"foo"i content:"bar"i)'),
    ("foo or bar baz", '(or content:"foo"i (and content:"bar"i content:"baz"i))'),
    ("(foo or bar) baz", '(and (or content:"foo"i content:"bar"i) content:"baz"i)'),
    ("a or (b or c)", '(or content:"a"i content:"b"i content:"c"i)'),
    ("a (b c)", '(and content:"a"i content:"b"i content:"c"i)'),
    ("foo and bar", '(and content:"foo"i content:"bar"i)'),
    ("foo foo", 'content:"foo"i'),
    ('"foo bar"', 'content:"foo bar"i'),
    ('"say \\"hi\\" \\\\o/"', 'content:"say \\"hi\\" \\\\o/"i'),
    ("/fo+\\(/", "content:/fo+\\(/i"),
    ("/a\\/b/", "content:/a\\/b/i"),
    ("Foo", 'content:"Foo"'),
    ("/[A-Z]+/", "content:/[A-Z]+/"),
    ("/\\W\\S/", "content:/\\W\\S/i"),
    ("Foo case:no", 'content:"Foo"i'),
    ("foo case:yes", 'content:"foo"'),
    ("case:auto foo Bar", '(and content:"foo"i content:"Bar")'),
    ("-foo bar", '(and (not content:"foo"i) content:"bar"i)'),
    ("foo -(bar or baz)", '(and content:"foo"i (not (or content:"bar"i content:"baz"i)))'),
    ("foo -file:test", '(and content:"foo"i (not file:/test/i))'),
    ("file:\\.py$ foo", '(and file:/\\.py$/i content:"foo"i)'),
    ("path:src/ foo", '(and file:/src\\//i content:"foo"i)'),
    ('file:"a.py" foo', '(and file:"a.py"i content:"foo"i)'),
    ("lang:py foo", '(and lang:python content:"foo"i)'),
    ("lang:Go foo", '(and lang:go content:"foo"i)'),
    ("repo:kota foo", '(and repo:/kota/i content:"foo"i)'),
    ("sym:Parser", 'sym:"Parser"'),
    ("sym:/^get_/", "sym:/^get_/i"),
    ("content:file:x", 'content:"file:x"i'),
    ("type:symbol Parser", 'sym:"Parser" type:symbol'),
    ("type:path setup", 'file:"setup"i type:path'),
    ("type:file foo", 'content:"foo"i'),
    ("copy_from_user(", 'content:"copy_from_user("i'),
    ("(f(x) or g)", '(or content:"f(x)"i content:"g"i)'),
    ("foo)", 'content:"foo)"i'),
    ("std::vector http://x", '(and content:"std::vector"i content:"http://x"i)'),
    ("foo-bar", 'content:"foo-bar"i'),
]


@pytest.mark.parametrize(("text", "expected"), CANONICAL)
def test_canonical_form(text: str, expected: str) -> None:
    query = parse_query(text)
    assert str(query) == expected
    # The canonical form is stable: parsing a query twice gives equal trees.
    assert parse_query(text) == query


# (bad query, 0-based position, message fragment, expected fragment).
ERRORS: list[tuple[str, int, str, str]] = [
    ("", 0, "empty query", "a search term"),
    ("   ", 3, "empty query", "a search term"),
    ("-foo", 0, "at least one positive term", "not negated"),
    ("-foo -bar", 0, "at least one positive term", "not negated"),
    ("foo or -bar", 0, "at least one positive term", "not negated"),
    ("foo or", 6, "nothing after 'or'", "after 'or'"),
    ("or foo", 0, "unexpected 'or'", "before 'or'"),
    ("foo and", 7, "'and' needs a term on each side", "a search term"),
    ("(foo", 4, "unclosed '('", "')'"),
    ("(foo or bar", 11, "unclosed '('", "')'"),
    ("()", 1, "empty parentheses", "a search term"),
    ("foo )", 4, "unexpected ')'", "end of the query"),
    ("- foo", 1, "nothing to negate", "after '-'"),
    ("--foo", 1, "nothing to negate", "after '-'"),
    ('"abc', 4, "unterminated quoted phrase", "'\"'"),
    ('x ""', 2, "empty quoted phrase", "between the quotes"),
    ('"abc"def', 5, "unexpected text after the closing", "a space"),
    ("/abc", 4, "unterminated regex", "'/'"),
    ("//", 0, "empty regex", "between the slashes"),
    ("/a(/", 0, "invalid regex: missing ): a(", "valid RE2"),
    ("foo /a{2,1}/", 4, "invalid regex", "valid RE2"),
    ("/usr/bin", 5, "unexpected text after the closing", "a space"),
    ("case:maybe x", 5, "bad case: value 'maybe'", "yes, no or auto"),
    ("case:yes x case:no", 11, "conflicting case: settings", "one case: setting"),
    ("type:dir x", 5, "bad type: value 'dir'", "file, path or symbol"),
    ("-case:yes x", 0, "settings cannot be negated", "after '-'"),
    ("case:yes", 8, "expected a search term", "a search term"),
    ("foo or case:yes", 15, "expected a search term", "a search term"),
    ("lang:klingon x", 5, "unknown language 'klingon'", "language name"),
    ("file: x", 5, "nothing after 'file:'", "a value after 'file:'"),
    ("file:a(", 5, "invalid regex", "valid RE2"),
]


@pytest.mark.parametrize(("text", "position", "message", "expected"), ERRORS)
def test_syntax_errors(text: str, position: int, message: str, expected: str) -> None:
    with pytest.raises(QuerySyntaxError) as info:
        parse_query(text)
    assert info.value.position == position, info.value
    assert message in info.value.message
    assert expected in info.value.expected
    assert f"at position {position}" in str(info.value)


def test_query_settings_and_terms() -> None:
    query = parse_query("case:yes type:symbol -file:vendor Parser or lang:rust")
    assert query.case is Case.YES
    assert query.result_type is ResultType.SYMBOL
    assert query.terms() == (
        Term(Field.FILE, "vendor", literal=False, case_sensitive=True),
        Term(Field.SYM, "Parser", literal=True, case_sensitive=True),
        Term(Field.LANG, "rust", literal=True, case_sensitive=False),
    )


def test_literal_terms_are_escaped_regexes() -> None:
    term = parse_query('"a.b*c(d)"').terms()[0]
    assert term.literal
    assert term.regex == "a\\.b\\*c\\(d\\)"
    regex_term = parse_query("/a.b/").terms()[0]
    assert not regex_term.literal and regex_term.regex == "a.b"


# (query, expected plan): content terms plan, everything else contributes no constraint.
PLANS: list[tuple[str, str]] = [
    ("foo bar", '"bar" "foo"'),
    ("foo or bar baz", '"foo"|("bar" "baz")'),
    ("Foo", '"foo"'),
    ("/fo+bar/", '"bar" "oba"'),
    ("foo -bar", '"foo"'),
    ("foo file:\\.py$ lang:python repo:x", '"foo"'),
    ("foo or file:x", "ALL"),
    ("foo or ab", "ALL"),
    ("sym:Parser", "ALL"),
    ("type:path setup", "ALL"),
    ("content:abc /xyz/", '"abc" "xyz"'),
    ('"a b c" or "xyz"', '"xyz"|(" b " "a b" "b c")'),
]


@pytest.mark.parametrize(("text", "expected"), PLANS)
def test_plan_query(text: str, expected: str) -> None:
    assert str(plan_query(parse_query(text))) == expected
