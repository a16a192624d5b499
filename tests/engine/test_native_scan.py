"""Tests of the C extension's cold-path loops: the folded CRC-32 and the regex line scans."""

from __future__ import annotations

import array
import os
import struct
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


# ---- batches: record_spans, verify_blocks, split_strings, count_spans (a counting stream) ----

# Patterns of every LineMatcher strategy: literal, folded literal (guarded for k and s),
# prefiltered regex (plain and folded) and a regex without a literal.
COUNT_PATTERNS = [
    ("abc", True),
    ("ask", False),
    (r"abc\w*z", True),
    (r"(?i)\bask\w*", True),
    (r"x+abc", True),
    (r"^\s*$", True),
    (r"z$", True),
]


def _spans(bounds: list[int]) -> bytes:
    return array.array("q", bounds).tobytes()


@settings(max_examples=300, deadline=None)
@given(
    docs=st.lists(st.lists(PIECES, max_size=12).map(b"".join), max_size=8),
    case=st.sampled_from(COUNT_PATTERNS),
    pad=st.binary(max_size=5),
)
def test_count_spans_equals_the_per_file_count(docs: list[bytes], case: tuple[str, bool], pad: bytes) -> None:
    pattern, sensitive = case
    matcher = verify.LineMatcher(pattern, case_sensitive=sensitive)
    data = pad + b"".join(docs)  # the last document ends the buffer
    bounds: list[int] = []
    at = len(pad)
    for doc in docs:
        bounds += [at, at + len(doc)]
        at += len(doc)
    found = memoryview(matcher.count_spans(memoryview(data), _spans(bounds))).cast("q").tolist()
    assert found == [matcher.count(doc) for doc in docs]
    # Spans may repeat, overlap and come in any order: each is counted alone.
    backwards = [b for i in reversed(range(len(docs))) for b in bounds[2 * i : 2 * i + 2]] * 2
    found = memoryview(matcher.count_spans(data, _spans(backwards))).cast("q").tolist()
    assert found == [matcher.count(doc) for doc in reversed(docs)] * 2


def test_count_spans_of_no_candidates_and_of_bad_spans() -> None:
    matcher = verify.LineMatcher("abc", case_sensitive=True)
    assert matcher.count_spans(b"abc", b"") == b""
    assert memoryview(matcher.count_spans(b"x\nabc", _spans([2, 5, 5, 5]))).cast("q").tolist() == [1, 0]
    for bad in ([0, 4], [-1, 2], [2, 1]):
        with pytest.raises(ValueError):
            matcher.count_spans(b"abc", _spans(bad))
    with pytest.raises(ValueError):
        matcher.count_spans(b"abc", b"\0" * 12)  # not (start, end) pairs
    with pytest.raises(ValueError):
        _fastscan.count_spans(object(), None, False, False, False, b"abc", _spans([0, 3]))


def _blocked(tmp_path: Path, payload: bytes) -> tuple[format.MappedPart, format.PartInfo]:
    writer = format.PartWriter(tmp_path / "part", b"TEST", 1, lazy=True)
    writer.write(payload)
    info = writer.finish()
    return format.MappedPart(tmp_path / "part", b"TEST", info, lazy=True), info


def test_verify_blocks_checks_each_covered_block_once(tmp_path: Path) -> None:
    size = format.BLOCK_SIZE
    part, info = _blocked(tmp_path, os.urandom(4 * size + 100))
    total = len(part.view)
    sums = array.array("I")
    sums.frombytes(info.blocks)
    verified = bytearray(info.block_count)
    assert _fastscan.verify_blocks(part.view, b"", size, verified, sums) == -1 and not any(verified)
    # An empty span covers nothing; a span ending the file covers the short last block.
    spans = _spans([size + 1, size + 1, total - 3, total, 10, size + 10])
    assert _fastscan.verify_blocks(part.view, spans, size, verified, sums) == -1
    assert list(verified) == [1, 1, 0, 0, 1]
    # A wrong sum of a block already verified is not looked at again; an unverified one fails.
    sums[0] ^= 1
    sums[2] ^= 1
    assert _fastscan.verify_blocks(part.view, _spans([0, total]), size, verified, sums) == 2
    assert list(verified) == [1, 1, 0, 0, 1]
    for bad in ([0, total + 1], [-1, 0], [5, 4]):
        with pytest.raises(ValueError):
            _fastscan.verify_blocks(part.view, _spans(bad), size, verified, sums)
    with pytest.raises(ValueError):
        _fastscan.verify_blocks(part.view, _spans([0, 1]), size, bytearray(2), sums)  # short table


