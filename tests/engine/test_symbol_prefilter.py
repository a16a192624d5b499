"""Symbol search decodes only the documents whose stored symbols hold the pattern's needle.

`symsearch.symbol_needle` picks text every matching symbol holds (for plain patterns; a regex's
required text through `candidates.symbol_search_screen`; a regex without one is screened by
the regex itself, run natively over each name), and `candidates.symbol_candidates` screens a
segment's symbols.bin natively (`_fastscan.symbol_hits`). The answers
must be exactly those of the full scan (every symbol of every live document through
`search_symbols`), including names whose lowercase gains ASCII letters from KELVIN SIGN or
from I WITH DOT ABOVE, names with LONG S (which RE2's case folding equates with `s`), and
qualified names written with either separator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.index import reader
from services.search.engine.index.format import SYMBOL_RECORD, IndexCorruptError
from services.search.engine.index.index import Index
from services.search.engine.index.reader import SegmentData
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument, Symbol
from services.search.engine.search.candidates import symbol_search_screen
from services.search.engine.search.searcher import Searcher
from services.search.engine.symbols.symsearch import SymbolCandidate, search_symbols, symbol_needle
from tests.engine.segments import rewrite_part

NAMES = [
    "Kelvin",
    "\u212aelvin",  # KELVIN SIGN: lower() is "kelvin"
    "\u0130ndex",  # I WITH DOT ABOVE: lower() is "i\u0307ndex"
    "fo\u0130",
    "\u017ftream",  # LONG S: lower() keeps it; RE2's (?i) s matches it
    "stream",
    "get_widget_size",
    "$scope",
    "na\u00efve",
    "Parser",
    "parse",
]
QUALIFIED = [
    ("size", "Widget::size"),
    ("size", "pkg.Widget.size"),
    ("open", "ops.open"),
    ("Open", "File::Open"),
]


def _documents(names: list[str]) -> list[SourceDocument]:
    docs = []
    for i, name in enumerate(names):
        content = f"def {name}():\n    pass\n".encode()
        symbol = Symbol(name, "function", name, 1, 2, 4, 4 + len(name.encode()))
        docs.append(SourceDocument(f"id-{i}", f"src/f{i}.py", content, "r", "python", (symbol,)))
    for i, (name, qualified) in enumerate(QUALIFIED):
        content = f"x {name}\n".encode()
        symbol = Symbol(name, "method", qualified, 1, 1, 2, 2 + len(name))
        docs.append(SourceDocument(f"q-{i}", f"lib/q{i}.cc", content, "r", "cpp", (symbol,)))
    docs.append(SourceDocument("plain", "README.md", b"no symbols here\n", "r", "markdown"))
    return docs


def _index(root: Path, docs: list[SourceDocument]) -> Index:
    index = Index.create(root)
    with IndexWriter(index) as writer:
        half = len(docs) // 2
        for doc in docs[:half]:
            writer.add(doc)
        writer.commit(merge=False)  # two segments
        for doc in docs[half:]:
            writer.add(doc)
        writer.commit(merge=False)
    return index


def _full_scan(
    index: Index, pattern: str, limit: int, case_sensitive: bool = False
) -> list[tuple[str, str, str]]:
    with index.snapshot() as snap:
        candidates = [
            SymbolCandidate(symbol, seg.doc(o).path, seg.doc(o).repository, seg.doc(o).language)
            for seg in snap.segments
            for o in seg.live
            for symbol in seg.symbols(o)
        ]
    result = search_symbols(pattern, candidates, limit=limit, case_sensitive=case_sensitive)
    return [(m.path, m.symbol.qualified_name, m.tier.name) for m in result.matches] + [
        ("total", str(result.total), "")
    ]


def _searched(
    index: Index, pattern: str, limit: int, case_sensitive: bool = False
) -> list[tuple[str, str, str]]:
    result = Searcher(index).symbols(pattern, limit=limit, case_sensitive=case_sensitive)
    return [(m.path, m.symbol.qualified_name, m.tier.name) for m in result.matches] + [
        ("total", str(result.total), "")
    ]


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        ("kelvin", "kelvin"),
        ("Widget::size", "Widget"),
        ("pkg.Widget.size", "Widget"),
        ("fooi", "fooi"),
        ("I", "I"),
        ("parse", "parse"),
        ("get_.*", None),  # a regex tier: no needle
        ("na\u00efve", None),  # not ASCII
        ("$scope", "$scope"),
        ("  open  ", "open"),
        ("", None),
    ],
)
def test_symbol_needle(pattern: str, needle: str | None) -> None:
    assert symbol_needle(pattern) == needle


@pytest.mark.parametrize(
    ("pattern", "needle", "regex", "qualified", "guard"),
    [
        ("kelvin", "kelvin", False, False, None),  # plain patterns as symbol_needle gives them
        ("Widget::size", "Widget", False, False, None),
        # A regex: the literal tiers' longest piece of text between separators, the regex
        # (over qualified names when the pattern has a separator), guarded by the text RE2's
        # analysis says every regex match holds.
        ("get_.*", "get_", True, True, "get_"),
        ("^sys_", "^sys_", True, False, "sys_"),
        (r"get_\w+_size$", r"get_\w+_size$", True, False, "_size"),
        ("[kK]elvin", "[kK]elvin", True, False, "elvin"),
        (r"foo\.bar", "foo\\", True, True, None),  # the literal holds a separator the tiers rewrite
        (r"\x41BC", r"\x41BC", True, False, None),  # "ABC" is not written as such in the pattern
        ("a::b.*", "a", True, True, None),  # `::` is rewritten for the literal tiers
        ("[a-z]+", "[a-z]+", True, False, None),  # no literal at all
        ("(parse", "(parse", False, False, None),  # not a valid regex: the literal tiers alone
    ],
)
def test_symbol_search_screen_takes_the_regex_and_the_text_its_matches_hold(
    pattern: str, needle: str, regex: bool, qualified: bool, guard: str | None
) -> None:
    screen = symbol_search_screen(pattern)
    assert screen is not None
    assert (screen.needle, screen.regex is not None, screen.qualified, screen.guard) == (
        needle,
        regex,
        qualified,
        guard,
    )


@pytest.mark.parametrize("pattern", ["na\u00efve.*", "", "...", ":"])
def test_some_patterns_decode_every_symbol(pattern: str) -> None:
    assert symbol_search_screen(pattern) is None


@pytest.mark.parametrize(
    "pattern",
    [
        "kelvin",
        "KELVIN",
        "k",
        "elvin",
        "index",
        "i",
        "foi",
        "FOI",
        "stream",
        "s",
        "tream",
        "size",
        "Widget::size",
        "widget.SIZE",
        "ops::open",
        "open",
        "$scope",
        "scope",
        "parse",
        "Parse",
        "get_.*",
        "^p",
        "size$",
        "(?i)KELVIN",
        "[kK]elvin",
        r"get_\w+_size",
        "[a-z]+",
        "elvin$",
        "na\u00efve",
        "NA\u00cfVE",
        "nothing_matches_this",
        "^[gG][eE]t_\\w+$",
        "^[a-z]+$",
        "(?i)^[A-Z]+$",
        "^[^_]+$",
        "[kK]",
        "\\Aparse\\z",
        "^Widget::s",
        "pkg\\.W\\w+",
        "ops[.:]+open",
        "(?-i)^[A-Z]",
        "(get|parse)",
    ],
)
def test_prefiltered_symbol_search_equals_the_full_scan(tmp_path: Path, pattern: str) -> None:
    index = _index(tmp_path / "idx", _documents(NAMES))
    for limit in (1, 50):
        for case_sensitive in (False, True):
            want = _full_scan(index, pattern, limit, case_sensitive)
            assert _searched(index, pattern, limit, case_sensitive) == want


ALPHABET = st.sampled_from(["a", "b", "K", "k", "s", "S", "i", "I", "\u212a", "\u0130", "\u017f", "_", "."])


PLAIN_PIECES = st.sampled_from(["a", "b", "k", "K", "s", "i", "I", "_", "."])
REGEX_PIECES = st.sampled_from(
    [
        "a",
        "b",
        "k",
        "s",
        "i",
        "I",
        "_",
        "^",
        "$",
        ".*",
        "[kK]",
        "\\w",
        "+",
        "(",
        "|",
        "[a-z]",
        "[^_]",
        "(?i)",
        "\\.",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.lists(ALPHABET, min_size=1, max_size=6).map("".join), min_size=1, max_size=8),
    pattern=st.one_of(
        st.lists(PLAIN_PIECES, min_size=1, max_size=4).map("".join),
        st.lists(REGEX_PIECES, min_size=1, max_size=5).map("".join),
    ),
    case_sensitive=st.booleans(),
)
def test_any_pattern_over_tricky_names_equals_the_full_scan(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], pattern: str, case_sensitive: bool
) -> None:
    index = _index(tmp_path_factory.mktemp("idx") / "idx", _documents(names))
    assert _searched(index, pattern, 50, case_sensitive) == _full_scan(index, pattern, 50, case_sensitive)


def test_only_symbols_that_may_hold_the_needle_are_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _index(tmp_path / "idx", _documents(NAMES))
    decoded: list[str] = []
    whole: list[int] = []
    original_at, original_symbols = reader.decode_symbol_at, SegmentData.symbols

    def spy_at(data: bytes | memoryview, record_at: int, strings_at: int) -> tuple[Symbol, int]:
        symbol, after = original_at(data, record_at, strings_at)
        decoded.append(symbol.name)
        return symbol, after

    def spy_symbols(self: SegmentData, ordinal: int) -> tuple[Symbol, ...]:
        whole.append(ordinal)
        return original_symbols(self, ordinal)

    monkeypatch.setattr(reader, "decode_symbol_at", spy_at)
    monkeypatch.setattr(SegmentData, "symbols", spy_symbols)
    # Names with a non-ASCII byte are always decoded: their case folds beyond ASCII.
    non_ascii = sorted(name for name in NAMES if not name.isascii())
    for pattern in ("get_widget", "GET_WIDGET", r"get_\w+_size"):
        result = Searcher(index).symbols(pattern)
        assert [m.symbol.name for m in result.matches] == ["get_widget_size"]
        assert sorted(decoded) == sorted(["get_widget_size", *non_ascii]) and not whole
        decoded.clear()
    # A regex with no required text: the regex screens the names natively.
    result = Searcher(index).symbols("^[gG][eE]t_\\w+$")
    assert [m.symbol.name for m in result.matches] == ["get_widget_size"]
    assert sorted(decoded) == sorted(["get_widget_size", *non_ascii]) and not whole
    decoded.clear()
    Searcher(index).symbols("na\u00efve|x")  # not ASCII: no screen, every live document
    assert len(whole) == len(NAMES) + len(QUALIFIED) + 1  # README.md too
    assert len(decoded) == len(NAMES) + len(QUALIFIED)  # and every symbol


def _block(*symbols: tuple[str, str, str, str]) -> bytes:
    records = b"".join(
        SYMBOL_RECORD.pack(1, 2, 3, 4, *(len(text.encode()) for text in texts)) for texts in symbols
    )
    return records + b"".join(text.encode() for texts in symbols for text in texts)


def _spans(*bounds: int) -> bytes:
    import array

    return array.array("q", bounds).tobytes()


def test_symbol_hits_reads_each_block_and_reports_record_and_string_offsets() -> None:
    first = _block(("Alpha", "function", "m.Alpha", ""), ("beta", "method", "Kls.beta", "Kls"))
    second = _block(("gamma", "class", "gamma", ""), ("\u212aey", "function", "\u212aey", ""))
    data = b"xx" + first + second
    spans = _spans(2, 2 + len(first), 2 + len(first), len(data), 2, 2)
    hits = memoryview(_fastscan.symbol_hits(data, spans, b"ALPHA")).cast("q").tolist()
    in_second = 2 + len(first)
    # Alpha (block 0, symbol 0), and the KELVIN SIGN name (block 1, symbol 1): non-ASCII.
    assert hits == [0, 0, 2, 2 + 64, 1, 1, in_second + 32, in_second + 64 + len("gammaclassgamma")]
    # The qualified name counts as well as the name; a non-ASCII name is always a hit.
    assert memoryview(_fastscan.symbol_hits(data, spans, b"kls")).cast("q").tolist()[:2] == [0, 1]
    assert memoryview(_fastscan.symbol_hits(data, spans, b"")).cast("q").tolist()[::4] == [0, 0, 1, 1]


def test_symbol_hits_with_a_regex_keeps_the_names_it_matches() -> None:
    block = _block(
        ("get_size", "function", "Widget::get_size", "Widget"),
        ("set_size", "function", "Widget::set_size", "Widget"),
        ("caf\u00e9", "function", "caf\u00e9", ""),  # non-ASCII: left to the search's RE2
        ("two\nlines", "function", "two\nlines", ""),  # a newline: likewise
        ("other", "function", "Gadget::other", "Gadget"),
    )
    spans = _spans(0, len(block))
    regex = _fastscan.regex_compile(b"(?m)(?:^get_)", True, False)
    kept = memoryview(_fastscan.symbol_hits(block, spans, None, regex)).cast("q").tolist()[1::4]
    assert kept == [0, 2, 3]
    qualified = _fastscan.regex_compile(b"(?m)(?:^Gadget::)", True, False)
    kept = memoryview(_fastscan.symbol_hits(block, spans, None, qualified, True)).cast("q").tolist()[1::4]
    assert kept == [2, 3, 4]
    # The needle and the regex each keep what they match.
    kept = memoryview(_fastscan.symbol_hits(block, spans, b"SET", regex)).cast("q").tolist()[1::4]
    assert kept == [0, 1, 2, 3]
    # A guard the symbol lacks keeps the regex from trying it (non-ASCII names pass any
    # guard; `Widget::set_size` holds `get` but not `get_`).
    anywhere = _fastscan.regex_compile(b"(?m)(?:_size)", True, False)
    guarded = _fastscan.symbol_hits(block, spans, None, anywhere, False, b"GET_")
    assert memoryview(guarded).cast("q").tolist()[1::4] == [0, 2]
    with pytest.raises(TypeError, match="bytes or None"):
        _fastscan.symbol_hits(block, spans, None, regex, False, "get")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes or None"):
        _fastscan.symbol_hits(block, spans, "get")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _fastscan.symbol_hits(block, spans, None, object())


@pytest.mark.parametrize(
    ("data", "spans", "needle", "message"),
    [
        (_block(("a", "b", "c", "d"))[:-1], None, b"a", "does not parse"),  # strings cut short
        (_block(("a", "b", "c", "d")) + b"z", None, b"a", "does not parse"),  # a byte too many
        (b"\x00" * 31, None, b"a", "does not parse"),  # shorter than one record
        (_block(("a", "b", "c", "d")), _spans(0, 99), b"a", "outside"),
        (_block(("a", "b", "c", "d")), None, b"a" * 257, "longer than 256"),
    ],
)
def test_symbol_hits_refuses_what_does_not_parse(
    data: bytes, spans: bytes | None, needle: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _fastscan.symbol_hits(data, spans if spans is not None else _spans(0, len(data)), needle)


def test_a_malformed_symbols_block_is_index_corruption(tmp_path: Path) -> None:
    import struct

    from services.search.engine.index.format import DOC_RECORD_SIZE, HEADER_SIZE

    index = _index(tmp_path / "idx", _documents(["alpha"]))
    with index.snapshot() as snap:
        seg_dir = snap.segments[0].data.path
        ordinal = next(o for o in snap.segments[0].live if snap.segments[0].symbols(o))
    raw = bytearray((seg_dir / "docs.bin").read_bytes())
    (length,) = struct.unpack_from("<I", raw, HEADER_SIZE + DOC_RECORD_SIZE * ordinal + 36)
    struct.pack_into("<I", raw, HEADER_SIZE + DOC_RECORD_SIZE * ordinal + 36, length - 1)  # symbols_len
    rewrite_part(seg_dir, "docs.bin", bytes(raw))
    with pytest.raises(IndexCorruptError, match="malformed symbols: a symbols block does not parse"):
        Searcher(Index.open(tmp_path / "idx")).symbols("alpha")
