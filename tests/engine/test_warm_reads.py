"""Warm reads: what a segment remembers it has checked, and the first page's shortcuts that rely on it.

Every byte is still checked before use; these tests pin that the remembered checks (verified
blocks, checked posting lists, a checked document table) neither skip a check that has not
happened nor change any result.
"""

from __future__ import annotations

import array
import functools
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from services.search.engine import _fastscan
from services.search.engine.index.build import build_index
from services.search.engine.index.format import (
    BLOCK_SIZE,
    HEADER_SIZE,
    IndexCorruptError,
)
from services.search.engine.index.index import Index
from services.search.engine.index.reader import SegmentData
from services.search.engine.index.trigrams import trigram_id
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument
from services.search.engine.search.results import SearchMode
from services.search.engine.search.searcher import Searcher
from tests.engine.segments import rewrite_part

GOLDEN_CORPUS = Path(__file__).parent / "goldens" / "corpus"


def build(root: Path, docs: list[tuple[str, bytes]]) -> Path:
    index = Index.create(root)
    with IndexWriter(index) as writer:
        for external_id, content in docs:
            assert writer.add(SourceDocument(external_id, external_id, content)) is None
        writer.commit()
    return root / index.manifest.segments[0].name


def test_intersect_equals_the_plain_intersection(tmp_path: Path) -> None:
    docs = [
        (f"d{i}", f"alpha {'beta' if i % 2 else ''} {'gamma' if i % 3 else ''} doc{i}".encode())
        for i in range(40)
    ]
    data = SegmentData(build(tmp_path / "idx", docs))
    for grams in ([b"alp"], [b"alp", b"bet"], [b"bet", b"gam", b"alp"], [b"gam", b"doc", b"oc1"]):
        expected = functools.reduce(lambda a, b: a & b, (data.postings(g) for g in grams))
        assert data.intersect(grams) == expected
    assert data.intersect([b"alp", b"zzz"]) == BitMap()
    with pytest.raises(ValueError):
        data.intersect([])
    with pytest.raises(IndexError):
        data.postings_at(data.trigram_count)