def test_check_spans_raises_the_format_error_on_a_corrupt_block(tmp_path: Path) -> None:
    size = format.BLOCK_SIZE
    payload = os.urandom(3 * size + 100)
    _, info = _blocked(tmp_path, payload)
    raw = bytearray((tmp_path / "part").read_bytes())
    raw[2 * size + 7] ^= 1
    (tmp_path / "broken").write_bytes(bytes(raw))
    broken = format.MappedPart(tmp_path / "broken", b"TEST", info, lazy=True)
    broken.check_spans(_spans([0, 2 * size]))  # the blocks before the corrupt one are good
    with pytest.raises(format.IndexCorruptError, match="block 2"):
        broken.check_spans(_spans([size, len(raw)]))
    with pytest.raises(format.IndexCorruptError, match="block 2"):
        broken.region(2 * size, 2 * size + 1)  # still unverified, so still refused
    with pytest.raises(format.IndexCorruptError):
        broken.check_spans(_spans([0, len(raw) + 1]))


def test_record_spans_reads_offsets_and_sizes() -> None:
    record = struct.Struct("<QQQI4x")  # offset u64, size u64, offset u64, size u32
    table = b"HEAD" + b"".join(record.pack(10 * i, i, 3 * i, 2 * i) for i in range(5))
    found = _fastscan.record_spans(table, _spans([4, 0, 2]), 4, record.size, 100, 200, 0, 8, 8)
    assert memoryview(found).cast("q").tolist() == [140, 144, 100, 100, 120, 122]
    # A roaring bitmap's uint32 ordinals and an int64 array read the same records; others refused.
    for typed in (array.array("I", [4, 0, 2]), array.array("q", [4, 0, 2])):
        assert _fastscan.record_spans(table, typed, 4, record.size, 100, 200, 0, 8, 8) == found
    with pytest.raises(TypeError, match="int64 or uint32"):
        _fastscan.record_spans(table, array.array("i", [4]), 4, record.size, 100, 200, 0, 8, 8)
    found = _fastscan.record_spans(table, _spans([3]), 4, record.size, 7, 22, 16, 24, 4)
    assert memoryview(found).cast("q").tolist() == [16, 22]  # a span may end at the limit
    with pytest.raises(ValueError):
        _fastscan.record_spans(table, _spans([3]), 4, record.size, 7, 21, 16, 24, 4)
    assert _fastscan.record_spans(table, b"", 4, record.size, 0, 0, 0, 8, 8) == b""
    for ordinals in ([5], [-1], [0, 5]):
        with pytest.raises(IndexError):
            _fastscan.record_spans(table, _spans(ordinals), 4, record.size, 100, 1000, 0, 8, 8)
    with pytest.raises(ValueError):
        _fastscan.record_spans(table, _spans([4]), 4, record.size, 100, 143, 0, 8, 8)
    with pytest.raises(ValueError):
        _fastscan.record_spans(table, _spans([0]), 4, record.size, 0, 10, 0, 30, 4)  # field past the record


def test_split_strings_decodes_exactly_the_expected_fields() -> None:
    data = "id\0src/ä.c\0repo\0c\0x\0y\0z\0w".encode()
    first = len("id\0src/ä.c\0repo\0c".encode())
    assert _fastscan.split_strings(data, _spans([0, first]), 4, 3) == [("id", "src/ä.c", "repo")]
    assert _fastscan.split_strings(data, b"", 4, 3) == []
    assert _fastscan.split_strings(b"\0\0\0", _spans([0, 3]), 4, 4) == [("", "", "", "")]
    for span in ([0, len(data)], [0, first - 2]):  # too many fields; too few
        with pytest.raises(ValueError):
            _fastscan.split_strings(data, _spans(span), 4, 3)
    with pytest.raises(ValueError):  # invalid UTF-8 in a field not returned is still an error
        _fastscan.split_strings(b"a\0b\0c\0\xff", _spans([0, 7]), 4, 3)
