"""Tests of the C extension `_fastscan` against plain-Python references of the same loops."""

from __future__ import annotations

import pathlib
import re
import subprocess
import threading
from importlib.machinery import EXTENSION_SUFFIXES

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from re2 import _re2

from services.search.engine import _fastscan
from services.search.engine.index import trigrams
from services.search.engine.query import verify
from services.search.engine.query.verify import LineMatch, LineMatcher
from services.search.engine.search import rank
from tests.engine.lines import reference_lines

ALPHABET = st.sampled_from([b"a", b"b", b"A", b"B", b"\n", b" ", b"_", "\u212a".encode(), "\u017f".encode()])


def test_the_native_extension_is_in_use() -> None:
    # No silent fallback: the engine imports the compiled module on this kind of machine.
    assert _fastscan.__file__ is not None
    assert _fastscan.__file__.endswith(tuple(EXTENSION_SUFFIXES))
    assert vars(verify)["_fastscan"] is _fastscan
    assert vars(trigrams)["_fastscan"] is _fastscan


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(ALPHABET, max_size=60).map(b"".join),
    needle=st.lists(st.sampled_from([b"a", b"b", b"_", b" "]), min_size=1, max_size=3).map(b"".join),
    folded=st.booleans(),
)
def test_find_literal_matches_a_line_by_line_reference(data: bytes, needle: bytes, folded: bool) -> None:
    found = _fastscan.find_literal(data, needle, folded, False, -1, LineMatch)
    assert found == reference_lines(data, needle, folded)
    assert all(type(line) is LineMatch for line in found or [])
    limited = _fastscan.find_literal(data, needle, folded, False, 1, LineMatch)
    assert limited == reference_lines(data, needle, folded)[:1]
    lines = _fastscan.needle_lines(memoryview(data), needle, folded, False)
    assert lines == [(m.line_number, m.line_start, m.line_end) for m in reference_lines(data, needle, folded)]


def test_guard_defers_to_re2_when_kelvin_sign_or_long_s_is_present() -> None:
    kelvin = "x \u212aey\n".encode()
    long_s = "\u017fay\n".encode()
    assert _fastscan.find_literal(kelvin, b"key", True, True, -1, LineMatch) is None
    assert _fastscan.needle_lines(long_s, b"say", True, True) is None
    # Without those characters the guarded scan answers itself.
    assert _fastscan.find_literal(b"KEY\n", b"key", True, True, -1, LineMatch) == [
        LineMatch(1, 0, 3, ((0, 3),))
    ]
    # The matcher falls back to RE2, whose (?i) matches KELVIN SIGN to k and LONG S to s.
    assert [m.ranges for m in LineMatcher("key", case_sensitive=False).find(kelvin)] == [((2, 7),)]
    assert [m.line_number for m in LineMatcher("(?i)say", case_sensitive=True).find(long_s)] == [1]


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b"_", b"1", b" ", b"(", b"\n", "\u00e9".encode()]), max_size=30).map(
        b"".join
    ),
    picks=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=4),
)
def test_any_whole_word_agrees_with_rank(data: bytes, picks: list[tuple[int, int]]) -> None:
    lines: list[LineMatch] = []
    start = 0
    for number, line in enumerate(data.split(b"\n"), 1):
        ranges = tuple((s, e) for s, e in picks if s <= e <= len(line))
        if ranges:
            lines.append(LineMatch(number, start, start + len(line), ranges))
        start += len(line) + 1
    expected = any(
        rank.is_whole_word(data[m.line_start : m.line_end], s, e) for m in lines for s, e in m.ranges
    )
    assert _fastscan.any_whole_word(data, lines) is expected


def test_required_literal_screen_keeps_re2_results() -> None:
    # A regex starting with a literal runs RE2 only on the lines holding its longest required
    # literal; the answers must be RE2's either way.
    matcher = LineMatcher(r"struct task \*\w+ = current", case_sensitive=True)
    assert matcher.strategy == "prefilter"
    assert matcher.find(b"struct task *p = other;\nx = current;\n") == []
    content = b"struct task *p = current;\nstruct task *q = current;\n"
    assert [m.line_number for m in matcher.find(content)] == [1, 2]
    # Folded screens defer to RE2 when the document holds KELVIN SIGN (RE2's (?i) k).
    folded = LineMatcher(r"(?i)mark\w+ kelvin", case_sensitive=True)
    assert folded.strategy == "prefilter"
    assert [m.line_number for m in folded.find("MARKs \u212aELVIN\n".encode())] == [1]
    assert folded.find(b"marks celsius\n") == []


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        _fastscan.find_literal(b"abc", b"", False, False, -1, LineMatch)
    with pytest.raises(ValueError):
        _fastscan.needle_lines(b"abc", b"a\nb", False, False)
    with pytest.raises(TypeError):
        _fastscan.find_literal(b"abc", b"a", False, False, -1, dict)  # type: ignore[type-var]
    with pytest.raises(ValueError):
        _fastscan.any_whole_word(b"abc", [LineMatch(1, 0, 9, ((0, 1),))])


