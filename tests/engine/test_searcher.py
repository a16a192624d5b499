"""Searcher behaviour on real indexes: ranking goldens, pagination, limits, deadlines, filters."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.search.engine.index.build import build_index
from services.search.engine.index.index import Index
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument
from services.search.engine.query.query import QuerySyntaxError
from services.search.engine.query.verify import InvalidPatternError
from services.search.engine.search.cursor import CursorError
from services.search.engine.search.results import LimitReason, SearchMode, SearchResult
from services.search.engine.search.searcher import SearchCancelled, Searcher

GOLDENS = Path(__file__).parent / "goldens"
GOLDEN_CORPUS = GOLDENS / "corpus"
RANKING = json.loads((GOLDENS / "ranking.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def golden_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    out = tmp_path_factory.mktemp("golden") / "index"
    report = build_index(GOLDEN_CORPUS, out, repository="kota/goldens", workers=1)
    assert report.indexed == 9 and not report.skipped
    with Index.open(out) as index:
        yield index


def _write_many(root: Path) -> None:
    """_write_many lays out 90 files mentioning `needle` in ways that rank differently."""
    for i in range(90):
        folder = ("src", "tests", "vendor/dep", "lib")[i % 4]
        kind = i % 3
        if kind == 0:
            body = f"def needle_{i}():\n    return {i}\n\n\ndef needle():\n    pass\n"
        elif kind == 1:
            body = f"value = needle({i})\n# the needle again\nx = {i}\n"
        else:
            body = f"haystackneedles = {i}\n"
        name = f"test_mod{i:03d}.py" if folder == "tests" else f"mod{i:03d}.py"
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(body, "utf-8")


@pytest.fixture
def many(tmp_path: Path) -> Iterator[tuple[Path, Index]]:
    src = tmp_path / "src"
    _write_many(src)
    out = tmp_path / "index"
    build_index(src, out, workers=1)
    with Index.open(out) as index:
        yield out, index


def test_build_segment_size_sets_the_segment_count_not_the_results(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_many(src)
    small, large = tmp_path / "small", tmp_path / "large"
    build_index(src, small, workers=1, symbols=False, segment_bytes=600)
    build_index(src, large, workers=1, symbols=False)
    with Index.open(small) as many_segments, Index.open(large) as one_segment:
        # 90 files of ~30-60 bytes: a 600-byte flush makes a segment of every dozen or so.
        assert len(many_segments.manifest.segments) > 3
        assert len(one_segment.manifest.segments) == 1
        for query in ("needle", "def needle", "haystack"):
            split = Searcher(many_segments).search(query, mode=SearchMode.EXHAUSTIVE, limit_files=None)
            whole = Searcher(one_segment).search(query, mode=SearchMode.EXHAUSTIVE, limit_files=None)
            assert _rows(split) == _rows(whole) and split.match_count == whole.match_count > 0
    with pytest.raises(ValueError, match="segment_bytes"):
        build_index(src, tmp_path / "none", workers=1, symbols=False, segment_bytes=0)


def _rows(result: SearchResult) -> list[tuple[str, float]]:
    return [(f.path, f.score) for f in result.files]


@pytest.mark.parametrize("query", [q for q in RANKING if not q.startswith("_")])
def test_ranking_goldens(golden_index: Index, query: str) -> None:
    result = Searcher(golden_index).search(query, mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert _rows(result) == [(path, score) for path, score in RANKING[query]]
    assert result.file_count == len(RANKING[query]) and not result.limit_hit


def _all_pages(searcher: Searcher, query: str, page: int, mode: SearchMode) -> list[SearchResult]:
    pages = [searcher.search(query, limit_files=page, mode=mode)]
    while pages[-1].next_cursor is not None:
        assert len(pages) < 100, "cursor did not terminate"
        pages.append(searcher.search(query, limit_files=page, mode=mode, cursor=pages[-1].next_cursor))
    return pages


def test_exhaustive_pages_concatenate_to_the_full_result(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index)
    full = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert full.file_count == 90 and full.next_cursor is None
    pages = _all_pages(searcher, "needle", 7, SearchMode.EXHAUSTIVE)
    assert len(pages) == 13
    assert all(len(p.files) == 7 for p in pages[:-1]) and len(pages[-1].files) == 90 - 12 * 7
    assert [row for p in pages for row in _rows(p)] == _rows(full)
    # Totals stay true on every page.
    assert {p.file_count for p in pages} == {90}
    assert {p.match_count for p in pages} == {full.match_count}


def test_first_page_stops_early_and_cursor_pages_cover_the_rest_once(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index)
    full = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    first = searcher.search("needle", mode=SearchMode.FIRST_PAGE, limit_files=5)
    assert first.limit_hit and first.limit_reason is LimitReason.FILE_LIMIT
    assert first.stats.files_verified < first.stats.candidates == 90
    assert len(first.files) == 5 and first.next_cursor is not None
    # Ordinary files are verified first, so the page holds no test or vendored file.
    assert all(f.path.startswith(("src/", "lib/")) for f in first.files)
    pages = [first]
    while pages[-1].next_cursor is not None:
        pages.append(searcher.search("needle", limit_files=5, cursor=pages[-1].next_cursor))
    seen = [path for p in pages for path, _ in _rows(p)]
    assert len(seen) == len(set(seen)) == 90
    assert set(seen) == {f.path for f in full.files}
    # Pages after the first are exact: together they follow the full order minus page one.
    shown = {f.path for f in first.files}
    assert [row for p in pages[1:] for row in _rows(p)] == [r for r in _rows(full) if r[0] not in shown]


def test_cursor_from_another_generation_is_rejected(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index)
    page = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=10)
    assert page.next_cursor is not None
    with IndexWriter(index) as writer:
        writer.add(SourceDocument("extra", "extra.py", b"needle = 1\n", language="python"))
        writer.commit()
    with pytest.raises(CursorError) as info:
        searcher.search("needle", limit_files=10, cursor=page.next_cursor)
    assert info.value.reason == "stale_generation"
    fresh = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert fresh.file_count == 91 and fresh.generation > page.generation


def test_cursor_for_another_query_or_tampered_is_rejected(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index)
    page = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=10)
    assert page.next_cursor is not None
    with pytest.raises(CursorError) as info:
        searcher.search("haystack", cursor=page.next_cursor)
    assert info.value.reason == "query_mismatch"
    with pytest.raises(CursorError):
        searcher.search("needle", cursor=page.next_cursor[:-3] + "AAA")
    keyed = Searcher(index, cursor_key=b"secret")
    with pytest.raises(CursorError) as info:
        keyed.search("needle", cursor=page.next_cursor)
    assert info.value.reason == "tampered"


def test_deadline_mid_search_returns_a_marked_partial_result(many: tuple[Path, Index]) -> None:
    _, index = many
    ticks = itertools.count()
    # Each deadline check advances this clock by one; the deadline passes at the 6th check
    # (the first is the searcher's own, before any work).
    searcher = Searcher(index, clock=lambda: float(next(ticks)))
    result = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None, deadline=5.0)
    assert result.limit_hit and result.limit_reason is LimitReason.DEADLINE
    assert result.stats.files_verified == 4 < result.stats.candidates
    assert result.file_count <= 5 and len(result.files) == result.file_count


def test_worker_processes_and_one_process_agree(many: tuple[Path, Index]) -> None:
    _, index = many
    one = Searcher(index).search("/needle\\w*/", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    split = Searcher(index, processes=2, process_min=1)
    try:
        both = split.search("/needle\\w*/", mode=SearchMode.EXHAUSTIVE, limit_files=None)
        page = split.search("/needle\\w*/", mode=SearchMode.EXHAUSTIVE, limit_files=7, context_lines=1)
    finally:
        split.close()
    assert one.stats.files_verified == both.stats.files_verified == 90
    assert (one.files, one.file_count, one.match_count) == (both.files, both.file_count, both.match_count)
    assert [f.path for f in page.files] == [f.path for f in one.files[:7]]
    assert all(
        line.symbol is not None for f in page.files for line in f.line_matches if f.path.endswith("0.py")
    )


def test_match_limit_stops_counting(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index)
    full = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    limited = searcher.search("needle", mode=SearchMode.EXHAUSTIVE, limit_files=None, limit_matches=20)
    assert limited.limit_hit and limited.limit_reason is LimitReason.MATCH_LIMIT
    assert 20 <= limited.match_count < full.match_count
    assert limited.file_count < full.file_count


def test_cancellation_raises(many: tuple[Path, Index]) -> None:
    _, index = many
    event = threading.Event()
    event.set()
    with pytest.raises(SearchCancelled):
        Searcher(index).search("needle", cancel=event)


def test_filters_and_negation(golden_index: Index) -> None:
    searcher = Searcher(golden_index)

    def paths(query: str) -> list[str]:
        result = searcher.search(query, mode=SearchMode.EXHAUSTIVE, limit_files=None)
        return sorted(f.path for f in result.files)

    assert paths("lang:go parser") == ["src/config.go"]
    assert paths("parser -file:vendor -file:test") == [
        "docs/notes.md",
        "gen/api_pb2.py",
        "src/config.go",
        "src/crlf.txt",
        "src/parser.py",
        "src/reparser.rb",
    ]
    assert paths("parser -reparser") == [
        "gen/api_pb2.py",
        "src/config.go",
        "src/crlf.txt",
        "src/parser.py",
        "tests/test_parser.py",
        "vendor/lib/parser.js",
    ]
    assert paths("repo:kota parser lang:ruby") == ["src/reparser.rb"]
    assert paths("repo:elsewhere parser") == []
    # case:yes: lower-case "reparser" is only in the notes; reparser.rb says "Reparser".
    assert paths("(reparser or ParseConfig) case:yes") == ["docs/notes.md", "src/config.go"]
    assert paths("file:\\.go$ or file:\\.rb$") == ["src/config.go", "src/reparser.rb"]


def test_lines_carry_columns_context_and_enclosing_symbol(golden_index: Index) -> None:
    searcher = Searcher(golden_index)
    result = searcher.search('"self.text = text" file:parser.py', context_lines=1)
    [file] = result.files
    [line] = file.line_matches
    assert (line.line_number, line.text) == (8, "        self.text = text")
    assert [c.line_number for c in line.before] == [7] and line.before[0].text.strip().startswith(
        "def __init__"
    )
    assert [c.line_number for c in line.after] == [9] and line.after[0].text == ""
    assert line.symbol is not None and line.symbol.qualified_name == "Parser.__init__"
    [rng] = line.ranges
    assert (rng.start, rng.end, rng.start_column, rng.end_column) == (8, 24, 9, 25)

    notes = searcher.search("Parser file:notes case:yes").files[0].line_matches[0]
    text = "Unicode: na\u00efve caf\u00e9 Parser \u2014 \u00fcn\u00efcode columns."
    assert notes.text == text
    [rng] = notes.ranges
    assert rng.start == text.encode().index(b"Parser") and rng.end == rng.start + 6
    assert rng.start_column == text.index("Parser") + 1 and rng.end_column == rng.start_column + 6

    # A CRLF file keeps its \r in the line, as grep and ripgrep do: `beta$` does not match it.
    assert searcher.search("/beta$/").file_count == 0
    crlf = searcher.search("/beta\\r$/").files[0].line_matches[0]
    assert (crlf.line_number, crlf.text) == (2, "Parser beta\r")


def test_symbol_and_path_results(golden_index: Index) -> None:
    searcher = Searcher(golden_index)
    symbols = searcher.search("type:symbol Parser case:yes", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    found = {(f.path, s.qualified_name) for f in symbols.files for s in f.symbols}
    assert found == {
        ("src/parser.py", "Parser"),
        ("tests/test_parser.py", "TestParser"),
        ("vendor/lib/parser.js", "Parser"),
    }
    assert all(not f.line_matches for f in symbols.files)
    paths = searcher.search("type:path util", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert [(f.path, f.path_ranges) for f in paths.files] == [("src/parser_util.c", ((11, 15),))]
    ranked = searcher.symbols("parse", limit=10)
    assert ranked.total >= 3
    assert ranked.matches[0].symbol.name == "parse"


def test_scan_fallback_is_flagged_and_still_exact(golden_index: Index) -> None:
    result = Searcher(golden_index).search("/[xz]/", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert result.stats.scan_fallback and result.stats.candidates == 9
    expected = {
        (path.relative_to(GOLDEN_CORPUS).as_posix(), number)
        for path in GOLDEN_CORPUS.rglob("*")
        if path.is_file()
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1)
        if b"x" in line or b"z" in line
    }
    got = {(f.path, m.line_number) for f in result.files for m in f.line_matches}
    assert got == expected and len(got) > 5


def test_bad_queries_raise_typed_errors(golden_index: Index) -> None:
    searcher = Searcher(golden_index)
    with pytest.raises(InvalidPatternError):
        searcher.search("(unclosed", regex=True)
    with pytest.raises(QuerySyntaxError):
        searcher.search("foo (bar")
    with pytest.raises(ValueError):
        searcher.search("foo", limit_files=0)


def test_worker_processes_start_only_for_a_search_large_enough(many: tuple[Path, Index]) -> None:
    _, index = many
    searcher = Searcher(index, processes=2, process_min=1000)
    try:
        small = searcher.search("/needle\\w*/", mode=SearchMode.EXHAUSTIVE, limit_files=None)
        assert small.stats.candidates < 1000 and searcher._process_pool is None
        with searcher.stream("needle") as found:
            assert sum(1 for _ in found) == 90
        assert searcher._process_pool is None  # streams never use the pool
        searcher.process_min = 1
        searcher.search("/needle\\w*/", mode=SearchMode.EXHAUSTIVE, limit_files=None)
        assert searcher._process_pool is not None
    finally:
        searcher.close()
