"""Tests for SegmentReader: lookups, bounds, and block-wise lazy verification of the large parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.search.engine.index.format import (
    BLOCK_SIZE,
    HEADER_SIZE,
    IndexCorruptError,
)
from services.search.engine.index.index import Index
from services.search.engine.index.reader import SegmentData
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument
from tests.engine.segments import rewrite_part


def build(root: Path, docs: list[tuple[str, bytes]]) -> Path:
    index = Index.create(root)
    with IndexWriter(index) as writer:
        for external_id, content in docs:
            assert writer.add(SourceDocument(external_id, external_id, content)) is None
        writer.commit()
    return root / index.manifest.segments[0].name


def big_docs() -> list[tuple[str, bytes]]:
    # Three documents of 100 KB each, so they span at least three 128 KiB content blocks.
    return [(f"d{i}", (f"line {i} of document d{i}\n" * 4000).encode()) for i in range(3)]


def test_lookups_and_bounds(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", [("one", b"needle in hay"), ("two", b"hay only")])
    data = SegmentData(seg_dir)
    assert data.doc_count == 2 and data.name == seg_dir.name
    assert set(data.postings(b"nee")) == {0}
    assert set(data.postings(b"hay")) == {0, 1}
    assert not data.postings(b"\xff\xff\xff")
    assert not data.postings(b"\x00\x00\x00")
    assert isinstance(data.content(1), memoryview)
    assert data.external_ids == ("one", "two")
    with pytest.raises(IndexError):
        data.doc(2)
    with pytest.raises(IndexError):
        data.content(-1)
    with pytest.raises(ValueError):
        data.postings(b"ab")


def test_content_is_verified_lazily_per_block(tmp_path: Path) -> None:
    docs = big_docs()
    seg_dir = build(tmp_path / "idx", docs)
    content = seg_dir / "content.bin"
    raw = bytearray(content.read_bytes())
    # Damage the last document only: its bytes sit in the file's last block.
    raw[-10] ^= 0x01
    content.write_bytes(bytes(raw))
    assert len(raw) > 2 * BLOCK_SIZE
    data = SegmentData(seg_dir)  # opening does not read content.bin in full
    assert bytes(data.content(0)) == docs[0][1]
    with pytest.raises(IndexCorruptError) as err:
        data.content(2)
    assert err.value.path == str(content) and "block" in err.value.detail
    with pytest.raises(IndexCorruptError):
        data.verify()


def test_verified_blocks_are_remembered(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", big_docs())
    data = SegmentData(seg_dir)
    first = bytes(data.content(0))
    part = data.parts["content.bin"]
    verified_before = bytes(part._verified)
    data.content(0)
    assert bytes(part._verified) == verified_before
    assert verified_before[0] == 1 and verified_before[-1] == 0
    assert first.startswith(b"line 0")


def test_a_table_pointing_outside_its_files_is_rejected_when_read(tmp_path: Path) -> None:
    seg_dir = build(tmp_path / "idx", [("one", b"abcdef")])
    # A wrong size field with a matching checksum (a writer bug, not bit rot) must still be
    # caught: rewrite docs.bin so a record claims more content than content.bin holds.
    docs = bytearray((seg_dir / "docs.bin").read_bytes())
    docs[HEADER_SIZE + 8] = 200
    rewrite_part(seg_dir, "docs.bin", bytes(docs))
    data = SegmentData(seg_dir)  # opening reads no table in full (format.py)
    with pytest.raises(IndexCorruptError) as err:
        data.content(0)
    assert err.value.path == str(seg_dir / "content.bin") and "outside the file" in err.value.detail
    with pytest.raises(IndexCorruptError) as err:
        data.verify()
    assert err.value.path == str(seg_dir / "docs.bin")


@pytest.mark.parametrize("part", ["docs.bin", "dict.bin"])
def test_tables_are_verified_per_block_when_first_read(tmp_path: Path, part: str) -> None:
    seg_dir = build(tmp_path / "idx", [("one", b"abcdef"), ("two", b"bcdefg")])
    raw = bytearray((seg_dir / part).read_bytes())
    raw[HEADER_SIZE] ^= 0x01  # the first document record / the first trigram id
    (seg_dir / part).write_bytes(bytes(raw))
    data = SegmentData(seg_dir)  # opening does not checksum the tables
    with pytest.raises(IndexCorruptError) as err:
        if part == "docs.bin":
            data.doc(0)
        else:
            data.postings(b"abc")
    assert err.value.path == str(seg_dir / part) and "block" in err.value.detail


def test_segment_without_trigrams(tmp_path: Path) -> None:
    # Documents too short for a trigram, or made of newlines only, still round-trip.
    seg_dir = build(tmp_path / "idx", [("short", b"ab"), ("lines", b"\n\n\n\n")])
    data = SegmentData(seg_dir)
    assert data.trigram_count == 0
    assert not data.postings(b"abc")
    assert bytes(data.content(0)) == b"ab" and bytes(data.content(1)) == b"\n\n\n\n"
    data.verify()