@settings(max_examples=200, deadline=None)
@given(data=st.lists(ALPHABET, max_size=80).map(b"".join))
def test_distinct_trigrams_match_the_numpy_reference(data: bytes) -> None:
    ids = np.frombuffer(_fastscan.distinct_trigrams(data), dtype=np.uint32)
    assert len(set(ids.tolist())) == len(ids)
    reference = trigrams.without_newlines(np.unique(trigrams.trigram_id_array(data)))
    assert sorted(ids.tolist()) == reference.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sets(st.integers(0, (1 << 24) - 1), max_size=30), max_size=20))
def test_invert_postings_matches_a_sorting_reference(docs: list[set[int]]) -> None:
    arrays = [np.array(sorted(d, reverse=True), dtype=np.uint32) for d in docs]
    present, starts, ordinals = (
        np.frombuffer(b, dtype=t)
        for b, t in zip(_fastscan.invert_postings(arrays), (np.uint32, np.int64, np.uint32), strict=True)
    )
    expected = sorted(set().union(*docs))
    assert present.tolist() == expected
    assert len(starts) == len(expected) + 1
    for i, tid in enumerate(expected):
        assert ordinals[starts[i] : starts[i + 1]].tolist() == [n for n, d in enumerate(docs) if tid in d]


def test_invert_postings_rejects_bad_ids_and_stays_clean() -> None:
    with pytest.raises(ValueError):
        _fastscan.invert_postings([np.array([5, 1 << 24], dtype=np.uint32)])
    with pytest.raises(ValueError):
        _fastscan.invert_postings([b"abc"])
    # The counting table was reset: a later call counts from zero.
    present, starts, ordinals = _fastscan.invert_postings([np.array([5], dtype=np.uint32)])
    assert np.frombuffer(present, dtype=np.uint32).tolist() == [5]
    assert np.frombuffer(starts, dtype=np.int64).tolist() == [0, 1]
    assert np.frombuffer(ordinals, dtype=np.uint32).tolist() == [0]


def test_scans_from_several_threads_agree() -> None:
    # The scans run without the GIL on per-thread scratch tables: concurrent calls must not mix.
    docs = [(b"Alpha beta\n" * (200 + i)) + bytes([65 + i]) * 50 for i in range(8)]
    expected = [
        (_fastscan.distinct_trigrams(d), _fastscan.find_literal(d, b"beta", True, False, -1, LineMatch))
        for d in docs
    ]
    results: dict[int, list[object]] = {}

    def work(slot: int) -> None:
        results[slot] = [
            (_fastscan.distinct_trigrams(d), _fastscan.find_literal(d, b"beta", True, False, -1, LineMatch))
            for _ in range(20)
            for d in docs
        ]

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in range(2):
        assert results[slot] == expected * 20


def _reference_regex(data: bytes, pattern: str) -> list[LineMatch]:
    """_reference_regex asks RE2 (the Python binding) line by line, with ripgrep's iteration rule."""
    regexp = verify.compile_regex(pattern)
    pieces = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        pieces = pieces[:-1]  # no line follows a final newline
    out: list[LineMatch] = []
    start = 0
    for number, line in enumerate(pieces, 1):
        end = start + len(line)
        ranges: list[tuple[int, int]] = []
        pos, last_end = start, -1
        while pos <= end:
            s, e = regexp.Match(UNANCHORED, data, pos, end)[0]
            if s < 0:
                break
            if s == e == last_end:
                pos = s + 1  # an empty match abutting the previous one is skipped
                continue
            ranges.append((s - start, e - start))
            last_end = e
            pos = e if e > s else e + 1
        if ranges:
            out.append(LineMatch(number, start, end, tuple(ranges)))
        start = end + 1
    return out


UNANCHORED = _re2.RE2.Anchor.UNANCHORED
REGEXES = [r"a", r"a*", r"^", r"$", r"^$", r"\bb", r"a|b\b", r"[ab]+$", r"(?i)k", r"^a*b?", r"\w+", r"\s"]


@settings(max_examples=300, deadline=None)
@given(data=st.lists(ALPHABET, max_size=50).map(b"".join), pattern=st.sampled_from(REGEXES))
def test_native_regex_scan_matches_a_line_by_line_reference(data: bytes, pattern: str) -> None:
    expected = _reference_regex(data, pattern)
    regex = verify.compile_native(pattern)
    packed, lines, matches = _fastscan.regex_scan(regex, data, None, -1)
    assert verify.unpack_groups(packed) == expected
    assert (lines, matches) == (len(expected), sum(len(m.ranges) for m in expected))
    assert _fastscan.regex_count(regex, memoryview(data), None) == len(expected)
    assert verify.unpack_groups(_fastscan.regex_scan(regex, data, None, 1)[0]) == expected[:1]
    # Listed lines (a prefilter's) give the same answer for the lines listed.
    every = [(m.line_number, m.line_start, m.line_end) for m in _reference_regex(data, r"^")]
    assert verify.unpack_groups(_fastscan.regex_scan(regex, data, every, -1)[0]) == expected
    assert _fastscan.regex_count(regex, data, every) == len(expected)


