"""Tests for the planning parser of RE2 syntax (services/search/engine/query/regexsyntax.py)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.search.engine.query.plan import evaluate_on, plan_regex
from services.search.engine.query.regexsyntax import (
    MAX_CODE_POINT,
    Alternate,
    AnyChar,
    Assertion,
    CharClass,
    Concat,
    EmptyMatch,
    Literal,
    RegexSyntaxError,
    Repeat,
    has_upper_literal,
    line_anchored,
    parse_regex,
)
from services.search.engine.query.verify import InvalidPatternError, LineMatcher

TREES = [
    # Runs of literal characters are one node.
    ("abc", Literal("abc")),
    ("ab*c", Concat((Literal("a"), Repeat(Literal("b"), 0, None), Literal("c")))),
    ("a|b", Alternate((Literal("a"), Literal("b")))),
    ("a|", Alternate((Literal("a"), EmptyMatch()))),
    ("(?:)", EmptyMatch()),
    (".", AnyChar()),
    (r"\C", AnyChar()),
    (r"\pL", AnyChar()),
    (r"[^\p{Greek}]", AnyChar()),
    ("^$", Concat((Assertion("^"), Assertion("$")))),
    (r"\b\B\A\z", Concat((Assertion("\\b"), Assertion("\\B"), Assertion("\\A"), Assertion("\\z")))),
    ("a*?", Repeat(Literal("a"), 0, None, greedy=False)),
    ("a+", Repeat(Literal("a"), 1, None)),
    ("a??", Repeat(Literal("a"), 0, 1, greedy=False)),
    ("a{2}", Repeat(Literal("a"), 2, 2)),
    ("a{2,}", Repeat(Literal("a"), 2, None)),
    ("a{2,5}?", Repeat(Literal("a"), 2, 5, greedy=False)),
    ("a{,3}", Literal("a{,3}")),
    ("[a-c]", CharClass(((0x61, 0x63),))),
    ("[]a]", CharClass(((0x5D, 0x5D), (0x61, 0x61)))),
    ("[a-]", CharClass(((0x2D, 0x2D), (0x61, 0x61)))),
    (r"[\d_]", CharClass(((0x30, 0x39), (0x5F, 0x5F)))),
    ("[[:xdigit:]]", CharClass(((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)))),
    ("[^\\x00-\\x{10FFFE}]", CharClass(((MAX_CODE_POINT, MAX_CODE_POINT),))),
    (r"\D", CharClass(((0, 0x2F), (0x3A, MAX_CODE_POINT)))),
    (r"\x41\x{263a}\101\0", Literal("A\u263aA\x00")),
    (r"\Qa.*\E+", Repeat(Literal("a.*"), 1, None)),
    (r"\Qa.*", Literal("a.*")),
    (r"\.\_\ ", Literal("._ ")),
    ("(?i)ab", Literal("ab", fold=True)),
    ("(?i:a)b", Concat((Literal("a", fold=True), Literal("b")))),
    ("((?i)a)b", Concat((Literal("a", fold=True), Literal("b")))),
    ("(?i)a|b", Alternate((Literal("a", fold=True), Literal("b", fold=True)))),
    ("(?i)a(?-i)b", Concat((Literal("a", fold=True), Literal("b")))),
    ("(?P<name>a)(?<n2>b)", Literal("ab")),
    ("(?sm-U:a)", Literal("a")),
]


@pytest.mark.parametrize(("pattern", "tree"), TREES)
def test_parse_trees(pattern: str, tree: object) -> None:
    assert parse_regex(pattern).root == tree


@pytest.mark.parametrize(
    "pattern",
    [
        "(a",
        "a)",
        "[a",
        "a**",
        "*a",
        "a{2}{3}",
        r"\8",
        r"\Z",
        "[[:foo:]]",
        r"[a-\d]",
        "[z-a]",
        "(?P=n)",
        "(?i-)a",
        "a{1001}",
    ],
)
def test_parse_errors_are_also_re2_errors(pattern: str) -> None:
    with pytest.raises(RegexSyntaxError):
        parse_regex(pattern)
    with pytest.raises(InvalidPatternError):
        LineMatcher(pattern, case_sensitive=True)


def test_parse_error_position() -> None:
    with pytest.raises(RegexSyntaxError) as info:
        parse_regex("ab(cd")
    assert info.value.position == 2
    assert "missing )" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "upper"),
    [
        ("abc", False),
        ("aBc", True),
        (r"\W\S\D\B\pL", False),
        (r"\x41", True),
        ("[A-Z]", True),
        (r"\QAB\E", True),
        ("(?P<Name>x)", False),
        ("(a", False),
        ("(A", True),
        (r"(\W", False),
    ],
)
def test_has_upper_literal(pattern: str, upper: bool) -> None:
    assert has_upper_literal(pattern) is upper


@pytest.mark.parametrize(
    ("pattern", "rewritten"),
    [
        (r"\Afoo\z", "(?m:^)foo(?m:$)"),
        (r"\\A", r"\\A"),
        (r"[\A]", r"[\A]"),
        (r"\QA\z\E\z", r"\QA\z\E(?m:$)"),
        ("(", "("),
    ],
)
def test_line_anchored(pattern: str, rewritten: str) -> None:
    assert line_anchored(pattern) == rewritten


_SOUP = st.text(
    st.sampled_from([*"ab(|)*+?{}[]^$.\\-:,0123456789iswdDpLQEzAbBxP<>=?!", "\u00e9", "K"]), max_size=14
)


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(
    pattern=_SOUP, docs=st.lists(st.text("ab12 \n-{}()[]\u00e9K", max_size=30), max_size=4), ci=st.booleans()
)
def test_random_patterns_parse_or_fail_cleanly_and_plan_soundly(
    pattern: str, docs: list[str], ci: bool
) -> None:
    # The parser either reads a pattern or raises RegexSyntaxError — nothing else.
    with contextlib.suppress(RegexSyntaxError):
        parse_regex(pattern)
    try:
        matcher = LineMatcher(pattern, case_sensitive=not ci)
    except InvalidPatternError:
        assume(False)
        return
    plan = plan_regex(pattern, case_insensitive=ci)
    for text in docs:
        doc = text.encode()
        if matcher.matches(doc):
            folded = doc.lower()
            grams = {folded[i : i + 3] for i in range(len(folded) - 2) if b"\n" not in folded[i : i + 3]}
            assert evaluate_on(plan, grams), (pattern, doc, str(plan))
