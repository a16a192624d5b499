"""Differential test: our index answers exactly what ripgrep answers on the CPython stdlib.

The corpus is `corpus.sh stdlib` (the real standard library of the interpreter that runs the
script), indexed once per session with the same code path as `kotadb index build`. For every
pattern of the shared query file, and for hypothesis-generated literals and regexes, the set
of (path, line) pairs our exhaustive search returns must equal ripgrep's on the same files,
minus the files the index reports as skipped (ripgrep is run with flags that make it search
what the index walker sees; see services/bench/ripgrep.py for why each flag is there). One
run goes through the real `kotadb index search --regex --all --json` subprocess.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import re2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.bench.ripgrep import search_lines
from services.search.engine.index.build import build_index, walk_sources
from services.search.engine.index.index import Index
from services.search.engine.search.results import SearchMode
from services.search.engine.search.searcher import Searcher

REPO = Path(__file__).resolve().parents[2]
CORPUS_SCRIPT = REPO / "scripts" / "corpus.sh"
QUERIES = REPO / "services" / "bench" / "queries" / "stdlib.txt"
CLI_FLAGS = ("--regex", "--all", "--json")


class Corpus:
    """Corpus is the indexed stdlib tree with what the index refused.

    A plain class, not a dataclass: hypothesis pretty-prints dataclass fields when it
    describes a strategy, and `lines` runs to thousands of entries.
    """

    def __init__(
        self,
        root: Path,
        index_dir: Path,
        index: Index,
        searcher: Searcher,
        skipped: frozenset[str],
        indexed: frozenset[str],
        lines: list[tuple[str, str]],
        tokens: list[str],
    ) -> None:
        self.root = root
        self.index_dir = index_dir
        self.index = index
        self.searcher = searcher
        self.skipped = skipped
        self.indexed = indexed
        self.lines = lines  # a sample of (path, line text) to draw literals from
        self.tokens = tokens  # identifiers seen in the sample, to build regexes from

    def __repr__(self) -> str:
        return f"Corpus({self.root})"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    base = tmp_path_factory.mktemp("differential")
    out = subprocess.run(
        ["bash", str(CORPUS_SCRIPT), "stdlib", str(base)], check=True, capture_output=True, text=True
    )
    root = Path(out.stdout.strip().splitlines()[-1])
    index_dir = base / "index"
    report = build_index(root, index_dir)
    skipped = frozenset(s.path for s in report.skipped)
    all_paths = frozenset(s.path for s in walk_sources(root))
    indexed = all_paths - skipped
    # Every file is either indexed or reported skipped, with a reason.
    assert len(indexed) == report.indexed and skipped <= all_paths
    rng = random.Random(20240601)
    sample_paths = sorted(p for p in indexed if p.endswith(".py"))
    lines: list[tuple[str, str]] = []
    for path in rng.sample(sample_paths, 60):
        text = (root / path).read_text("utf-8")
        for line in text.splitlines():
            if len(line.strip()) >= 8:
                lines.append((path, line))
    tokens = sorted({t for _, line in lines for t in re2.findall(r"[A-Za-z_][A-Za-z0-9_]{3,15}", line)})
    index = Index.open(index_dir)
    try:
        yield Corpus(root, index_dir, index, Searcher(index), skipped, indexed, lines, tokens)
    finally:
        index.close()


def ours(corpus: Corpus, pattern: str) -> set[tuple[str, int]]:
    result = corpus.searcher.search(
        pattern, regex=True, mode=SearchMode.EXHAUSTIVE, limit_files=None, with_symbols=False
    )
    assert not result.limit_hit
    found = {(f.path, m.line_number) for f in result.files for m in f.line_matches}
    assert len(found) == result.match_count
    assert len({f.path for f in result.files}) == result.file_count
    return found


def truth(corpus: Corpus, pattern: str) -> set[tuple[str, int]]:
    lines = search_lines(pattern, corpus.root).lines
    # Files ripgrep searched that the index neither holds nor reported would be a silent drop.
    unknown = {path for path, _ in lines} - corpus.indexed - corpus.skipped
    assert not unknown, f"ripgrep matched files the index never saw: {sorted(unknown)[:5]}"
    return {(path, line) for path, line in lines if path not in corpus.skipped}


def assert_same(corpus: Corpus, pattern: str) -> None:
    expected = truth(corpus, pattern)
    got = ours(corpus, pattern)
    missing = sorted(expected - got)[:10]
    extra = sorted(got - expected)[:10]
    assert got == expected, f"{pattern!r}: missing {missing} extra {extra}"


def _bench_patterns() -> list[str]:
    return [line for line in QUERIES.read_text("utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("pattern", _bench_patterns())
def test_bench_queries_match_ripgrep(corpus: Corpus, pattern: str) -> None:
    assert_same(corpus, pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        r"^\s*$",  # blank lines: a scan that matches the empty string
        r"\r$",  # CRLF line endings keep \r in the line on both sides
        r"^import (os|sys)$",
        r"[\x{80}-\x{10FFFF}]+",  # non-ASCII text
        r"(?i)utf-?8",
        r"\d{4}-\d{2}-\d{2}",
        r"ab",  # too short for a trigram: bounded scan
        # No literal, but a rare run of bytes: RE2 reads only the lines holding one (class_run).
        r"[A-Z_]{16,}",
        r"[0-9a-f]{16}",
        r"\w+\d{5}",
        r"\b[0-9]{6,}\b",
        r"(?i)[A-F0-9]{12}",
        r"=[A-Z]{5}$",
    ],
)
def test_edge_patterns_match_ripgrep(corpus: Corpus, pattern: str) -> None:
    assert_same(corpus, pattern)


def test_cli_subprocess_matches_ripgrep(corpus: Corpus) -> None:
    pattern = r"def \w+_unicode\b"
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "index", "search", str(corpus.index_dir), pattern, *CLI_FLAGS],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    # ripgrep's --json records: begin/match/end per file, one summary at the end.
    assert records and records[-1]["type"] == "summary"
    matches = [r["data"] for r in records if r["type"] == "match"]
    assert {r["type"] for r in records} <= {"begin", "match", "end", "summary"}
    assert {(m["path"]["text"], m["line_number"]) for m in matches} == truth(corpus, pattern)
    for m in matches:
        line = (corpus.root / m["path"]["text"]).read_bytes().split(b"\n")[m["line_number"] - 1]
        assert m["lines"]["text"].rstrip("\n") == line.decode()
        assert m["submatches"]
        for sub in m["submatches"]:
            assert re2.search(pattern.encode(), line[sub["start"] : sub["end"]])
            assert line[sub["start"] : sub["end"]].decode() == sub["match"]["text"]


@st.composite
def literals(draw: st.DrawFn, corpus: Corpus) -> str:
    # Indices, not sampled_from(lines): hypothesis would repr the whole list on every draw.
    _, line = corpus.lines[draw(st.integers(0, len(corpus.lines) - 1))]
    line = line.strip()
    start = draw(st.integers(0, max(0, len(line) - 3)))
    length = draw(st.integers(3, 24))
    text = line[start : start + length]
    # Runs of indentation or punctuation match most lines of the corpus; comparing half a
    # million lines proves little more than comparing a thousand and costs seconds.
    assume(re2.search(r"\w{3}", text) is not None)
    fold = draw(st.booleans())
    return ("(?i)" if fold else "") + str(re2.escape(text))


@st.composite
def regexes(draw: st.DrawFn, corpus: Corpus) -> str:
    token = corpus.tokens[draw(st.integers(0, len(corpus.tokens) - 1))]
    # Pieces around a required token keep every pattern selective enough to compare cheaply.
    piece = st.sampled_from(
        [
            r"\w+",
            r"\w*",
            r"\s+",
            r"\s*",
            r"\d",
            r"[a-z]+",
            r"[A-Z_]",
            r".",
            r".*",
            r"\(",
            r"\.",
            r"[^ ]+",
            r"\W",
            # Runs of a class: with an alternation for core there is no required literal,
            # and these become the run RE2's lines are chosen by (class_run).
            r"[0-9]{6}",
            r"[A-Z_]{8,}",
            r"[0-9a-f]{12}",
        ]
    )
    before = draw(st.lists(piece, max_size=2))
    after = draw(st.lists(piece, max_size=2))
    core = str(re2.escape(token))
    if draw(st.booleans()):
        other = corpus.tokens[draw(st.integers(0, len(corpus.tokens) - 1))]
        core = f"(?:{core}|{re2.escape(other)!s})"
    pattern = "".join(before) + core + "".join(after)
    if draw(st.booleans()):
        pattern = r"\b" + pattern
    if draw(st.integers(0, 4)) == 0:
        pattern = "^" + r"\s*" + pattern
    if draw(st.integers(0, 4)) == 0:
        pattern += "$"
    if draw(st.integers(0, 3)) == 0:
        pattern = "(?i)" + pattern
    return pattern


_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(data=st.data())
def test_generated_literals_match_ripgrep(corpus: Corpus, data: st.DataObject) -> None:
    assert_same(corpus, data.draw(literals(corpus)))


@_SETTINGS
@given(data=st.data())
def test_generated_regexes_match_ripgrep(corpus: Corpus, data: st.DataObject) -> None:
    assert_same(corpus, data.draw(regexes(corpus)))
