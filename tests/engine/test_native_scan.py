"""Tests of the C extension's cold-path loops: the folded CRC-32 and the regex line scans."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.index import format
from services.search.engine.query import verify


def test_crc32_is_zlibs_for_every_length_around_the_folding_steps() -> None:
    # 0-63 bytes take zlib's loop; 64+ fold 64 bytes at a time, then 16, then a zlib tail.
    data = os.urandom(4096 + 77)
    for n in [*range(200), 255, 256, 257, 1023, 1024, 1025, 4096, 4096 + 77]:
        for start in (0, 1, 7):
            piece = memoryview(data)[start : start + n]
            for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
                assert _fastscan.crc32(piece, value) == zlib.crc32(piece, value), (n, start, value)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), value=st.integers(0, 0xFFFFFFFF))
def test_crc32_matches_zlib_on_any_input(data: bytes, value: int) -> None:
    assert _fastscan.crc32(data, value) == zlib.crc32(data, value)
    # Chained over two pieces, as zlib.crc32(b, zlib.crc32(a)) is.
    half = len(data) // 3
    assert _fastscan.crc32(data[half:], _fastscan.crc32(data[:half], value)) == zlib.crc32(data, value)


def test_crc32_is_accelerated_on_this_machine() -> None:
    # The development machines are x86-64 with PCLMULQDQ; no silent fallback to zlib's loop there.
    if os.uname().machine == "x86_64":
        assert _fastscan.crc32_accelerated()
    large = os.urandom(1 << 20)
    assert _fastscan.crc32(large) == zlib.crc32(large)


def test_a_corrupt_block_is_still_caught_by_the_lazy_check(tmp_path: Path) -> None:
    # The mapped part's lazy blocks are verified with _fastscan.crc32: one flipped byte fails.
    payload = os.urandom(3 * format.BLOCK_SIZE + 100)
    writer = format.PartWriter(tmp_path / "part", b"TEST", 1, lazy=True)
    writer.write(payload)
    info = writer.finish()
    raw = bytearray((tmp_path / "part").read_bytes())
    part = format.MappedPart(tmp_path / "part", b"TEST", info, lazy=True)
    assert bytes(part.region(0, len(raw))) == bytes(raw)
    raw[format.BLOCK_SIZE + 5] ^= 1
    (tmp_path / "broken").write_bytes(bytes(raw))
    broken = format.MappedPart(tmp_path / "broken", b"TEST", info, lazy=True)
    assert bytes(broken.region(0, 10)) == bytes(raw[:10])
    with pytest.raises(format.IndexCorruptError):
        broken.region(format.BLOCK_SIZE, format.BLOCK_SIZE + 10)
    with pytest.raises(format.IndexCorruptError):
        broken.verify()


# Regexes with a required literal (the needle the scan looks for), and their needle.
NEEDLE_REGEXES = [
    (r"abc\w*z", b"abc", False),
    (r"\babc\b", b"abc", False),
    (r"abc$", b"abc", False),
    (r"^abc", b"abc", False),
    (r"x+abc", b"abc", False),
    (r"abc.*xyz", b"xyz", False),
    (r"abc\r$", b"abc\r", False),
    (r"(?i)abc.z", b"abc", True),
    (r"(?i)\bask\w*", b"ask", True),
]
PIECES = st.sampled_from(
    [b"abc", b"ABC", b"aBc", b"xyz", b"x", b"z", b" ", b"\n", b"\r\n", b"\r", b"_", "\u212a".encode(), b"ask"]
)


def _whole(pattern: str, data: bytes, limit: int = -1) -> tuple[bytes, int, int]:
    return _fastscan.regex_scan(verify.compile_native(pattern), data, None, limit)


@settings(max_examples=400, deadline=None)
@given(
    data=st.lists(PIECES, max_size=40).map(b"".join),
    case=st.sampled_from(NEEDLE_REGEXES),
    limit=st.sampled_from([-1, 1, 2]),
)
def test_needle_scan_equals_re2_over_the_whole_buffer(
    data: bytes, case: tuple[str, bytes, bool], limit: int
) -> None:
    pattern, needle, folded = case
    regex = verify.compile_native(pattern)
    expected = _whole(pattern, data, limit)
    # Without the guard a folded needle misses KELVIN SIGN (RE2's (?i) k); the guard hands
    # such a document back (None) so the caller scans it whole.
    guard = folded and b"k" in needle
    found = _fastscan.regex_scan_needle(regex, data, needle, folded, guard, limit)
    if found is None:
        assert guard and "\u212a".encode() in data
        return
    assert found == expected
    counted = _fastscan.regex_count_needle(regex, memoryview(data), needle, folded, guard)
    assert counted == _fastscan.regex_count(regex, data, None)


def test_needle_scan_at_the_edges_of_the_buffer() -> None:
    regex = verify.compile_native(r"ab\w+")
    cases = [
        b"abc",  # one line, no newline
        b"abc\n",  # trailing newline
        b"\n\nabc",  # empty lines first, last line without newline
        b"abd\r\nab\r\nabe\r\n",  # CRLF: \r is not a word byte, so `ab\r` does not match
        b"ab\nab x\nxabyab\n\n",  # the needle in lines the regex does not match
        b"ab",  # the needle ends the buffer
        b"",
        b"\n",
    ]
    for data in cases:
        found = _fastscan.regex_scan_needle(regex, data, b"ab", False, False, -1)
        assert found == _whole(r"ab\w+", data), data
        assert _fastscan.regex_count_needle(regex, data, b"ab", False, False) == _fastscan.regex_count(
            regex, data, None
        )
    data = b"xx\nabc abd\r\nab\nabz"
    packed, lines, matches = _fastscan.regex_scan_needle(regex, data, b"ab", False, False, -1) or (b"", 0, 0)
    assert (lines, matches) == (2, 3)
    assert [(m.line_number, m.line_start, m.line_end, m.ranges) for m in verify.unpack_groups(packed)] == [
        (2, 3, 11, ((0, 3), (4, 7))),
        (4, 15, 18, ((0, 3),)),
    ]


def test_needle_scan_folds_case_and_guards_kelvin_sign() -> None:
    regex = verify.compile_native(r"park\w", case_sensitive=False)
    data = "PARKS\nparking\nPar\u212aa\n".encode()
    # Folded needle: the ASCII lines are found; KELVIN SIGN makes the scan hand back None.
    assert _fastscan.regex_scan_needle(regex, data, b"park", True, True, -1) is None
    assert _fastscan.regex_count_needle(regex, data, b"park", True, True) is None
    ascii_only = b"PARKS\nparking\nPark\n"
    assert _fastscan.regex_scan_needle(regex, ascii_only, b"park", True, True, -1) == _fastscan.regex_scan(
        regex, ascii_only, None, -1
    )
    assert _fastscan.regex_count_needle(regex, ascii_only, b"park", True, True) == 2
    # Through LineMatcher the guarded document is scanned whole: RE2 finds all three lines.
    matcher = verify.LineMatcher(r"park\w", case_sensitive=False)
    assert matcher.strategy == "prefilter"
    assert [m.line_number for m in matcher.find(data)] == [1, 2, 3]
    assert matcher.count(data) == 3
    assert matcher.groups(data)[1:] == (3, 3)


def test_needle_scan_rejects_bad_arguments() -> None:
    regex = verify.compile_native(r"ab\w")
    with pytest.raises(ValueError):
        _fastscan.regex_scan_needle(regex, b"abc", b"", False, False, -1)
    with pytest.raises(ValueError):
        _fastscan.regex_count_needle(regex, b"abc", b"a\nb", False, False)
    with pytest.raises(TypeError):
        _fastscan.regex_count_needle(regex, b"abc", "ab", False, False)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _fastscan.regex_count_needle(object(), b"abc", b"ab", False, False)