def test_intersect_verifies_the_dictionary_entries_it_uses(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", [("one", b"abcdef"), ("two", b"bcdefg")])
    raw = bytearray((seg_dir / "dict.bin").read_bytes())
    raw[HEADER_SIZE] ^= 0x01  # the first trigram id
    (seg_dir / "dict.bin").write_bytes(bytes(raw))
    data = SegmentData(seg_dir)
    with pytest.raises(IndexCorruptError) as err:
        data.intersect([b"bcd", b"abc"])
    assert err.value.path == str(seg_dir / "dict.bin") and "block" in err.value.detail


def test_a_posting_list_past_the_table_is_rejected_on_every_read_until_checked(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", [("one", b"abcdef"), ("two", b"bcdefg")])
    data = SegmentData(seg_dir)
    i = data.trigram_ids.tolist().index(trigram_id(b"bcd"))
    start = HEADER_SIZE + int(data.postings_offsets[i])
    end = HEADER_SIZE + int(data.postings_offsets[i + 1])
    assert end - start == len(BitMap([0, 1]).serialize())
    # Same length, ordinals 0 and 7 (past a two-document table), checksums rewritten.
    raw = bytearray((seg_dir / "postings.bin").read_bytes())
    raw[start:end] = BitMap([0, 7]).serialize()
    rewrite_part(seg_dir, "postings.bin", bytes(raw))
    data = SegmentData(seg_dir)
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(IndexCorruptError, match="past the table"):
            data.intersect([b"bcd"])


def test_a_part_counts_down_its_unverified_blocks_and_still_checks_bounds(tmp_path: Path) -> None:
    docs = [(f"d{i}", (f"line {i} of document d{i}\n" * 4000).encode()) for i in range(3)]
    seg_dir = build(tmp_path / "idx", docs)
    data = SegmentData(seg_dir)
    part = data.parts["content.bin"]
    blocks = len(part.verified_blocks)
    assert blocks > 2 and part.unverified == blocks
    part.region(0, 10)
    part.region(5, 20)  # the same block again
    assert part.unverified == blocks - 1
    for ordinal in range(3):
        data.content(ordinal)
    assert part.unverified == 0 and all(part.verified_blocks)
    with pytest.raises(IndexCorruptError, match="outside the file"):
        part.region(0, part.info.size + 1)
    with pytest.raises(IndexCorruptError, match="outside the file"):
        part.record(part.info.size - 4, 8)


def test_a_record_across_a_block_boundary_verifies_both_blocks(tmp_path: Path) -> None:
    docs = [(f"d{i}", (f"line {i} of document d{i}\n" * 4000).encode()) for i in range(3)]
    seg_dir = build(tmp_path / "idx", docs)
    raw = bytearray((seg_dir / "content.bin").read_bytes())
    raw[BLOCK_SIZE + 100] ^= 0x01  # inside the second block, outside the record below
    (seg_dir / "content.bin").write_bytes(bytes(raw))
    part = SegmentData(seg_dir).parts["content.bin"]
    part.record(BLOCK_SIZE - 40, 20)  # first block only: fine
    with pytest.raises(IndexCorruptError, match="block 1"):
        part.record(BLOCK_SIZE - 8, 16)
    assert part.verified_blocks[0] == 1 and part.verified_blocks[1] == 0


def test_facts_read_the_same_before_and_after_the_table_is_checked(tmp_path: Path) -> None:
    docs = [(f"{d}/f{i}.py", f"x = {i}\n".encode()) for i in range(30) for d in ("src", "tests")]
    data = SegmentData(build(tmp_path / "idx", docs))
    ordinals = list(range(data.doc_count))
    first = data.facts(ordinals[::7])
    every = data.facts(ordinals)
    assert data.facts(ordinals[::7]) == first == every[::7]
    assert list(every) == [data.doc_facts(o, b"") for o in ordinals]
    assert data.facts([]) == b""
    # A roaring bitmap's uint32 array and an int64 array read the same records as a list.
    assert data.facts(array.array("I", ordinals)) == data.facts(array.array("q", ordinals)) == every
    with pytest.raises(TypeError, match="int64 or uint32"):
        _fastscan.record_facts(b"\0" * 200, array.array("h", [0]), 0, 80, 44, 0)
    for bad in ([-1], [data.doc_count], [0, data.doc_count]):
        with pytest.raises(IndexError, match="out of range"):
            data.facts(bad)


def test_a_record_without_facts_is_reported_when_read(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", [("a.txt", b"one"), ("b.txt", b"two")])
    raw = bytearray((seg_dir / "docs.bin").read_bytes())
    struct.pack_into("<I", raw, HEADER_SIZE + 80 + 44, 0)  # the second record's facts field
    rewrite_part(seg_dir, "docs.bin", bytes(raw))
    data = SegmentData(seg_dir)
    with pytest.raises(IndexCorruptError, match="no facts"):
        data.doc_facts(1, b"")
    assert data.facts([0]) == bytes([data.doc_facts(0, b"")])
    with pytest.raises(IndexCorruptError, match="no facts"):
        data.facts([0, 1])


@pytest.fixture(scope="module")
def golden_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    out = tmp_path_factory.mktemp("golden") / "index"
    build_index(GOLDEN_CORPUS, out, repository="kota/goldens", workers=1)
    with Index.open(out) as index:
        yield index


@pytest.mark.parametrize("query", ["parser", "parse_config", "Parser", "def", "(?i)PARSE", r"\bparse\w*\("])
@pytest.mark.parametrize("mode", [SearchMode.FIRST_PAGE, SearchMode.EXHAUSTIVE])
def test_a_sole_content_term_ranks_as_the_whole_tree_does(
    golden_index: Index, query: str, mode: SearchMode
) -> None:
    fast = Searcher(golden_index)
    assert fast.compiled(query, True).sole_matcher is not None
    slow = Searcher(golden_index)
    slow.compiled(query, True).sole_matcher = None  # the cached tree: every search evaluates it
    for limit in (2, 50):
        one = fast.search(query, regex=True, limit_files=limit, mode=mode, context_lines=1)
        other = slow.search(query, regex=True, limit_files=limit, mode=mode, context_lines=1)
        assert one.files == other.files and one.files
        assert (one.file_count, one.match_count, one.next_cursor is None) == (
            other.file_count,
            other.match_count,
            other.next_cursor is None,
        )
