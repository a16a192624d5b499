"""Tests of the C extension's cold-path loops: the folded CRC-32 and the regex line scans."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan, format


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
