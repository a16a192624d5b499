"""SegmentReader.symbol_spans: the undecoded view of a document's symbols agrees with `symbols`."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pyroaring import FrozenBitMap

from services.search.engine.index.format import (
    DOC_RECORD_SIZE,
    HEADER_SIZE,
    SYMBOL_RECORD,
    IndexCorruptError,
)
from services.search.engine.index.index import Index
from services.search.engine.index.reader import SegmentData, SegmentReader
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument, Symbol
from tests.engine.segments import rewrite_part

PARSER = (
    Symbol("Parser", "class", "Parser", 1, 9, 6, 12),
    Symbol("parse", "method", "Parser.parse", 2, 4, 25, 30, "Parser"),
    Symbol("ünïcode", "method", "Parser.ünïcode", 5, 9, 60, 69, "Parser"),
)


def _segment(root: Path) -> SegmentReader:
    index = Index.create(root)
    with IndexWriter(index) as writer:
        content = b"class Parser:\n    def parse(self): ...\n"
        assert writer.add(SourceDocument("with", "parser.py", content, symbols=PARSER)) is None
        assert writer.add(SourceDocument("without", "notes.txt", b"no definitions here")) is None
        writer.commit()
    data = SegmentData(root / index.manifest.segments[0].name)
    return SegmentReader(data, FrozenBitMap(range(data.doc_count)))


def _ordinal(segment: SegmentReader, external_id: str) -> int:
    return next(i for i in range(segment.doc_count) if segment.doc(i).external_id == external_id)


def test_spans_and_decoded_symbols_match_the_stored_records(tmp_path: Path) -> None:
    segment = _segment(tmp_path / "idx")
    ordinal = _ordinal(segment, "with")
    spans = segment.symbol_spans(ordinal)
    assert spans.count == 3
    stored = [tuple(fields[:4]) for fields in SYMBOL_RECORD.iter_unpack(spans.records)]
    assert stored == [(s.start_line, s.end_line, s.start_byte, s.end_byte) for s in PARSER]
    assert tuple(spans.symbol(i) for i in range(spans.count)) == segment.symbols(ordinal) == PARSER
    with pytest.raises(IndexError):
        spans.symbol(3)


def test_a_document_without_symbols_has_no_spans(tmp_path: Path) -> None:
    segment = _segment(tmp_path / "idx")
    spans = segment.symbol_spans(_ordinal(segment, "without"))
    assert spans.count == 0 and not spans.records
    with pytest.raises(IndexError):
        spans.symbol(0)
    with pytest.raises(IndexError):
        segment.symbol_spans(segment.doc_count)


def test_truncated_records_are_corruption(tmp_path: Path) -> None:
    segment = _segment(tmp_path / "idx")
    ordinal = _ordinal(segment, "with")
    # A symbols_len shorter than the fixed-size records it must hold, with checksums that
    # match (a writer bug, not bit rot): the record is read from the file itself.
    seg_dir = segment.data.path
    raw = bytearray((seg_dir / "docs.bin").read_bytes())
    struct.pack_into("<I", raw, HEADER_SIZE + DOC_RECORD_SIZE * ordinal + 36, 8)  # symbols_len
    rewrite_part(seg_dir, "docs.bin", bytes(raw))
    # Matched on the message, not only the word: the test's own temporary path says "truncated".
    with pytest.raises(IndexCorruptError, match=f"symbol records of document {ordinal} are truncated"):
        SegmentData(seg_dir).symbol_spans(ordinal)
