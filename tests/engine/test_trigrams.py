"""Tests for trigram extraction and the posting-list codec, against plain-Python references."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from services.search.engine.index.postings import (
    PostingsBuilder,
    decode_postings,
    encode_all,
    encode_postings,
)
from services.search.engine.index.trigrams import (
    distinct_trigrams,
    fold_ascii,
    query_trigrams,
    sorted_trigrams,
    trigram_bytes,
    trigram_id,
    trigram_id_array,
)


def reference_trigrams(content: bytes) -> set[int]:
    folded = bytes(b + 32 if 65 <= b <= 90 else b for b in content)
    return {trigram_id(folded[i : i + 3]) for i in range(len(folded) - 2) if b"\n" not in folded[i : i + 3]}


def test_fold_ascii_only_touches_ascii_letters() -> None:
    assert fold_ascii(b"Hello WORLD_09 \xc3\x84\xc3\xa4") == b"hello world_09 \xc3\x84\xc3\xa4"


def test_trigram_id_round_trip() -> None:
    assert trigram_id(b"abc") == 0x616263
    assert trigram_bytes(0x616263) == b"abc"
    with pytest.raises(ValueError):
        trigram_id(b"ab")
    with pytest.raises(ValueError):
        trigram_bytes(1 << 24)


def test_id_array_keeps_positions_and_duplicates() -> None:
    ids = trigram_id_array(b"abab")
    assert [trigram_bytes(int(i)) for i in ids] == [b"aba", b"bab"]
    assert len(trigram_id_array(b"ab")) == 0


def test_newline_trigrams_are_dropped_and_case_folded() -> None:
    assert set(query_trigrams(b"Ab\ncD")) == set()
    assert query_trigrams(b"FooBar") == sorted([b"foo", b"oob", b"oba", b"bar"])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=1, max_size=8))
def test_distinct_trigrams_match_reference(content: bytes, alphabet: bytes) -> None:
    # A small alphabet forces many duplicate trigrams; mixing both exercises stale stamps.
    rng = random.Random(content)
    small = bytes(rng.choice(alphabet + b"\nA") for _ in range(len(content)))
    for data in (content, small, content + small):
        got = distinct_trigrams(data)
        assert len(got) == len(set(got.tolist()))
        assert set(got.tolist()) == reference_trigrams(data)
        assert sorted_trigrams(data).tolist() == sorted(reference_trigrams(data))


@pytest.mark.parametrize("values", [[0], [5], [65535], [65536], [70000], [2**31], [1, 2], [3, 7, 100000]])
def test_encode_postings_matches_croaring(values: list[int]) -> None:
    expected = BitMap(values)
    expected.run_optimize()
    encoded = encode_postings(np.array(values, dtype=np.uint32))
    assert encoded == expected.serialize()
    assert decode_postings(memoryview(encoded)) == BitMap(values)


def test_postings_builder_inverts_documents() -> None:
    docs = [b"alpha beta", b"beta gamma", b"ALPHA", b"", b"gamma\nalpha"]
    builder = PostingsBuilder()
    for doc in docs:
        builder.add(distinct_trigrams(doc))
    # Counting sort twice (its scratch tables must come back clean), then the comparison sort.
    for counting in (True, True, False):
        ids, starts, ordinals = builder.invert(counting=counting)
        assert ids.tolist() == sorted(set().union(*(reference_trigrams(d) for d in docs)))
        for i, tid in enumerate(ids.tolist()):
            expected = [n for n, d in enumerate(docs) if tid in reference_trigrams(d)]
            assert ordinals[starts[i] : starts[i + 1]].tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 200_000), max_size=40), max_size=30), st.integers(0, 5000))
def test_encode_all_is_byte_identical_to_croaring(lists: list[list[int]], run: int) -> None:
    # Add a long consecutive run and a dense list so both slow paths (runs, >4096) are exercised.
    groups = [sorted(set(g)) for g in lists] + [list(range(run, run + 50)), list(range(0, 3 * 5000, 3))]
    groups = [g for g in groups if g]
    ordinals = np.array([v for g in groups for v in g], dtype=np.uint32)
    starts = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum([len(g) for g in groups], out=starts[1:])
    offsets, data = encode_all(ordinals, starts)
    raw = data.tobytes()
    for i, group in enumerate(groups):
        expected = BitMap(group)
        expected.run_optimize()
        serialized = expected.serialize()
        # Lists are padded to an even length so the next one starts 2-byte aligned.
        assert raw[offsets[i] : offsets[i + 1]] == serialized + b"\0" * (len(serialized) % 2)
        assert decode_postings(memoryview(raw)[offsets[i] : offsets[i + 1]]) == BitMap(group)
