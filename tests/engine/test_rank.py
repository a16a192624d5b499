"""Ranking signals: scores, word boundaries, definitions, enclosing symbols and columns."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.index.facts import path_facts
from services.search.engine.index.format import FACT_GENERATED_CONTENT
from services.search.engine.model import Symbol
from services.search.engine.search import rank
from services.search.engine.search.results import columns_for, match_range


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (rank.RankSignals(definition=True, whole_word=True, content_match=True), 100.0),
        (rank.RankSignals(whole_word=True, content_match=True), 10.0),
        (rank.RankSignals(content_match=True), 1.0),
        (rank.RankSignals(content_match=True, filename_match=True), 6.0),
        (rank.RankSignals(filename_match=True), 5.0),
        (rank.RankSignals(definition=True, test=True), 30.0),
        (rank.RankSignals(whole_word=True, vendored=True), 2.0),
        (rank.RankSignals(whole_word=True, generated=True), 1.0),
        (rank.RankSignals(whole_word=True, test=True, vendored=True), 0.6),
    ],
)
def test_score_table(signals: rank.RankSignals, expected: float) -> None:
    assert rank.score(signals) == pytest.approx(expected)


def test_definition_in_test_file_still_beats_plain_mention() -> None:
    in_test = rank.score(rank.RankSignals(definition=True, test=True))
    plain = rank.score(rank.RankSignals(whole_word=True))
    assert in_test > plain


@pytest.mark.parametrize(
    ("line", "start", "end", "whole"),
    [
        (b"call foo(x)", 5, 8, True),
        (b"foobar", 0, 3, False),
        (b"xfoo", 1, 4, False),
        (b"foo", 0, 3, True),
        (b"a.foo_b", 2, 5, False),
        (b"foo(", 0, 4, True),
        (b"(foo)", 0, 4, True),
        (b"x", 0, 0, False),
        ("é foo".encode(), 3, 6, True),
    ],
)
def test_is_whole_word(line: bytes, start: int, end: int, whole: bool) -> None:
    assert rank.is_whole_word(line, start, end) is whole


def test_prior_weights_bound_the_final_weight_and_order_paths() -> None:
    paths = ["src/main.py", "tests/test_main.py", "vendor/lib/x.go", "api/x.pb.go"]
    facts = bytes(path_facts(p) for p in paths)
    ordinary, test, vendored, generated = map(rank.prior_weight, facts)
    assert ordinary == 1.0
    assert ordinary > test > 0 and ordinary > vendored > 0 and ordinary > generated > 0
    # The content marker only ever lowers the final weight below the path-only prior.
    marked = facts[0] | FACT_GENERATED_CONTENT
    assert rank.facts_weight(marked) < ordinary == rank.facts_weight(facts[0])
    assert rank.facts_weight(facts[1]) == test
    # A first page verifies the ordinary file first, then test, vendored, generated.
    assert list(rank.prior_order(facts[::-1])) == [3, 2, 1, 0]


@given(st.binary(max_size=300))
def test_prior_order_is_a_stable_sort_by_prior_weight(facts: bytes) -> None:
    want = sorted(range(len(facts)), key=lambda i: -rank.prior_weight(facts[i]))  # sorted() is stable
    assert list(rank.prior_order(facts)) == want


def _symbols() -> list[Symbol]:
    source = "class Foo:\n    def bar(self):\n        return 1\n\ndef baz():\n    pass\n"
    cls_at = source.index("Foo")
    bar_at = source.index("bar")
    baz_at = source.index("baz")
    return [
        Symbol("Foo", "class", "Foo", 1, 3, cls_at, cls_at + 3),
        Symbol("bar", "method", "Foo.bar", 2, 3, bar_at, bar_at + 3, parent="Foo"),
        Symbol("baz", "function", "baz", 5, 6, baz_at, baz_at + 3),
    ]


def test_symbol_table_enclosing_is_innermost() -> None:
    table = rank.SymbolTable.from_symbols(_symbols())
    enclosing = table.enclosing(3)
    assert enclosing is not None and enclosing.qualified_name == "Foo.bar"
    top = table.enclosing(1)
    assert top is not None and top.name == "Foo"
    assert table.enclosing(4) is None
    last = table.enclosing(6)
    assert last is not None and last.name == "baz"
    assert not rank.SymbolTable.from_symbols([]) and table


def test_symbol_table_enclosing_many_decodes_each_definition_once() -> None:
    symbols = _symbols()
    # A sibling with the same span: the first recorded wins the tie, as `enclosing` has always chosen.
    symbols.append(Symbol("qux", "function", "qux", 5, 6, 0, 0))
    decoded: list[int] = []

    def decode(i: int) -> Symbol:
        decoded.append(i)
        return symbols[i]

    # Records as a segment stores them: 32 bytes, the four spans first.
    records = b"".join(
        struct.pack("<8I", s.start_line, s.end_line, s.start_byte, s.end_byte, 9, 9, 9, 9) for s in symbols
    )
    table = rank.SymbolTable(records, len(symbols), 32, decode)
    lines = [1, 2, 3, 3, 4, 5, 6, 7]
    found = table.enclosing_many(lines)
    assert [s.name if s else None for s in found] == ["Foo", "bar", "bar", "bar", None, "baz", "baz", None]
    assert sorted(decoded) == [0, 1, 2]  # three definitions, each decoded once
    assert [table.enclosing(line) for line in lines] == found
    assert rank.SymbolTable.from_symbols([]).enclosing_many([1, 2]) == [None, None]


def test_symbol_table_defines_by_covering_the_name() -> None:
    table = rank.SymbolTable.from_symbols(_symbols())
    line2_start = len("class Foo:\n")
    assert table.defines([(line2_start + 8, line2_start + 11)])  # "bar"
    assert table.defines([(line2_start + 4, line2_start + 11)])  # "def bar" covers the name
    assert not table.defines([(line2_start + 4, line2_start + 9)])  # "def b" only overlaps it
    assert not table.defines([(line2_start + 9, line2_start + 11)])  # "ar" is inside the name
    assert not table.defines([(line2_start + 12, line2_start + 16)])  # "self"
    assert table.defines([(line2_start + 12, line2_start + 16), (0, 9)])  # "class Foo"
    assert not table.defines([(30, 38)])
    assert not table.defines([])


def _defines(spans: list[tuple[int, int, int, int]], ranges: list[tuple[int, int]]) -> bool:
    """_defines is SymbolTable.defines stated directly: some range holds some named span."""
    return any(s < e and lo <= s and e <= hi for _, _, s, e in spans for lo, hi in ranges)


def _enclosing(spans: list[tuple[int, int, int, int]], line: int) -> int | None:
    """_enclosing is SymbolTable.enclosing stated directly, as an index into spans."""
    inside = [i for i, (start, end, _, _) in enumerate(spans) if start <= line <= end]
    return min(inside, key=lambda i: (spans[i][1] - spans[i][0], -spans[i][0], i), default=None)


_SPAN = st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 60), st.integers(0, 60))


@given(
    st.lists(_SPAN, max_size=40),
    st.lists(st.tuples(st.integers(-5, 70), st.integers(-5, 70)), max_size=12),
    st.lists(st.integers(-2, 45), max_size=12),
)
def test_symbol_table_agrees_with_its_definition(
    spans: list[tuple[int, int, int, int]], ranges: list[tuple[int, int]], lines: list[int]
) -> None:
    symbols = [Symbol(f"s{i}", "function", f"s{i}", *span) for i, span in enumerate(spans)]
    table = rank.SymbolTable.from_symbols(symbols)
    assert table.defines(ranges) is _defines(spans, ranges)
    want = [_enclosing(spans, line) for line in lines]
    assert [int(s.name[1:]) if s else None for s in table.enclosing_many(lines)] == want


def test_symbol_table_refuses_records_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        rank.SymbolTable(b"\0" * 31, 1, 32, lambda i: _symbols()[i])
    with pytest.raises(ValueError, match="do not fit"):
        rank.SymbolTable(b"\0" * 32, 4, 8, lambda i: _symbols()[i])  # a record holds four u32 at least
    # The native checks refuse the same on their own.
    with pytest.raises(ValueError, match="do not fit"):
        _fastscan.symbols_define(b"\0" * 31, 1, 32, struct.pack("<qq", 0, 9))
    with pytest.raises(ValueError, match="do not fit"):
        _fastscan.symbols_enclosing(b"\0" * 32, 1, 8, struct.pack("<q", 1))
    with pytest.raises(ValueError, match="int64"):
        _fastscan.symbols_enclosing(b"\0" * 32, 1, 32, b"\0" * 7)


def test_symbol_table_ignores_symbols_without_offsets() -> None:
    table = rank.SymbolTable.from_symbols([Symbol("main", "function", "main", 1, 3)])
    assert not table.defines([(4, 8)])
    found = table.enclosing(2)
    assert found is not None and found.name == "main"


def test_columns_count_code_points() -> None:
    line = "\u03b1\u03b2 foo \u03b3".encode()
    start = line.index(b"foo")
    assert columns_for(line, start, start + 3) == (4, 7)
    rng = match_range(line, start, start + 3)
    assert (rng.start, rng.end, rng.start_column, rng.end_column) == (start, start + 3, 4, 7)
    assert columns_for(b"abc", 0, 0) == (1, 1)
