"""The first page's native screen: candidates that cannot match skip their Python verification.

Screening changes how much work a search does, never what it answers: every search here runs
with the screen and with it disabled and the results must be equal, field by field.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.search.engine.index.index import Index
from services.search.engine.model import SourceDocument
from services.search.engine.search import searchrun
from services.search.engine.search.results import SearchMode, SearchResult
from services.search.engine.search.searcher import Searcher
from tests.engine.segments import build_segments


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    """sparse holds 1,500 files over three segments; a few dozen hold a long upper-case run."""

    def document(i: int) -> SourceDocument:
        folder = ("src", "tests", "vendor/x")[i % 3]
        body = f'int value_{i} = {i};\nconst char *name = "file {i}";\n'
        if i % 37 == 0:
            body += f'#define KEY_{i} "ABCDEFGHIJKLMNOPQRSTUVWXYZ"\n' * (1 + i % 3)
        if i % 101 == 0:
            body += "ABCDEFGHIJKLMNOPQRS\n"  # one short of a match
        return SourceDocument(f"d{i}", f"{folder}/f{i:04d}.c", body.encode(), "r", "c")

    index = build_segments(tmp_path_factory.mktemp("screen") / "idx", 3, 500, document)
    with index:
        yield index


def _fields(result: SearchResult) -> tuple[object, ...]:
    return (
        result.files,
        result.file_count,
        result.match_count,
        result.limit_hit,
        result.limit_reason,
        result.stats.files_verified,
    )


def _both(monkeypatch: pytest.MonkeyPatch, index: Index, **request: object) -> tuple[SearchResult, int, int]:
    """_both runs one search with the screen and without; returns the result and _check calls of each."""
    calls = [0]
    original = searchrun.Run._check

    def counted(self: searchrun.Run, seg_index: int, ordinal: int) -> object:
        calls[0] += 1
        return original(self, seg_index, ordinal)

    monkeypatch.setattr(searchrun.Run, "_check", counted)
    screened = Searcher(index).search(**request)  # type: ignore[arg-type]
    with_screen = calls[0]
    calls[0] = 0
    monkeypatch.setattr(searchrun, "SCREEN_AFTER", 10**9)
    plain = Searcher(index).search(**request)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert _fields(screened) == _fields(plain)
    return screened, with_screen, calls[0]


@pytest.mark.parametrize("mode", [SearchMode.FIRST_PAGE, SearchMode.EXHAUSTIVE])
@pytest.mark.parametrize("limit_files", [5, 20, None])
def test_a_sparse_scan_is_screened_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch, sparse: Index, mode: SearchMode, limit_files: int | None
) -> None:
    if mode is SearchMode.FIRST_PAGE and limit_files is None:
        return
    result, screened, plain = _both(
        monkeypatch, sparse, query="/[A-Z]{20,}/", mode=mode, limit_files=limit_files, context_lines=1
    )
    assert result.file_count > 0
    if mode is SearchMode.EXHAUSTIVE:
        assert result.file_count == len(range(0, 1500, 37)) and result.stats.files_verified == 1500
        # Only the matching files (and the first few hundred) went through Python.
        assert screened < plain == 1500


def test_a_query_whose_candidates_mostly_match_is_not_screened(
    monkeypatch: pytest.MonkeyPatch, sparse: Index
) -> None:
    _, screened, plain = _both(
        monkeypatch, sparse, query="value_", mode=SearchMode.EXHAUSTIVE, limit_files=None
    )
    assert screened == plain == 1500


@pytest.mark.parametrize(
    "query", ["/ABCDEFGHIJKLMNOPQRS/", '/(?i)key_\\d+ "abc/', "/[A-Z]{19}\\n?$/", "KEY_"]
)
def test_other_one_term_queries_agree(monkeypatch: pytest.MonkeyPatch, sparse: Index, query: str) -> None:
    for mode, limit in ((SearchMode.FIRST_PAGE, 10), (SearchMode.EXHAUSTIVE, None)):
        _both(monkeypatch, sparse, query=query, mode=mode, limit_files=limit)
