"""trigrams holds trigram extraction: ASCII case folding, trigram ids and distinct-trigram sets.

A trigram is three bytes of UTF-8 content, ASCII-case-folded, identified by the uint32
``b0<<16 | b1<<8 | b2`` (see format.py). Extraction works on whole buffers with numpy: per-byte
Python loops would run at about 2 MB/s, the vectorised path below at about 70 MB/s per core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

TRIGRAM_SPACE = 1 << 24
"""TRIGRAM_SPACE is the number of possible trigram ids."""

_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LOWER = bytes(range(ord("a"), ord("z") + 1))
FOLD_TABLE = bytes.maketrans(_UPPER, _LOWER)
"""FOLD_TABLE maps ASCII upper case to lower case and leaves every other byte alone."""

_NEWLINE = 0x0A


def fold_ascii(data: bytes | bytearray | memoryview) -> bytes:
    """fold_ascii returns `data` with ASCII letters lower-cased (bytes.translate: C speed)."""
    return bytes(data).translate(FOLD_TABLE)


def trigram_id(tri: bytes) -> int:
    """trigram_id returns the uint32 id of a three-byte trigram (as given, not folded)."""
    if len(tri) != 3:
        raise ValueError(f"a trigram is 3 bytes, got {len(tri)}")
    return (tri[0] << 16) | (tri[1] << 8) | tri[2]


def trigram_bytes(tid: int) -> bytes:
    """trigram_bytes is the inverse of trigram_id."""
    if not 0 <= tid < TRIGRAM_SPACE:
        raise ValueError(f"trigram id out of range: {tid}")
    return bytes(((tid >> 16) & 0xFF, (tid >> 8) & 0xFF, tid & 0xFF))


def trigram_id_array(content: bytes | memoryview) -> NDArray[np.uint32]:
    """trigram_id_array returns the folded trigram id at every offset of `content`, in content order.

    Trigrams spanning a newline are included; `without_newlines` drops them.
    """
    n = len(content)
    if n < 3:
        return np.empty(0, dtype=np.uint32)
    # One unaligned big-endian 4-byte load per offset, shifted right by 8, is the trigram id:
    # a single pass, 2x faster than assembling ids from three shifted byte arrays.
    padded = fold_ascii(content) + b"\0"
    windows = np.ndarray(shape=(n - 2,), dtype=">u4", buffer=padded, strides=(1,))
    ids: NDArray[np.uint32] = (windows >> 8).astype(np.uint32)
    return ids


def without_newlines(ids: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """without_newlines drops the ids of trigrams containing a newline byte (never indexed)."""
    bad = ((ids >> 16) == _NEWLINE) | (((ids >> 8) & 0xFF) == _NEWLINE) | ((ids & 0xFF) == _NEWLINE)
    kept: NDArray[np.uint32] = ids[~bad]
    return kept


class _Stamps(threading.local):
    """_Stamps is a per-thread scratch table for deduplication (64 MiB of int32, zero-filled lazily)."""

    def __init__(self) -> None:
        # np.zeros maps untouched pages to the shared zero page, so only touched trigrams cost RSS.
        self.table = np.zeros(TRIGRAM_SPACE, dtype=np.int32)
        self.positions = np.arange(1 << 16, dtype=np.int32)

    def arange(self, n: int) -> NDArray[np.int32]:
        """arange returns 0..n-1 as a view of a cached array (allocating it per document cost 10%)."""
        if n > len(self.positions):
            self.positions = np.arange(max(n, 2 * len(self.positions)), dtype=np.int32)
        return self.positions[:n]


_stamps = _Stamps()


def distinct_trigrams(content: bytes | memoryview) -> NDArray[np.uint32]:
    """distinct_trigrams returns the distinct folded trigram ids of `content`, in no particular order.

    Deduplication stamps each id's last position into a 2^24 table and keeps positions whose
    stamp survived: linear time and no clearing between documents, 1.8x faster than
    ``np.unique`` (sort-based) on the stdlib corpus (72 vs 39 MB/s including extraction).
    """
    ids = trigram_id_array(content)
    if len(ids) == 0:
        return ids
    table = _stamps.table
    positions = _stamps.arange(len(ids))
    # With repeated indices numpy keeps the last assignment, so each id ends up stamped with
    # the position of its last occurrence; stale stamps from earlier documents are never read.
    table[ids] = positions
    # Newline trigrams are dropped after deduplication, on thousands of ids instead of millions.
    return without_newlines(ids[table[ids] == positions])


def sorted_trigrams(content: bytes | memoryview) -> NDArray[np.uint32]:
    """sorted_trigrams returns the distinct folded trigram ids of `content`, ascending."""
    return np.sort(distinct_trigrams(content))


def query_trigrams(literal: bytes) -> list[bytes]:
    """query_trigrams returns the distinct folded trigrams of `literal` that the index holds, ascending."""
    return [trigram_bytes(int(t)) for t in sorted_trigrams(literal)]


def trigram_set(ids: Iterable[int]) -> set[bytes]:
    """trigram_set converts trigram ids to a set of three-byte strings (for tests and diagnostics)."""
    return {trigram_bytes(int(t)) for t in ids}
