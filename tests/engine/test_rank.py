"""Ranking signals: scores, word boundaries, definitions, enclosing symbols and columns."""

from __future__ import annotations

import numpy as np
import pytest

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
    facts = np.array([path_facts(p) for p in paths], dtype=np.uint8)
    ordinary, test, vendored, generated = rank.prior_weights(facts).tolist()
    assert ordinary == 1.0
    assert ordinary > test > 0 and ordinary > vendored > 0 and ordinary > generated > 0
    # The content marker only ever lowers the final weight below the path-only prior.
    marked = int(facts[0]) | FACT_GENERATED_CONTENT
    assert rank.facts_weight(marked) < ordinary == rank.facts_weight(int(facts[0]))
    assert rank.facts_weight(int(facts[1])) == test


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

    table = rank.SymbolTable(
        np.array([(s.start_line, s.end_line, s.start_byte, s.end_byte) for s in symbols], dtype=np.uint32),
        decode,
    )
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
