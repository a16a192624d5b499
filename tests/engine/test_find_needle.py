"""The C extension's substring search (`find_needle`, behind every literal scan) against `bytes.find`.

`find_needle` tests 16 positions at a time for a needle's first and last bytes, compares the
rest where both match, and hands the rest of the haystack to memmem once comparisons made in
vain outrun the bytes scanned. These tests go through the scans that use it: `find_literal`
(every occurrence, with ranges), `count_spans` of a pure literal (lines holding it), and
`regex_count_needle` / `regex_scan_needle` (RE2 on the needle's lines). The reference is
Python's own substring search. Edges: needles of every length from 1 to 40 at every offset
around the 16-byte steps and the end of the buffer, and needles built to defeat the filter.
"""

from __future__ import annotations

import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.query import verify
from tests.engine.lines import reference_lines


def find_literal(data: bytes, needle: bytes) -> list[verify.LineMatch]:
    found = _fastscan.find_literal(data, needle, False, False, -1, verify.LineMatch)
    assert found is not None
    return list(found)


def count_literal(data: bytes, needle: bytes) -> int:
    matcher = verify.LineMatcher(needle.decode(), case_sensitive=True, literal=True)
    (count,) = memoryview(matcher.count_spans(data, array.array("q", [0, len(data)]).tobytes())).cast("q")
    return int(count)


@pytest.mark.parametrize("m", range(1, 41))
def test_every_needle_length_at_every_offset_around_the_steps(m: int) -> None:
    needle = bytes(range(0x41, 0x41 + m))  # distinct bytes: "ABC..."
    for size in (m, m + 1, m + 14, m + 15, m + 16, m + 17, m + 31, m + 33, 70):
        for at in range(0, size - m + 1):
            data = b"." * at + needle + b"." * (size - m - at)
            want = reference_lines(data, needle)
            assert find_literal(data, needle) == want, (m, size, at)
            assert count_literal(data, needle) == 1
        # A needle cut short by the end of the buffer is not found.
        cut = b"." * (size - m + 1) + needle[:-1]
        assert find_literal(cut, needle) == [] and count_literal(cut, needle) == 0


PIECES = st.sampled_from([b"a", b"b", b"ab", b"ba", b"aab", b"\n", b"x"])


@settings(max_examples=400, deadline=None)
@given(
    data=st.lists(PIECES, max_size=120).map(b"".join),
    needle=st.lists(st.sampled_from([b"a", b"b", b"x"]), min_size=1, max_size=6).map(b"".join),
)
def test_any_needle_over_a_small_alphabet_equals_bytes_find(data: bytes, needle: bytes) -> None:
    want = reference_lines(data, needle)
    assert find_literal(data, needle) == want
    assert count_literal(data, needle) == len(want)
    regex = verify.compile_native(f"{needle.decode()}.*")
    counted = _fastscan.regex_count_needle(regex, data, needle, False, False)
    assert counted == len(want)
    scanned = _fastscan.regex_scan_needle(regex, data, needle, False, False, -1)
    assert scanned is not None
    assert [m.line_number for m in verify.unpack_groups(scanned[0])] == [m.line_number for m in want]


@pytest.mark.parametrize("m", [3, 4, 17, 40, 300])
def test_a_needle_that_defeats_the_filter_is_still_found_where_it_is(m: int) -> None:
    # Every position of the `a` run is a candidate (first and last bytes match) that fails
    # on the second byte, so the comparisons made in vain soon outrun the bytes scanned and
    # the search goes on with memmem: the needle must still be found at its place, once.
    needle = b"a" + b"x" * (m - 2) + b"a"
    for lead in (0, 5, 4096, 50_000):
        data = b"a" * lead + needle + b"a" * 37 + b"\n" + b"a" * 1000 + needle
        want = reference_lines(data, needle)
        assert len(want) == 2
        assert find_literal(data, needle) == want, (m, lead)
        assert count_literal(data, needle) == 2


def test_a_run_of_the_needles_first_byte_then_the_needle() -> None:
    # `aaaab` over `aaa...ab`: first-byte candidates everywhere, the last byte only at the end.
    for m in (2, 3, 16, 33):
        needle = b"a" * (m - 1) + b"b"
        data = b"a" * 10_000 + b"b"
        assert find_literal(data, needle) == [verify.LineMatch(1, 0, len(data), ((10_001 - m, 10_001),))]


def test_needles_drawn_from_real_source_files_equal_bytes_find() -> None:
    # This repository's own sources: needles of 2 to 40 bytes cut at fixed pseudo-random
    # offsets (so they occur), and the same needles with one byte changed (so most do not).
    import random
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services"
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".cc") and p.is_file())
    rng = random.Random(20261207)
    for path in rng.sample(files, 25):
        data = path.read_bytes()
        for _ in range(8):
            m = rng.randint(2, 40)
            at = rng.randrange(0, max(1, len(data) - m))
            needle = data[at : at + m]
            if not needle or b"\n" in needle:
                continue
            changed = needle[:-1] + bytes([(needle[-1] + 1) % 256 or 1])
            for probe in (needle, changed):
                if b"\n" in probe:
                    continue
                assert find_literal(data, probe) == reference_lines(data, probe), (path.name, probe)
