"""MatchStream (stream.py): every match in index order, equal to the ranked exhaustive search.

The stream is what `kotadb index search --all` and `--count` print; it must agree exactly with
the ranked search (which the ripgrep differential tests pin) on every file, line and range.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.search.engine import _fastscan
from services.search.engine.errors import SearchCancelled
from services.search.engine.index.build import build_index
from services.search.engine.index.format import IndexCorruptError
from services.search.engine.index.index import Index
from services.search.engine.query.verify import LineMatcher
from services.search.engine.search import stream
from services.search.engine.search.results import LimitReason, SearchMode
from services.search.engine.search.searcher import Searcher
from tests.engine.segments import build_segments

GOLDEN_CORPUS = Path(__file__).parent / "goldens" / "corpus"

# Every strategy of verify.LineMatcher, and query-language trees the stream evaluates whole.
QUERIES = [
    ("Parser", True),  # literal
    ("(?i)parser", True),  # folded literal
    (r"def \w+\(", True),  # regex starting with a literal (screened)
    (r"\bParse\w*\b", True),  # prefiltered regex
    (r"^\s*$", True),  # regex without a literal
    ("parser lang:python", False),  # a tree with a metadata term
    ('"self.text" or config', False),
    ("type:path parser", False),  # path-only matches: files without lines
]


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Searcher]:
    out = tmp_path_factory.mktemp("stream") / "index"
    build_index(GOLDEN_CORPUS, out, workers=1, symbols=False)
    with Index.open(out) as index:
        yield Searcher(index)


def _unpack(groups: bytes) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    values = memoryview(groups).cast("q").tolist()
    out = []
    at = 0
    while at < len(values):
        number, _, _, count = values[at : at + 4]
        pairs = values[at + 4 : at + 4 + 2 * count]
        out.append((number, tuple(zip(pairs[::2], pairs[1::2], strict=True))))
        at += 4 + 2 * count
    return out


@pytest.mark.parametrize(("query", "regex"), QUERIES)
def test_stream_equals_the_ranked_exhaustive_search(searcher: Searcher, query: str, regex: bool) -> None:
    ranked = searcher.search(
        query, regex=regex, mode=SearchMode.EXHAUSTIVE, limit_files=None, with_symbols=False
    )
    expected = {
        f.path: [(line.line_number, tuple((r.start, r.end) for r in line.ranges)) for line in f.line_matches]
        for f in ranked.files
    }
    with searcher.stream(query, regex=regex) as found:
        files = list(found)
    assert {f.path: _unpack(f.groups) for f in files} == expected
    assert [f.path for f in files] == sorted(f.path for f in files)  # index order
    assert (found.file_count, found.match_count) == (ranked.file_count, ranked.match_count)
    assert found.candidates == ranked.stats.candidates == found.verified
    with searcher.stream(query, regex=regex, lines=False) as counted:
        counts = {f.path: f.line_count for f in counted}
    assert counts == {path: len(lines) for path, lines in expected.items()}
    assert (counted.file_count, counted.match_count) == (ranked.file_count, ranked.match_count)


def test_ranges_of_candidates_concatenate_to_the_whole_stream(searcher: Searcher) -> None:
    with searcher.stream("Parser", regex=True) as found:
        whole = [(f.path, f.groups) for f in found]
        total = found.candidates
    for cut in range(total + 1):
        with searcher.stream("Parser", regex=True) as found:
            parts = [
                (f.path, f.groups) for f in itertools.chain(found.files(0, cut), found.files(cut, total))
            ]
        assert parts == whole


def test_rendered_stream_lines_are_the_files_lines(searcher: Searcher) -> None:
    with searcher.stream(r"Pars(er|e)\b", regex=True) as found:
        for file in found:
            rendered = _fastscan.render_lines(file.content, file.groups, file.path.encode(), False, 0)
            lines = bytes(file.content).split(b"\n")
            for row in rendered.decode().split("\n")[:-1]:  # not splitlines: a line may end in \r
                path, number, text = row.split(":", 2)
                assert path == file.path and lines[int(number) - 1].decode() == text


def test_deadline_and_cancel_stop_a_stream(searcher: Searcher) -> None:
    ticks = itertools.count()
    timed = Searcher(searcher.index, clock=lambda: float(next(ticks)))
    with timed.stream(r"\w", regex=True, deadline=3.0) as found:
        files = list(found)
    assert found.limit_reason is LimitReason.DEADLINE and found.verified == 2 < found.candidates
    assert len(files) == found.file_count <= 2
    cancel = threading.Event()
    with searcher.stream(r"\w", regex=True, cancel=cancel) as found:
        stream = iter(found)
        next(stream)
        cancel.set()
        with pytest.raises(SearchCancelled):
            next(stream)


@pytest.mark.parametrize(("query", "regex"), QUERIES)
def test_counts_are_the_counted_files(searcher: Searcher, query: str, regex: bool) -> None:
    with searcher.stream(query, regex=regex, lines=False) as found:
        files = [(f.path, f.line_count) for f in found]
    with searcher.stream(query, regex=regex, lines=False) as counted:
        total = counted.candidates
        cut = total // 3
        pairs = [*counted.counts(0, cut), *counted.counts(cut, total)]
    assert pairs == files
    assert (counted.file_count, counted.match_count, counted.verified) == (
        found.file_count,
        found.match_count,
        total,
    )


def test_a_corrupt_content_block_stops_a_count_where_it_lies(tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_index(GOLDEN_CORPUS, out, workers=1, symbols=False)
    with Index.open(out) as index, Searcher(index).stream(r"\w", regex=True, lines=False) as found:
        files = list(found)
        victim = files[len(files) // 2]
        segment = found.snap.segments[victim.segment]
        start, _ = memoryview(segment.content_spans([victim.ordinal])).cast("q")
    content = out / segment.name / "content.bin"
    raw = bytearray(content.read_bytes())
    raw[start] ^= 0x20
    content.write_bytes(bytes(raw))
    expected: list[str] = []
    with (
        Index.open(out) as index,
        Searcher(index).stream(r"\w", regex=True) as lines,  # file by file
        pytest.raises(IndexCorruptError),
    ):
        expected.extend(f.path for f in lines)
    for count in (False, True):
        yielded: list[str] = []
        with (
            Index.open(out) as index,
            Searcher(index).stream(r"\w", regex=True, lines=False) as counted,
            pytest.raises(IndexCorruptError, match="checksum mismatch"),
        ):
            if count:
                yielded.extend(path for path, _ in counted.counts(0, counted.candidates))
            else:
                yielded.extend(f.path for f in counted)
        assert yielded == expected and victim.path not in yielded


def test_middle_cuts_a_count_by_content_bytes(searcher: Searcher) -> None:
    with searcher.stream(r"\w", regex=True, lines=False) as found:
        total = found.candidates
        middle = found.middle()
        whole = list(found.counts(0, total))
    with searcher.stream(r"\w", regex=True, lines=False) as files:
        sizes = [len(f.content) for f in files]
    assert 0 < middle <= total and len(sizes) == total  # every file has a word
    cost = [size + stream.MIDDLE_COST for size in sizes]
    assert sum(cost[: middle - 1]) < sum(cost) / 2 <= sum(cost[:middle])
    with searcher.stream(r"\w", regex=True, lines=False) as again:
        assert [*again.counts(0, middle), *again.counts(middle, total)] == whole
    with searcher.stream(r"\w", regex=True) as lines:  # not a count: half the candidates
        assert lines.middle() == lines.candidates // 2


def test_a_stream_told_to_count_midway_counts_the_rest_in_batches(
    searcher: Searcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    with searcher.stream("(?i)parser", regex=True) as whole:
        expected = [(f.path, f.line_count) for f in whole]
    assert len(expected) > 2

    def one_at_a_time(self: LineMatcher, content: bytes) -> int:
        raise AssertionError("counted file by file")

    monkeypatch.setattr(LineMatcher, "count", one_at_a_time)
    with searcher.stream("(?i)parser", regex=True) as found:
        files = iter(found)
        head = next(files)
        assert head.groups  # lines while `lines` is set
        found.lines = False  # as the search service does once it has its page
        rest = list(files)
    assert not any(f.groups for f in rest)
    assert [(f.path, f.line_count) for f in [head, *rest]] == expected
    assert (found.verified, found.file_count) == (found.candidates, len(expected))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Searcher]:
    """wide holds 700 files over two segments, more candidates than one batch of a stream."""
    from services.search.engine.model import SourceDocument

    def document(i: int) -> SourceDocument:
        body = f"line one {i}\n" + ("needle here\n" * (i % 4)) + f"tail {i} Needle\n"
        return SourceDocument(f"d{i}", f"f{i:04d}.txt", body.encode())

    index = build_segments(tmp_path_factory.mktemp("wide") / "idx", 2, 350, document)
    with index:
        yield Searcher(index)


def _rows(files: list[stream.StreamedFile]) -> list[tuple[object, ...]]:
    return [(f.path, f.line_count, f.match_count, bytes(f.groups), bytes(f.content)) for f in files]


@pytest.mark.parametrize("query", ["needle", "(?i)needle", r"needle \w+", r"[0-9]{3}"])
def test_batched_lines_equal_file_by_file_lines(
    wide: Searcher, query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with wide.stream(query, regex=True) as batched:
        got = list(batched)
        counters = (batched.verified, batched.file_count, batched.match_count)
    assert len(got) > stream.COUNT_BATCH  # several batches, over both segments
    monkeypatch.setattr(
        stream.MatchStream, "_grouped", lambda self, sole, a, b: self._each(a, b, handover=True)
    )
    with wide.stream(query, regex=True) as each:
        assert _rows(got) == _rows(list(each))
        assert counters == (each.verified, each.file_count, each.match_count)


def _tick(ticks: Iterator[int]) -> float:
    return float(next(ticks))


def test_batched_lines_told_to_count_midway_and_stopped_by_a_deadline(
    wide: Searcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    with wide.stream("needle", regex=True) as whole:
        expected = [(f.path, f.line_count) for f in whole]
    with wide.stream("needle", regex=True) as found:
        files = iter(found)
        head = [next(files) for _ in range(200)]  # into the second batch
        assert all(f.groups for f in head) and found.verified < found.candidates
        found.lines = False
        rest = list(files)
    assert rest and not any(f.groups for f in rest)
    assert [(f.path, f.line_count) for f in [*head, *rest]] == expected
    assert (found.verified, found.file_count) == (found.candidates, len(expected))
    # A deadline in the second batch stops where the file-by-file stream stops.
    results = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(
                stream.MatchStream, "_grouped", lambda self, sole, a, b: self._each(a, b, handover=True)
            )
        timed = Searcher(wide.index, clock=functools.partial(_tick, itertools.count()))
        with timed.stream("needle", regex=True, deadline=300.0) as stopped:
            seen = [f.path for f in stopped]
        assert stopped.limit_reason is LimitReason.DEADLINE
        results.append((seen, stopped.verified, stopped.file_count))
    assert results[0] == results[1]
    assert stream.COUNT_BATCH < results[0][1] < len(expected)
