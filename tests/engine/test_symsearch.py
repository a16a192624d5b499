"""Tests for symbol search ranking: tiers, demotion of tests, qualified names, counts, limits.

The candidates come from real extraction of small sources, so the tests also pin the shape
of what the extractor hands to search.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.search.engine.model import Symbol
from services.search.engine.symbols.symbols import extract_symbols
from services.search.engine.symbols.symsearch import (
    MatchTier,
    SymbolCandidate,
    enclosing_symbol,
    normalize_kind,
    search_symbols,
)

SOURCES: dict[str, tuple[str, bytes]] = {
    "app/server.py": (
        "python",
        b"class Server:\n"
        b"    def serve(self):\n"
        b"        pass\n"
        b"    def serve_forever(self):\n"
        b"        pass\n"
        b"def server_factory():\n"
        b"    pass\n"
        b"def make_server():\n"
        b"    pass\n",
    ),
    "app/SERVER.py": ("python", b"SERVER = 1\n"),
    "tests/test_server.py": ("python", b"class Server:\n    pass\ndef test_serve():\n    pass\n"),
    "src/widget.cc": (
        "cpp",
        b"namespace ui {\nclass Widget {\n  int size() const;\n};\n}\n"
        b"int ui::Widget::size() const { return 1; }\n",
    ),
    "vendor/lib/server.go": ("go", b"package lib\n\ntype Server struct{}\n\nfunc (s *Server) Serve() {}\n"),
    "cmd/main.go": ("go", b"package main\n\nfunc Serve() {}\n"),
}


def _candidates() -> list[SymbolCandidate]:
    out: list[SymbolCandidate] = []
    for path, (language, content) in SOURCES.items():
        for symbol in extract_symbols(content, language):
            out.append(SymbolCandidate(symbol, path, "acme/app", language))
    return out


def _summary(pattern: str, **kwargs: object) -> list[tuple[str, str, MatchTier]]:
    result = search_symbols(pattern, _candidates(), **kwargs)  # type: ignore[arg-type]
    return [(m.path, m.symbol.qualified_name, m.tier) for m in result.matches]


def test_tiers_order_exact_nocase_prefix_substring() -> None:
    assert _summary("Server") == [
        ("app/server.py", "Server", MatchTier.EXACT),
        # Vendored and test definitions follow within the tier, then path order.
        ("tests/test_server.py", "Server", MatchTier.EXACT),
        ("vendor/lib/server.go", "Server", MatchTier.EXACT),
        ("app/SERVER.py", "SERVER", MatchTier.EXACT_NOCASE),
        ("app/server.py", "server_factory", MatchTier.PREFIX),
        ("app/server.py", "make_server", MatchTier.SUBSTRING),
    ]


def test_total_counts_every_match_beyond_the_limit() -> None:
    full = search_symbols("serve", _candidates(), limit=100)
    # Server x3, SERVER, serve, serve_forever, server_factory, make_server, test_serve, Serve x2.
    assert full.total == len(full.matches) == 11
    limited = search_symbols("serve", _candidates(), limit=3)
    assert limited.total == 11
    assert limited.limit_hit and not full.limit_hit
    assert limited.matches == full.matches[:3]
    counted_only = search_symbols("serve", _candidates(), limit=0)
    assert counted_only.total == 11 and counted_only.matches == ()


def test_case_sensitive_drops_the_nocase_tier() -> None:
    assert _summary("SERVER", case_sensitive=True) == [("app/SERVER.py", "SERVER", MatchTier.EXACT)]
    assert [q for _, q, _ in _summary("server", case_sensitive=True)] == ["server_factory", "make_server"]


def test_qualified_queries_match_qualified_names_with_either_separator() -> None:
    assert _summary("Server.serve") == [
        ("app/server.py", "Server.serve", MatchTier.EXACT),
        ("vendor/lib/server.go", "Server.Serve", MatchTier.EXACT_NOCASE),
        ("app/server.py", "Server.serve_forever", MatchTier.PREFIX),
    ]
    # A suffix at a separator is exact: `Widget::size` names `ui::Widget::size`.
    assert _summary("Widget::size") == [
        ("src/widget.cc", "ui::Widget::size", MatchTier.EXACT),
        ("src/widget.cc", "ui::Widget::size", MatchTier.EXACT),
    ]
    assert [(q, t) for _, q, t in _summary("ui::widget")] == [
        ("ui::Widget", MatchTier.EXACT_NOCASE),
        ("ui::Widget::size", MatchTier.PREFIX),
        ("ui::Widget::size", MatchTier.PREFIX),
    ]


def test_regex_tier_and_invalid_regex() -> None:
    assert _summary("^serve.*ever$") == [("app/server.py", "Server.serve_forever", MatchTier.REGEX)]
    # `make_.+r` is not a substring of anything, so only the regex tier can find it.
    assert _summary("make_.+r") == [("app/server.py", "make_server", MatchTier.REGEX)]
    # Not a valid RE2 pattern: the literal tiers still run, the regex tier is skipped.
    assert search_symbols("serve(", _candidates()).total == 0
    assert _summary("(") == []


def test_kind_filter() -> None:
    assert _summary("serve", kind="macro") == []
    assert _summary("serve", kind="class") == [
        ("app/server.py", "Server", MatchTier.PREFIX),
        ("tests/test_server.py", "Server", MatchTier.PREFIX),
    ]
    assert [(p, q) for p, q, _ in _summary("Serve", kind={"method", "function"})] == [
        ("cmd/main.go", "Serve"),
        ("vendor/lib/server.go", "Server.Serve"),
        ("app/server.py", "Server.serve"),
        ("app/server.py", "Server.serve_forever"),
        ("app/server.py", "server_factory"),
        ("app/server.py", "make_server"),
        ("tests/test_server.py", "test_serve"),
    ]


def test_ties_break_on_path_then_line_and_are_stable() -> None:
    symbol = Symbol("run", "function", "run", 3, 4)
    earlier = Symbol("run", "function", "run", 1, 2)
    candidates = [
        (symbol, "b.py", "", "python"),
        (symbol, "a.py", "", "python"),
        (earlier, "b.py", "", "python"),
    ]
    result = search_symbols("run", candidates)
    assert [(m.path, m.symbol.start_line) for m in result.matches] == [("a.py", 3), ("b.py", 1), ("b.py", 3)]
    assert search_symbols("run", list(reversed(candidates))).matches == result.matches


@pytest.mark.parametrize("pattern", ["", "   "])
def test_empty_pattern_matches_nothing(pattern: str) -> None:
    assert search_symbols(pattern, _candidates()).total == 0


def test_enclosing_symbol_is_innermost() -> None:
    (_, content) = SOURCES["app/server.py"]
    found = extract_symbols(content, "python")
    inner = enclosing_symbol(found, 3)
    assert inner is not None and inner.qualified_name == "Server.serve"
    outer = enclosing_symbol(found, 1)
    assert outer is not None and outer.qualified_name == "Server"
    assert enclosing_symbol(found, 100) is None


def _many(names: list[str]) -> list[tuple[Symbol, str, str, str]]:
    return [
        (Symbol(name, "function", name, i + 1, i + 1), "m.py", "", "python") for i, name in enumerate(names)
    ]


def test_regex_tier_over_many_batches_matches_name_by_name() -> None:
    # More candidates than one regex batch, with anchors and negated classes that must not
    # reach across the newlines joining the names of a batch.
    names = [f"{'get' if i % 3 else 'set'}_{i}_{'x' * (i % 5)}" for i in range(10_000)]
    cases: list[tuple[str, Callable[[str], bool]]] = [
        (r"^set_\d+_$", lambda n: n.startswith("set_") and n.endswith("_")),
        (r"_1\d*_x{4}$", lambda n: "_1" in n and n.endswith("_xxxx") and not n.endswith("_xxxxx")),
        (r"[^a-z_0-9]", lambda n: False),
        (r"x\z", lambda n: n.endswith("x")),
        (r"\Aget_9", lambda n: n.startswith("get_9")),
    ]
    for pattern, expect in cases:
        result = search_symbols(pattern, _many(names), limit=5)
        expected = [n for n in names if expect(n)]
        assert result.total == len(expected), pattern
        assert all(m.tier is MatchTier.REGEX for m in result.matches)
        assert [m.symbol.name for m in result.matches] == expected[:5]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("function", "function"),
        ("func", "function"),
        ("FN", "function"),
        ("const", "constant"),
        ("typedef", "type"),
        ("class", "class"),
        ("gadget", None),
    ],
)
def test_normalize_kind(name: str, expected: str | None) -> None:
    assert normalize_kind(name) == expected


def test_kind_filter_accepts_aliases() -> None:
    assert _summary("serve", kind="func") == _summary("serve", kind="function")
    assert [q for _, q, _ in _summary("serve", kind="func")] == [
        "Serve",
        "server_factory",
        "make_server",
        "test_serve",
    ]
