"""The class-run prefilter: a run of bytes every match holds picks the lines RE2 reads.

Its contract is that it never changes an answer: every scan with the run equals the same
scan of the same regex compiled without one (RE2 over the whole buffer), on adversarial
runs at the edges of buffers and lines, and on random patterns and texts.
"""

from __future__ import annotations

import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.query import regexsyntax as rx
from services.search.engine.query import verify
from services.search.engine.query.verify import ClassRun, LineMatcher, class_run


def _run(pattern: str, *, case_sensitive: bool = True) -> tuple[bytes, int] | None:
    found = class_run(rx.parse_regex(pattern, case_insensitive=not case_sensitive).root)
    return None if found is None else (bytes(b for b in range(256) if found.flags[b]), found.length)


@pytest.mark.parametrize(
    ("pattern", "flags", "length"),
    [
        ("[A-Z]{20,}", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 20),
        (r"[0-9a-f]{40}", b"0123456789abcdef", 40),
        # The rarest part of a stretch: digits alone beat \w+ with them.
        (r"\w+\d{6}", b"0123456789", 6),
        # Literals and classes in a row make one run of their union.
        (r"\d{4}-\d{2}-\d{2}", b"-0123456789", 10),
        # Zero-width assertions and groups keep a stretch together.
        (r"\b(?:[A-Z]{6}\d{6})\b", b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", 12),
    ],
)
def test_the_rarest_required_run_is_chosen(pattern: str, flags: bytes, length: int) -> None:
    assert _run(pattern) == (flags, length)
    assert LineMatcher(pattern, case_sensitive=True).strategy == "run"


@pytest.mark.parametrize(
    "pattern",
    [
        "[a-z]{8}",  # lower-case letters in a row: most lines of code hold them
        r"\w+",
        "[A-Z]{20,}|foo",  # an alternation has no run every match holds
        ".{30}",
        r"[^a]{3}",
    ],
)
def test_common_or_unlisted_runs_are_not_used(pattern: str) -> None:
    assert _run(pattern) is None
    assert LineMatcher(pattern, case_sensitive=True).strategy == "regex"


def test_a_required_literal_is_preferred_to_a_run() -> None:
    assert LineMatcher(r"kmalloc[A-Z]{20}", case_sensitive=True).strategy == "prefilter"


def test_a_literal_prefix_is_left_to_re2() -> None:
    # RE2 searches for a literal prefix itself; the run would only add a call per line.
    assert _run(r"0x[0-9a-f]{8}") == (b"0123456789abcdefx", 10)
    assert LineMatcher(r"0x[0-9a-f]{8}", case_sensitive=True).strategy == "regex"
    assert LineMatcher(r"^0x[0-9a-f]{8}", case_sensitive=True).strategy == "regex"
    # A one-byte or case-folded prefix is no such help.
    assert LineMatcher(r"_[A-Z]{20}", case_sensitive=True).strategy == "run"
    assert LineMatcher(r"(?i)0x[0-9]{12}", case_sensitive=True).strategy == "run"


def test_case_folding_widens_the_run() -> None:
    # (?i)[G-H] is G, H, g, h; with k or s in the class, KELVIN SIGN and LONG S (bytes >= 0x80) too.
    assert _run("[G-H]{30}", case_sensitive=False) == (b"GHgh", 30)
    flags, length = _run("[K]{40}", case_sensitive=False) or (b"", 0)
    assert length == 40 and set(b"Kk") < set(flags) and set(range(0x80, 0x100)) <= set(flags)
    # A non-ASCII member is some bytes >= 0x80.
    flags, _ = _run("[0-9é]{30}") or (b"", 0)
    assert set(b"0123456789") < set(flags) and 0xC3 in flags and 0xA9 in flags


def test_a_newline_is_never_part_of_a_run() -> None:
    flags, length = _run(r"[\n0-9]{30}") or (b"", 0)
    assert length == 30 and b"\n" not in flags


def _plain(pattern: str, case_sensitive: bool) -> object:
    return verify.compile_native(pattern, case_sensitive=case_sensitive)


def _with_run(pattern: str, case_sensitive: bool, flags: bytes, length: int) -> object:
    return verify.compile_native(pattern, case_sensitive=case_sensitive, run=ClassRun(flags, length))


def _same_answers(pattern: str, data: bytes, *, case_sensitive: bool = True) -> None:
    found = class_run(rx.parse_regex(pattern, case_insensitive=not case_sensitive).root)
    assert found is not None
    plain = _plain(pattern, case_sensitive)
    ran = _with_run(pattern, case_sensitive, found.flags, found.length)
    for limit in (-1, 1, 2):
        assert _fastscan.regex_scan(ran, data, None, limit) == _fastscan.regex_scan(plain, data, None, limit)
    assert _fastscan.regex_count(ran, data, None) == _fastscan.regex_count(plain, data, None)
    spans = array.array("q", [0, len(data), 0, len(data) // 2, len(data) // 3, len(data)])
    assert _fastscan.count_spans(ran, None, False, False, False, data, spans) == _fastscan.count_spans(
        plain, None, False, False, False, data, spans
    )


def test_runs_at_the_edges_of_buffers_and_lines() -> None:
    pattern = "[A-Z]{5}"
    for data in [
        b"ABCDE",  # the whole buffer
        b"ABCD",  # one short
        b"xABCDE",
        b"ABCDEx",
        b"ABCD\nEFGH\n",  # a newline splits a run: no match
        b"ABCD EFGHI\n",
        b"AB\nABCDEFGHIJ\nxx",
        b"aBCDEABCD",  # the run starts one after a non-member probe
        b"ABCDxABCDxABCDE",
        b"x" * 4 + b"ABCDE" + b"x" * 100 + b"\nQWERTY",
        b"",
        b"\n\n\n",
    ]:
        _same_answers(pattern, data)
        assert (_fastscan.regex_count(_plain(pattern, True), data, None) > 0) == any(
            len(part) >= 5 and part.isalpha() and part.isupper()
            for line in data.split(b"\n")
            for part in line.replace(b"x", b" ").replace(b"a", b" ").split()
        )


def test_a_run_set_is_checked_when_compiling() -> None:
    source = b"(?m)[A-Z]{5}"
    upper = bytes(1 if 0x41 <= b <= 0x5A else 0 for b in range(256))
    with pytest.raises(ValueError, match="newline"):
        _fastscan.regex_compile(source, True, False, bytes(1 if b == 0x0A else 0 for b in range(256)), 5)
    with pytest.raises(ValueError, match="256 bytes"):
        _fastscan.regex_compile(source, True, False, upper[:255], 5)
    with pytest.raises(ValueError, match="at least 1"):
        _fastscan.regex_compile(source, True, False, upper, 0)


_ALPHABET = "AB09x-_ \n"
_ATOMS = st.sampled_from(["[A-Z]", "[0-9]", r"\d", "[AB]", "-", "x", r"[A-Z0-9]", "[^x]", r"\w", "."])


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        atom = draw(_ATOMS)
        low = draw(st.integers(0, 6))
        high = draw(st.one_of(st.none(), st.integers(low, low + 3)))
        parts.append(atom + (f"{{{low},}}" if high is None else f"{{{low},{high}}}"))
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from([r"\b", "^", "$", "(?:", ""])))
    pattern = "".join(parts)
    return pattern + ")" * (pattern.count("(?:") - pattern.count(")"))


@settings(max_examples=300, deadline=None)
@given(
    pattern=_patterns(),
    text=st.text(alphabet=_ALPHABET, max_size=300),
    case_sensitive=st.booleans(),
    length=st.integers(1, 8),
    members=st.text(alphabet="AB09x-_ ", min_size=1, max_size=5),
)
def test_a_sound_run_never_changes_an_answer(
    pattern: str, text: str, case_sensitive: bool, length: int, members: str
) -> None:
    data = text.encode()
    try:
        plain = _plain(pattern, case_sensitive)
    except verify.InvalidPatternError:
        return
    found = class_run(rx.parse_regex(pattern, case_insensitive=not case_sensitive).root)
    if found is not None:
        # The analysis is sound: a run it finds changes no answer.
        ran = _with_run(pattern, case_sensitive, found.flags, found.length)
        assert _fastscan.regex_scan(ran, data, None, -1) == _fastscan.regex_scan(plain, data, None, -1)
        assert _fastscan.regex_count(ran, data, None) == _fastscan.regex_count(plain, data, None)
    # find_run itself, against a direct reading: the lines given to RE2 are exactly those
    # holding `length` members in a row, so an always-matching pattern counts those lines.
    flags = bytes(1 if chr(b) in members else 0 for b in range(256))
    every = _with_run(".*", True, flags, length)
    want = sum(
        1
        for line in data.split(b"\n")[: data.count(b"\n") + (0 if data.endswith(b"\n") else 1)]
        if any(len(piece) >= length for piece in _member_runs(line, set(members.encode())))
    )
    assert _fastscan.regex_count(every, data, None) == (want if data else 0)


def _member_runs(line: bytes, members: set[int]) -> list[bytes]:
    runs, current = [], bytearray()
    for byte in line:
        if byte in members:
            current.append(byte)
        else:
            runs.append(bytes(current))
            current.clear()
    runs.append(bytes(current))
    return runs


def test_the_line_matcher_uses_the_run_and_answers_as_re2_does() -> None:
    data = b'int x = 0;\nconst char *KEY = "ABCDEFGHIJKLMNOPQRSTUVWX";\nOK\n' * 3
    matcher = LineMatcher("[A-Z]{20,}", case_sensitive=True)
    assert matcher.strategy == "run"
    lines = matcher.find(data)
    assert [line.line_number for line in lines] == [2, 5, 8]
    assert matcher.count(data) == 3
    assert [lines[0].line(data)[s:e] for s, e in lines[0].ranges] == [b"ABCDEFGHIJKLMNOPQRSTUVWX"]