def test_native_regex_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="missing \\)"):
        _fastscan.regex_compile(b"(", True, False)
    regex = verify.compile_native("a")
    with pytest.raises(ValueError):
        _fastscan.regex_scan(regex, b"abc", [(1, 0, 9)], -1)  # a line beyond the data
    with pytest.raises(ValueError):
        _fastscan.regex_count(regex, b"abc", [(1, 2, 1)])
    with pytest.raises((TypeError, ValueError)):
        _fastscan.regex_count(object(), b"abc", None)
    with pytest.raises(verify.InvalidPatternError, match=r"missing \): \($"):
        verify.compile_native("(")


# Bytes that JSON escapes or that sit next to an escape: quote, backslash, tab, form feed,
# backspace, other control bytes, DEL (not escaped), CR, and two- and three-byte UTF-8.
JSON_ALPHABET = st.sampled_from(
    [
        b"a",
        b"b",
        b'"',
        b"\\",
        b"\t",
        b"\x0c",
        b"\x08",
        b"\x01",
        b"\x1f",
        b"\x7f",
        b"\r",
        b"\n",
        b" ",
        b"\xc3\xa9",
        b"\xe2\x98\x83",
    ]
)
JSON_PATTERNS = ["a", 'ab|"', "\u00e9+", r"\\", r"\t|\x0c", r"\x01|\x7f", "b\r", "(?i)A\u2603", "^"]


def _without_elapsed(records: bytes) -> bytes:
    return re.sub(rb'"elapsed":\{[^}]*\}', b'"elapsed":{}', records)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(JSON_ALPHABET, max_size=60).map(b"".join),
    pattern=st.sampled_from(JSON_PATTERNS),
    context=st.integers(0, 3),
)
def test_native_json_records_equal_the_printer_s(data: bytes, pattern: str, context: int) -> None:
    # render_json prints services/cli/render.py's JSON byte for byte, `end` statistics included.
    from services.cli.render import Printer, from_groups, json_text

    groups, lines, matches = LineMatcher(pattern, case_sensitive=True).groups(data)
    native, native_lines, native_matches, printed, elapsed = _fastscan.render_json(
        data, groups, json_text('d/\u00e9 "q".txt'), context
    )
    printer = Printer(color=False, context=context, as_json=True)
    python = printer.render(from_groups('d/\u00e9 "q".txt', data, groups, context))
    assert _without_elapsed(native) == _without_elapsed(python)
    assert (native_lines, native_matches) == (lines, matches)
    stats = printer.stats
    assert (printed, lines, matches) == (stats.bytes_printed, stats.matched_lines, stats.matches)
    assert elapsed >= 0
    assert _fastscan.render_lines(data, groups, json_text('d/\u00e9 "q".txt'), True, context).startswith(
        native.split(b"\n", 1)[0]
    )


@pytest.mark.parametrize("context", [0, 2])
def test_native_json_records_equal_ripgrep_s(tmp_path: pathlib.Path, context: int) -> None:
    # One file with every escape, CRLF, two matches on a line and no trailing newline, as `rg --json`.
    data = (
        'x "q"\\ \x01\x1b\x7f\x0c\x08 \u00e9 q\r\nplain\r\n\r\n\tq and q \u2603\n'
        "1\n2\n3\n4\n5\n6\nq at the end"
    ).encode()
    (tmp_path / "f.txt").write_bytes(data)
    rg = subprocess.run(
        ["rg", "--json", "--context", str(context), "-e", "q", "--", "f.txt"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    groups, _, _ = LineMatcher("q", case_sensitive=True).groups(data)
    native, lines, matches, _, _ = _fastscan.render_json(data, groups, b'"f.txt"', context)
    # ripgrep's records for the file, without the closing summary.
    assert _without_elapsed(native) == _without_elapsed(b"".join(rg.splitlines(keepends=True)[:-1]))
    assert (lines, matches) == (3, 5)


def test_native_json_rejects_ranges_outside_the_line() -> None:
    groups = np.array([1, 0, 3, 1, 2, 5], dtype=np.int64).tobytes()  # a range past the line's end
    with pytest.raises(ValueError, match="groups do not describe lines"):
        _fastscan.render_json(b"abc\n", groups, b'"p"', 0)
    inside = groups[:-16] + np.array([0, 0], dtype=np.int64).tobytes()
    assert _fastscan.render_json(b"abc\n", inside, b'"p"', 0)[1] == 1
