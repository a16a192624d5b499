"""The ripgrep side of the differential test: RE2 patterns must mean the same to ripgrep.

Each pattern runs through RE2 line by line and through real ripgrep (translated by
services/bench/ripgrep.py) over a file of crafted lines where Unicode and ASCII semantics
differ; the sets of matching line numbers must be equal. Also covers the pg_trgm pattern
translation and the benchmark's percentile arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import re2

from services.bench.measure import percentile, run_process, summarize
from services.bench.pgtrgm import UnsupportedPattern
from services.bench.pgtrgm import translate_pattern as to_postgres
from services.bench.ripgrep import UntranslatablePattern, search_lines, translate_pattern

LINES = [
    "plain ascii words_here 42",
    "caf\u00e9 na\u00efve \u00fcber",  # non-ASCII letters: \w in ripgrep, not in RE2
    "\u0661\u0662\u0663 arabic-indic digits",  # \d in ripgrep's Unicode mode only
    "tab\there and\u00a0nbsp",  # NBSP: \s in ripgrep's Unicode mode only
    'quote "q" and back\\slash',
    "a\u00e9b",
    "x]y [z] a-b a--b a&&b",
    "vertical\x0btab",
    "trailing cr\r",
    "",
    "UPPER lower MiXeD",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rg")
    (root / "lines.txt").write_bytes("\n".join(LINES).encode() + b"\n")
    return root


def re2_lines(pattern: str) -> set[int]:
    regex = re2.compile(pattern.encode())
    return {n for n, line in enumerate(LINES, 1) if regex.search(line.encode()) is not None}


@pytest.mark.parametrize(
    "pattern",
    [
        r"\w+\s\w+",
        r"^\w+$",
        r"caf\w",
        r"\W\w",
        r"a\Wb",
        r"\d",
        r"\D{3}",
        r"[\d]",
        r"\s",
        r"and\S",
        r"\bna",
        r"\Bb\b",
        r'"q"',
        r"\"q\"",
        r"back\\slash",
        r"\]y",
        r"[\]]",
        r"[[]z",
        r"a--b",
        r"[a-]--",
        r"a&&b",
        r"[&][&]",
        r"cr$",
        r"cr\r$",
        r"^$",
        r"(?i)upper",
        "(?i)caf\u00c9",
        r"[^a-z ]",
        r"\x{e9}",
        r"\pL+\s\pL+",
        r"vertical\stab",
    ],
)
def test_ripgrep_agrees_with_re2_line_by_line(sample: Path, pattern: str) -> None:
    found = search_lines(pattern, sample).lines
    assert {line for _, line in found} == re2_lines(pattern), translate_pattern(pattern)


@pytest.mark.parametrize("pattern", [r"[\W]", r"[^\S]", r"[\b]"])
def test_negated_classes_inside_brackets_are_refused(pattern: str) -> None:
    with pytest.raises(UntranslatablePattern):
        translate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"\bkzalloc\b.*GFP_ATOMIC", r"(?n)\ykzalloc\y.*GFP_ATOMIC"),
        (r"(?i)fixme", r"(?ni)fixme"),
        (r"(?s)a.b", r"(?n)a.b"),
        (r"a\Bb", r"(?n)a\Yb"),
        (r"(?:x|y)z", r"(?n)(?:x|y)z"),
    ],
)
def test_postgres_translation(pattern: str, expected: str) -> None:
    assert to_postgres(pattern) == expected


@pytest.mark.parametrize("pattern", [r"a(?i)b", r"(?U)a+", r"(?i:a)b"])
def test_postgres_refuses_what_it_cannot_express(pattern: str) -> None:
    with pytest.raises(UnsupportedPattern):
        to_postgres(pattern)


def test_percentiles_are_nearest_rank() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 0.5) == 3.0
    assert percentile(samples, 0.99) == 5.0
    assert percentile(samples, 0.0) == 1.0
    summary = summarize(samples)
    assert (summary.min, summary.p50, summary.p99, summary.max, summary.runs) == (1.0, 3.0, 5.0, 5.0, 5)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_run_process_reports_peak_rss_of_the_child_only() -> None:
    small = run_process(["python3", "-c", "print('x')"], measure_rss=True)
    big = run_process(["python3", "-c", "b = bytearray(200 << 20); print(len(b))"], measure_rss=True)
    assert small.output_lines == 1 and big.output == b""
    assert 0 < small.peak_rss_bytes < 100 << 20
    assert big.peak_rss_bytes >= 200 << 20
