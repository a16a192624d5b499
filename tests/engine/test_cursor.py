"""Cursor encoding: round trips, tamper and staleness errors, and the rank order it relies on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.search.engine.search.cursor import (
    Cursor,
    CursorError,
    Position,
    decode_cursor,
    encode_cursor,
    exclusion_digests,
    query_fingerprint,
    rank_key,
)

FP = query_fingerprint("foo bar", "regex=0")


def test_round_trip_with_position_and_exclusions() -> None:
    cursor = Cursor(
        generation=42,
        fingerprint=FP,
        position=Position(10.0, "src/é/main.py", "repo-1", "doc-9"),
        exclude=exclusion_digests([("r", "a.py", "1"), ("r", "b.py", "2")]),
    )
    token = encode_cursor(cursor)
    assert token.isascii() and "=" not in token and "/" not in token and "+" not in token
    assert decode_cursor(token) == cursor


@given(
    generation=st.integers(min_value=0, max_value=2**64 - 1),
    score=st.floats(allow_nan=False, allow_infinity=False),
    path=st.text(max_size=200),
    repo=st.text(max_size=20),
    ext=st.text(max_size=20),
    n_excluded=st.integers(min_value=0, max_value=60),
)
def test_round_trip_property(generation: int, score: float, path: str, repo: str, ext: str, n_excluded: int):
    exclude = exclusion_digests((repo, f"{path}{i}", ext) for i in range(n_excluded))
    cursor = Cursor(generation, FP, Position(score, path, repo, ext), exclude)
    assert decode_cursor(encode_cursor(cursor)) == cursor


def test_no_position_round_trip() -> None:
    cursor = Cursor(generation=1, fingerprint=FP)
    assert decode_cursor(encode_cursor(cursor)) == cursor


def test_flipped_byte_is_reported_as_tampered() -> None:
    token = encode_cursor(Cursor(7, FP, Position(1.0, "a.py", "", "a.py")))
    raw = bytearray(token.encode())
    # Change one character in the middle of the body to another base64url character.
    raw[12] = ord("A") if raw[12] != ord("A") else ord("B")
    with pytest.raises(CursorError) as info:
        decode_cursor(raw.decode())
    assert info.value.reason in {"tampered", "malformed"}


def test_garbage_and_truncation_are_malformed() -> None:
    with pytest.raises(CursorError) as info:
        decode_cursor("not a cursor!!")
    assert info.value.reason == "malformed"
    token = encode_cursor(Cursor(7, FP))
    with pytest.raises(CursorError) as info:
        decode_cursor(token[:10])
    assert info.value.reason == "malformed"


def test_other_key_is_rejected() -> None:
    token = encode_cursor(Cursor(7, FP), key=b"service-secret")
    assert decode_cursor(token, key=b"service-secret").generation == 7
    with pytest.raises(CursorError) as info:
        decode_cursor(token)
    assert info.value.reason == "tampered"


def test_check_rejects_other_generation_and_query() -> None:
    cursor = decode_cursor(encode_cursor(Cursor(7, FP)))
    cursor.check(generation=7, fingerprint=FP)
    with pytest.raises(CursorError) as info:
        cursor.check(generation=8, fingerprint=FP)
    assert info.value.reason == "stale_generation"
    assert "generation 7" in str(info.value)
    with pytest.raises(CursorError) as info:
        cursor.check(generation=7, fingerprint=query_fingerprint("other"))
    assert info.value.reason == "query_mismatch"


def test_fingerprint_separates_parts() -> None:
    # Length-prefixing keeps ("ab", "c") and ("a", "bc") apart.
    assert query_fingerprint("ab", "c") != query_fingerprint("a", "bc")


def test_rank_key_orders_by_score_then_path() -> None:
    keys = [
        rank_key(10.0, "b.py", "", "2"),
        rank_key(100.0, "z.py", "", "3"),
        rank_key(10.0, "a.py", "", "1"),
        rank_key(1.0, "a.py", "", "4"),
    ]
    assert [k[1] for k in sorted(keys)] == ["z.py", "a.py", "b.py", "a.py"]
    cursor = Cursor(1, FP, Position(10.0, "a.py", "", "1"))
    assert [cursor.after(k) for k in keys] == [True, False, False, True]
