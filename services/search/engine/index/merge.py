"""merge holds segment merging: the tiered merge policy and folding live documents into one new segment.

A merge reads the live documents of its source segments (content straight from the mapped
files, symbol records and content hashes copied as stored), re-extracts their trigrams and
writes one new segment, so deleted documents disappear and ordinals become dense again. The
index writer publishes the result in place of the sources; snapshots holding the sources keep
them until closed (index.py).

Re-extracting trigrams is simpler than unioning remapped posting lists and costs the same as
the original build (about 70 MB/s per core for extraction); merges only run over small
segments or ones with many deletions, so the amortised cost stays low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.search.engine.index.builder import BuiltSegment, PendingDoc, build_segment
from services.search.engine.index.format import HEADER_SIZE
from services.search.engine.index.reader import SegmentReader


@dataclass(frozen=True, slots=True)
class SegmentSize:
    """SegmentSize is what the merge policy knows of a segment."""

    name: str
    doc_count: int
    live_count: int
    content_bytes: int

    @property
    def live_bytes(self) -> int:
        """live_bytes estimates the content bytes of live documents (deletions assumed average-sized)."""
        if self.doc_count == 0:
            return 0
        return self.content_bytes * self.live_count // self.doc_count


@dataclass(frozen=True, slots=True)
class TieredMergePolicy:
    """TieredMergePolicy keeps the segment count logarithmic in the number of small writes.

    Segments are grouped into tiers by live content size: tier t holds sizes in
    [floor * factor^t, floor * factor^(t+1)), everything below `floor_bytes` counting as tier 0,
    with factor = `segments_per_tier`. When a tier holds `segments_per_tier` segments, the
    smallest of them are merged into one segment of the next tier, so at most
    ``segments_per_tier - 1`` segments stay per tier.

    A merge never produces a segment above `max_segment_bytes`, and segments already past half
    of it are left alone: with the writer's default flush size (64 MiB) segments from a bulk
    build are final, so building never re-reads what it just wrote (a merge re-extracts
    trigrams at build speed). Small commits therefore add at most
    ``(segments_per_tier - 1) * log_factor(max_segment_bytes / floor_bytes)`` segments (14 with
    the defaults) on top of the full-size ones. Any segment with more than `expunge_ratio` of
    its documents deleted is rewritten on its own.
    """

    segments_per_tier: int = 8
    floor_bytes: int = 4 << 20
    max_segment_bytes: int = 64 << 20
    expunge_ratio: float = 0.5

    def tier(self, size: SegmentSize) -> int:
        """tier returns the size tier of a segment."""
        ratio = max(size.live_bytes, self.floor_bytes) / self.floor_bytes
        return int(math.log(ratio, self.segments_per_tier))

    def select(self, sizes: Sequence[SegmentSize]) -> list[str] | None:
        """select names the segments to merge next, in index order, or None when the shape is fine."""
        for size in sizes:
            if size.doc_count and size.live_count <= size.doc_count * (1 - self.expunge_ratio):
                return [size.name]
        tiers: dict[int, list[SegmentSize]] = {}
        for size in sizes:
            if 2 * size.live_bytes < self.max_segment_bytes:
                tiers.setdefault(self.tier(size), []).append(size)
        for tier in sorted(tiers):
            members = tiers[tier]
            if len(members) < self.segments_per_tier:
                continue
            chosen: set[str] = set()
            total = 0
            for size in sorted(members, key=lambda s: (s.live_bytes, s.name))[: self.segments_per_tier]:
                if chosen and total + size.live_bytes > self.max_segment_bytes:
                    break
                chosen.add(size.name)
                total += size.live_bytes
            if len(chosen) >= 2:
                return [s.name for s in sizes if s.name in chosen]
        return None


def merge_pending(readers: Sequence[SegmentReader], first_seq: int = 0) -> list[PendingDoc]:
    """merge_pending lists the live documents of `readers`, in segment then ordinal order.

    Content and symbol blobs are zero-copy views of the mapped files, read through the
    lazily verified regions, so a corrupt source block fails the merge instead of spreading.
    """
    docs: list[PendingDoc] = []
    seq = first_seq
    for reader in readers:
        data = reader.data
        live = reader.live
        records = data.records_of(np.array(live.to_array(), dtype=np.int64))
        for rec, ordinal in zip(records, live, strict=True):
            meta = data.doc(ordinal)
            start = HEADER_SIZE + int(rec["symbols_off"])
            blob = data.parts["symbols.bin"].region(start, start + int(rec["symbols_len"]))
            docs.append(
                PendingDoc(
                    seq,
                    meta.external_id,
                    meta.path,
                    meta.repository,
                    meta.language,
                    data.content(ordinal),
                    blob,
                    int(rec["symbol_count"]),
                    bytes(rec["hash"]),
                    None,
                )
            )
            seq += 1
    return docs


def merge_segments(readers: Sequence[SegmentReader], dest: Path, *, durable: bool = True) -> BuiltSegment:
    """merge_segments writes the live documents of `readers` as one new segment in `dest`."""
    return build_segment(dest, merge_pending(readers), None, durable=durable)


def sizes_of(readers: Sequence[SegmentReader]) -> list[SegmentSize]:
    """sizes_of describes segment readers for the merge policy."""
    return [SegmentSize(r.name, r.doc_count, r.live_count, r.data.content_bytes) for r in readers]
