"""reader holds read access to one segment: the trigram dictionary, postings, documents, content, symbols.

The layout and what is verified when are described in format.py. `SegmentData` is the opened,
shared, immutable part (memory maps); `SegmentReader` pairs it with the live-document bitmap of
one snapshot, so two snapshots can see different deletions of the same segment.
"""

from __future__ import annotations

import array
import bisect
import functools
import itertools
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pyroaring import BitMap, FrozenBitMap

from services.search.engine import _fastscan
from services.search.engine.index.format import (
    DOC_RECORD,
    DOC_RECORD_SIZE,
    FACT_PRESENT,
    HEADER,
    HEADER_SIZE,
    LAZY_PARTS,
    MAGIC_DELETED,
    META_FILE,
    PART_FILES,
    SYMBOL_RECORD,
    V1_BLOCK_SIZE,
    V1_LAZY_PARTS,
    IndexCorruptError,
    MappedPart,
    PartInfo,
    check_version,
    dict_padding,
    load_checked_json,
)
from services.search.engine.index.trigrams import trigram_id
from services.search.engine.model import Symbol
from services.search.engine.record import Record

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

_CONTENT_SPAN = struct.Struct("<QQ")
_SYMBOLS_SPAN, _SYMBOLS_AT = struct.Struct("<Q4xII"), 24  # symbols_off, symbols_len, symbol_count
_FACTS, _FACTS_AT = struct.Struct("<I"), 44  # the facts field of a document record (DOC_RECORD)
_STRINGS_SPAN = struct.Struct("<Q")
_STRINGS_LEN = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"  # the format is little-endian; native views need a copy there


class DocRecord(Record):
    """DocRecord is one row of a segment's document table; `content_hash` is the hex sha256 of the content."""

    external_id: str
    path: str
    repository: str
    language: str
    size: int
    content_hash: str


class SymbolScreen(Record):
    """SymbolScreen is what a symbol search's candidates are screened by, natively, before decoding.

    A symbol whose name or qualified name holds `needle` (ASCII case folding) is kept, and
    with a native `regex` (`_fastscan.regex_compile`) one whose name (qualified name with
    `qualified`) it matches, tried only where `guard` is held like the needle; a name with a
    non-ASCII byte is always kept (`_fastscan.symbol_hits`).
    """

    needle: str | None
    regex: object = None
    qualified: bool = False
    guard: str | None = None


class SymbolSpans:
    """SymbolSpans is one document's symbols.bin block, read without decoding any string.

    `records` are its `count` fixed-size records (format.py's symbols.bin layout), a view of
    the mapped file, each starting with `start_line, end_line, start_byte, end_byte`: what
    ranking checks for every matching file, natively (rank.SymbolTable). `symbol(i)` decodes
    the i-th full record, which only a reported enclosing definition needs.
    """

    __slots__ = ("_offsets", "_raw", "count")

    def __init__(self, raw: memoryview, count: int) -> None:
        self._raw = raw
        self._offsets: list[int] | None = None
        self.count = count

    @property
    def records(self) -> memoryview:
        """records is the block's `count` fixed-size records (SYMBOL_RECORD), strings excluded."""
        return self._raw[: self.count * SYMBOL_RECORD.size]

    def symbol(self, i: int) -> Symbol:
        """symbol decodes the i-th symbol record with its strings (IndexError when out of range)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._offsets is None:
            # Where each record's strings start: computed once, for every symbol decoded later.
            self._offsets = [
                0,
                *itertools.accumulate(sum(f[4:]) for f in SYMBOL_RECORD.iter_unpack(self.records)),
            ]
        at = self.count * SYMBOL_RECORD.size + self._offsets[i]
        start_line, end_line, start_byte, end_byte, *lengths = SYMBOL_RECORD.unpack_from(
            self._raw, i * SYMBOL_RECORD.size
        )
        texts: list[str] = []
        for length in lengths:
            texts.append(bytes(self._raw[at : at + length]).decode("utf-8", "replace"))
            at += length
        name, kind, qualified, parent = texts
        return Symbol(name, kind, qualified, start_line, end_line, start_byte, end_byte, parent)


class SegmentData:
    """SegmentData is an opened segment directory: checked metadata and memory-mapped parts.

    Opening verifies meta.json, every part's size and header, and the crc32 of dict.bin and
    docs.bin; postings, content and symbols are verified block by block on first read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        meta_path = path / META_FILE
        try:
            meta = load_checked_json(meta_path)
        except FileNotFoundError as exc:
            raise IndexCorruptError(meta_path, "missing") from exc
        try:
            self.doc_count = int(meta["doc_count"])
            self.trigram_count = int(meta["trigram_count"])
            self.content_bytes = int(meta["content_bytes"])
            self.format = int(meta["format"])
            self.block_size = int(meta.get("block_size", V1_BLOCK_SIZE))
            parts = meta["parts"]
            infos = {name: PartInfo.from_json(meta_path, parts[name], self.format) for name in PART_FILES}
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(meta_path, f"missing or malformed field: {exc}") from exc
        if self.block_size < 1024 or self.block_size & (self.block_size - 1):
            raise IndexCorruptError(meta_path, f"invalid block size {self.block_size}")
        lazy = LAZY_PARTS if self.format >= 2 else V1_LAZY_PARTS
        self.parts = {
            name: MappedPart(path / name, magic, infos[name], lazy=name in lazy, block_size=self.block_size)
            for name, magic in PART_FILES.items()
        }
        self._dict = self.parts["dict.bin"]
        self._postings = self.parts["postings.bin"]
        self._docs = self.parts["docs.bin"]
        self._content = self.parts["content.bin"]
        self._symbols = self.parts["symbols.bin"]
        self._check_counts()
        n = self.trigram_count
        ids_end = HEADER_SIZE + 4 * n
        offsets_start = ids_end + dict_padding(n)
        self._ids_end = ids_end
        self._offsets_start = offsets_start
        # Point lookups go through typed memoryviews and bisect: 0.4 us per lookup, against
        # 11 us for np.searchsorted with a Python int (numpy casts the whole array to int64).
        # numpy views of the tables (trigram_ids, postings_offsets, records) are made on first
        # use: a query that only streams matches never imports numpy (~100 ms of a CLI run).
        self._id_view: Sequence[int] = (
            self.trigram_ids.tolist() if _BIG_ENDIAN else self._dict.view[HEADER_SIZE:ids_end].cast("I")
        )
        self._offset_view: Sequence[int] = (
            self.postings_offsets.tolist()
            if _BIG_ENDIAN
            else self._dict.view[offsets_start : offsets_start + 8 * (n + 1)].cast("Q")
        )
        self._strings_base = HEADER_SIZE + DOC_RECORD_SIZE * self.doc_count
        # One byte per posting list: 1 once its ordinals were checked against the table.
        self._lists_checked = bytearray(n)
        # Version 1 stored no facts: they are worked out per ordinal when a query first needs them.
        self.stores_facts = self.format >= 2
        self._worked_facts: dict[int, int] = {}
        if not self._docs.lazy:
            # Version 1: the tables were verified whole above, so check their offsets now.
            self._check_tables()

    @functools.cached_property
    def trigram_ids(self) -> NDArray[np.uint32]:
        """trigram_ids is dict.bin's ascending id array as a numpy view (read unverified: see format.py)."""
        import numpy as np

        ids: NDArray[np.uint32] = np.frombuffer(
            self._dict.view, dtype="<u4", count=self.trigram_count, offset=HEADER_SIZE
        )
        return ids

    @functools.cached_property
    def postings_offsets(self) -> NDArray[np.uint64]:
        """postings_offsets is dict.bin's offset array as a numpy view."""
        import numpy as np

        offsets: NDArray[np.uint64] = np.frombuffer(
            self._dict.view, dtype="<u8", count=self.trigram_count + 1, offset=self._offsets_start
        )
        return offsets

    @functools.cached_property
    def records(self) -> NDArray[np.void]:
        """records is docs.bin's document table as a numpy structured view (see records_of)."""
        import numpy as np

        dtype = np.dtype(
            [
                ("content_off", "<u8"),
                ("size", "<u8"),
                ("strings_off", "<u8"),
                ("symbols_off", "<u8"),
                ("strings_len", "<u4"),
                ("symbols_len", "<u4"),
                ("symbol_count", "<u4"),
                ("facts", "<u4"),
                ("hash", "S32"),
            ]
        )
        rows: NDArray[np.void] = np.frombuffer(
            self._docs.view, dtype=dtype, count=self.doc_count, offset=HEADER_SIZE
        )
        return rows

    def _check_counts(self) -> None:
        expected = {
            "dict.bin": self.trigram_count,
            "postings.bin": self.trigram_count,
            "docs.bin": self.doc_count,
            "content.bin": self.doc_count,
        }
        for name, count in expected.items():
            if self.parts[name].count != count:
                raise IndexCorruptError(self.path / name, f"header count {self.parts[name].count} != {count}")
        n = self.trigram_count
        if self._dict.info.size != HEADER_SIZE + 4 * n + dict_padding(n) + 8 * (n + 1):
            raise IndexCorruptError(self._dict.path, "size does not match its trigram count")
        if self._docs.info.size < HEADER_SIZE + DOC_RECORD_SIZE * self.doc_count:
            raise IndexCorruptError(self._docs.path, "shorter than its document table")

    def _check_tables(self) -> None:
        import numpy as np

        # Whole-array consistency checks of verified tables (version 1 at open; verify() always).
        # Every offset is also bounds-checked where it is used (MappedPart.region).
        ids = self.trigram_ids
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            raise IndexCorruptError(self._dict.path, "trigram ids are not strictly ascending")
        offs = self.postings_offsets
        if len(offs) and (offs[0] != 0 or bool(np.any(offs[1:] < offs[:-1]))):
            raise IndexCorruptError(self._dict.path, "posting offsets are not ascending")
        if len(offs) and int(offs[-1]) != self._postings.info.size - HEADER_SIZE:
            raise IndexCorruptError(self._dict.path, "posting offsets do not cover postings.bin")
        rec = self.records
        if len(rec):
            if int((rec["content_off"] + rec["size"]).max()) > self._content.info.size - HEADER_SIZE:
                raise IndexCorruptError(self._docs.path, "a document points past the end of content.bin")
            if int((rec["symbols_off"] + rec["symbols_len"]).max()) > self._symbols.info.size - HEADER_SIZE:
                raise IndexCorruptError(self._docs.path, "a document points past the end of symbols.bin")
            strings_end = int((rec["strings_off"] + rec["strings_len"]).max())
            if self._strings_base + strings_end > self._docs.info.size:
                raise IndexCorruptError(self._docs.path, "a document's strings run past the end of the file")
            if self.stores_facts:
                self._check_facts(rec["facts"])

    def _check_facts(self, facts: NDArray[np.uint32]) -> None:
        if not bool((facts & FACT_PRESENT).all()):
            raise IndexCorruptError(self._docs.path, "a document record carries no facts")

    def verify(self) -> None:
        """verify checks every part's whole-file checksum and the tables' offsets now (IndexCorruptError)."""
        for part in self.parts.values():
            part.verify()
        self._check_tables()

    def postings(self, tri: bytes) -> BitMap:
        """postings returns the ordinals of documents containing trigram `tri` (looked up as given)."""
        return self.intersect((tri,))

    def _verify_entry(self, i: int) -> None:
        # The bisection probes read unverified ids; the entry used and its offsets are verified.
        self._dict.record(HEADER_SIZE + 4 * i, 4)
        self._dict.record(self._offsets_start + 8 * i, 16)

    def intersect(self, grams: Sequence[bytes]) -> BitMap:
        """intersect returns the ordinals containing every trigram of `grams` (deleted ones included).

        All are looked up before any list is decoded (a missing one costs no decoding), then
        decoded shortest first (an intersection that empties early skips the long ones).
        """
        if not grams:
            raise ValueError("intersect needs at least one trigram")
        ids, offsets, bisect_left, part = self._id_view, self._offset_view, bisect.bisect_left, self._dict
        n, verified, size, offsets_at = len(ids), part.verified_blocks, part.block_size, self._offsets_start
        found: list[tuple[int, int]] = []
        for tri in grams:
            tid = trigram_id(tri)
            i = bisect_left(ids, tid)
            if i >= n:
                return BitMap()
            # _verify_entry unless the blocks of the id (4-aligned: one block) and of the two
            # offsets (16 bytes: at most two blocks) are verified already.
            if part.unverified and not (
                verified[(HEADER_SIZE + 4 * i) // size]
                and verified[(offsets_at + 8 * i) // size]
                and verified[(offsets_at + 8 * i + 15) // size]
            ):
                self._verify_entry(i)
            if ids[i] != tid:
                return BitMap()
            found.append((offsets[i + 1] - offsets[i], i))
        found.sort()
        result = self.postings_at(found[0][1])
        for _, i in found[1:]:
            if not result:
                break
            result &= self.postings_at(i)  # each list is decoded afresh: in place is safe
        return result

    def postings_at(self, i: int) -> BitMap:
        """postings_at decodes posting list `i`; its ordinals are checked against the table on first read."""
        if not 0 <= i < self.trigram_count:
            raise IndexError(f"posting list {i} out of range for {self.name} ({self.trigram_count} lists)")
        start = HEADER_SIZE + self._offset_view[i]
        end = HEADER_SIZE + self._offset_view[i + 1]
        try:
            bitmap = BitMap.deserialize(self._postings.region(start, end))  # type: ignore[arg-type]
        except (ValueError, MemoryError) as exc:
            raise IndexCorruptError(self._postings.path, f"undecodable posting list {i}: {exc}") from exc
        if not self._lists_checked[i]:
            if len(bitmap) and bitmap.max() >= self.doc_count:
                detail = f"posting list {i} names an ordinal past the table"
                raise IndexCorruptError(self._postings.path, detail)
            self._lists_checked[i] = 1
        return bitmap

    def _check_ordinal(self, ordinal: int) -> None:
        if not 0 <= ordinal < self.doc_count:
            raise IndexError(f"ordinal {ordinal} out of range for {self.name} ({self.doc_count} documents)")

    def names(self, ordinal: int) -> tuple[str, str, str]:
        """names returns (external_id, path, repository) of `ordinal`: doc without the rest."""
        self._check_ordinal(ordinal)
        record = self._record(ordinal)
        strings_off, strings_len = _STRINGS_SPAN.unpack_from(record, 16), _STRINGS_LEN.unpack_from(record, 32)
        start = self._strings_base + strings_off[0]
        raw = bytes(self._docs.region(start, start + strings_len[0]))
        try:
            external_id, path, repository, _ = raw.decode().split("\0")
        except ValueError as exc:
            raise IndexCorruptError(self._docs.path, f"malformed strings of document {ordinal}") from exc
        return external_id, path, repository

    def doc(self, ordinal: int) -> DocRecord:
        """doc returns the document table row of `ordinal`."""
        self._check_ordinal(ordinal)
        # struct over the mapped table: 3x faster than numpy structured scalars per field.
        _, size, strings_off, _, strings_len, _, _, _, digest = DOC_RECORD.unpack_from(self._record(ordinal))
        start = self._strings_base + strings_off
        raw = bytes(self._docs.region(start, start + strings_len))
        try:
            external_id, path, repository, language = raw.decode().split("\0")
        except ValueError as exc:
            raise IndexCorruptError(self._docs.path, f"malformed strings of document {ordinal}") from exc
        return DocRecord(external_id, path, repository, language, size, digest.hex())

    def _record(self, ordinal: int) -> memoryview:
        return self._docs.record(HEADER_SIZE + DOC_RECORD_SIZE * ordinal, DOC_RECORD_SIZE)

    def records_of(self, ordinals: NDArray[np.int64]) -> NDArray[np.void]:
        """records_of returns the table rows of `ordinals`, their blocks verified."""
        self._check_records(ordinals)
        rows: NDArray[np.void] = self.records[ordinals]
        return rows

    def _check_records(self, ordinals: NDArray[np.int64]) -> None:
        if len(ordinals) and (int(ordinals.min()) < 0 or int(ordinals.max()) >= self.doc_count):
            raise IndexError(f"ordinal out of range for {self.name} ({self.doc_count} documents)")
        self._docs.check_records(HEADER_SIZE + DOC_RECORD_SIZE * ordinals, DOC_RECORD_SIZE)

    def facts(self, ordinals: Sequence[int]) -> bytes:
        """facts returns the `facts` bits (format.py) of each ordinal, one byte each, for candidate weights.

        Version 2 segments read them from the document table in one native call
        (`_fastscan.record_facts`), the table's blocks verified first (once: the whole table,
        as `content_spans` does); a record without its facts marker is corruption. Version 1
        segments work out the path bits from each path (no content bit), once per ordinal,
        so a query pays only for its own candidates.
        """
        if not len(ordinals):
            return b""
        if self.stores_facts:
            try:
                return _fastscan.record_facts(
                    self._table(),
                    _ordinal_array(ordinals),
                    HEADER_SIZE,
                    DOC_RECORD_SIZE,
                    _FACTS_AT,
                    FACT_PRESENT,
                )
            except ValueError as exc:
                raise IndexCorruptError(self._docs.path, str(exc)) from exc
            except IndexError as exc:
                raise IndexError(
                    f"ordinal out of range for {self.name} ({self.doc_count} documents)"
                ) from exc
        from services.search.engine.index.facts import path_facts  # version 1 only: spare the import

        worked = self._worked_facts
        out = bytearray(len(ordinals))
        for i, ordinal in enumerate(ordinals):
            self._check_ordinal(ordinal)
            found = worked.get(ordinal)
            if found is None:
                found = worked[ordinal] = path_facts(self.doc(ordinal).path)
            out[i] = found
        return bytes(out)

    def doc_facts(self, ordinal: int, content: bytes | memoryview) -> int:
        """doc_facts returns every `facts` bit of one document; `content` is its stored content."""
        self._check_ordinal(ordinal)
        if self.stores_facts:
            # One record read with struct (called per matching file).
            (facts,) = _FACTS.unpack_from(self._record(ordinal), _FACTS_AT)
            if not facts & FACT_PRESENT:
                raise IndexCorruptError(self._docs.path, "a document record carries no facts")
            return int(facts & 0xFF)
        from services.search.engine.index.facts import content_facts  # version 1 only: spare the import

        return self.facts((ordinal,))[0] | content_facts(content)

    def content(self, ordinal: int) -> memoryview:
        """content returns the stored content of `ordinal` as a zero-copy view of the mapped file."""
        self._check_ordinal(ordinal)
        content_off, size = _CONTENT_SPAN.unpack_from(self._record(ordinal))
        start = HEADER_SIZE + content_off
        return self._content.region(start, start + size)

    def content_spans(self, ordinals: Sequence[int]) -> bytes:
        """content_spans returns where each ordinal's content lies: int64 (start, end) pairs of content.bin.

        It reads the ordinals' document records (their blocks verified) in one native call
        (`_fastscan.record_spans`), for a stream that counts a segment's candidates in
        batches; `verified_content` then checks a batch's content blocks.
        """
        return self._record_spans(ordinals, HEADER_SIZE, self._content, 0, 8, 8)

    def symbols_holding(
        self, ordinals: Sequence[int], screen: SymbolScreen
    ) -> list[tuple[int, list[Symbol]]]:
        """symbols_holding returns, per ordinal with any, the symbols `screen` keeps (see SymbolScreen).

        One native pass over the ordinals' symbol blocks (`_fastscan.symbol_hits`) screens
        them; only the symbols kept are decoded. Ordinals come back in the given order and
        symbols in stored order.
        """
        spans = self._record_spans(ordinals, HEADER_SIZE, self._symbols, _SYMBOLS_AT, _SYMBOLS_AT + 12, 4)
        self._symbols.check_spans(spans)
        data = self._symbols.view
        needle = None if screen.needle is None else screen.needle.encode("ascii")
        guard = None if screen.guard is None else screen.guard.encode("ascii")
        try:
            found = _fastscan.symbol_hits(data, spans, needle, screen.regex, screen.qualified, guard)
            hits = memoryview(found).cast("q")
        except ValueError as exc:
            raise IndexCorruptError(self._symbols.path, f"malformed symbols: {exc}") from exc
        out: list[tuple[int, list[Symbol]]] = []
        last = -1
        for at in range(0, len(hits), 4):
            index, _, record_at, strings_at = hits[at : at + 4]
            if index != last:
                out.append((ordinals[index], []))
                last = index
            try:
                out[-1][1].append(decode_symbol_at(data, record_at, strings_at)[0])
            except (ValueError, IndexError) as exc:
                detail = f"malformed symbols of document {ordinals[index]}"
                raise IndexCorruptError(self._symbols.path, detail) from exc
        return out

    def names_of(self, ordinals: Sequence[int]) -> list[tuple[str, str, str]]:
        """names_of returns `names` of each ordinal, their strings verified and decoded in native batches."""
        spans = self._record_spans(ordinals, self._strings_base, self._docs, 16, 32, 4)
        self._docs.check_spans(spans)
        try:
            found = cast("list[tuple[str, str, str]]", _fastscan.split_strings(self._docs.view, spans, 4, 3))
        except ValueError as exc:
            raise IndexCorruptError(self._docs.path, f"malformed strings of a document: {exc}") from exc
        return found

    def _table(self) -> memoryview:
        """_table is docs.bin's document table, verified whole (once): cheaper than finding which
        blocks a batch's records lie in. Native readers of it raise IndexError for an ordinal
        past it, as _check_ordinal does."""
        return self._docs.region(0, HEADER_SIZE + DOC_RECORD_SIZE * self.doc_count)

    def _record_spans(
        self,
        ordinals: Sequence[int],
        base: int,
        part: MappedPart,
        offset_at: int,
        size_at: int,
        size_bytes: int,
    ) -> bytes:
        if not len(ordinals):
            return b""
        try:
            return _fastscan.record_spans(
                self._table(),
                _ordinal_array(ordinals),
                HEADER_SIZE,
                DOC_RECORD_SIZE,
                base,
                part.info.size,
                offset_at,
                size_at,
                size_bytes,
            )
        except ValueError as exc:
            raise IndexCorruptError(
                self._docs.path, f"a document points past the end of {part.path.name}"
            ) from exc

    def verified_content(self, spans: bytes | memoryview) -> memoryview:
        """verified_content checks the content blocks `spans` cover and returns all of content.bin.

        The returned view is the whole mapped file; only the spans' bytes are verified.
        """
        self._content.check_spans(spans)
        return self._content.view

    def symbols(self, ordinal: int) -> tuple[Symbol, ...]:
        """symbols returns the symbol records stored for `ordinal`."""
        self._check_ordinal(ordinal)
        symbols_off, symbols_len, count = _SYMBOLS_SPAN.unpack_from(self._record(ordinal), _SYMBOLS_AT)
        if count == 0:
            return ()
        start = HEADER_SIZE + symbols_off
        blob = bytes(self._symbols.region(start, start + symbols_len))
        try:
            return decode_symbols(blob, count)
        except (ValueError, IndexError) as exc:
            raise IndexCorruptError(self._symbols.path, f"malformed symbols of document {ordinal}") from exc

    def symbol_spans(self, ordinal: int) -> SymbolSpans:
        """symbol_spans returns the symbols stored for `ordinal` as spans, strings decoded on demand."""
        self._check_ordinal(ordinal)
        symbols_off, symbols_len, count = _SYMBOLS_SPAN.unpack_from(self._record(ordinal), _SYMBOLS_AT)
        start = HEADER_SIZE + symbols_off
        end = start + symbols_len if count else start
        if count * SYMBOL_RECORD.size > end - start:
            raise IndexCorruptError(self._symbols.path, f"symbol records of document {ordinal} are truncated")
        return SymbolSpans(self._symbols.region(start, end), count)

    @functools.cached_property
    def external_ids(self) -> tuple[str, ...]:
        """external_ids lists every document's external id by ordinal (decoded once, on first use)."""
        return tuple(self.doc(i).external_id for i in range(self.doc_count))

    @functools.cached_property
    def paths(self) -> tuple[str, ...]:
        """paths lists every document's path by ordinal (decoded once, on first use)."""
        return tuple(self.doc(i).path for i in range(self.doc_count))

    def load_deleted(self, path: Path, crc32: int) -> BitMap:
        """load_deleted reads a deletion file of this segment, verifying its checksum and ordinals."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise IndexCorruptError(path, "missing") from exc
        if zlib.crc32(raw) != crc32:
            raise IndexCorruptError(path, "checksum mismatch")
        if len(raw) < HEADER_SIZE:
            raise IndexCorruptError(path, "shorter than its header")
        magic, version, count = HEADER.unpack_from(raw, 0)
        if magic != MAGIC_DELETED:
            raise IndexCorruptError(path, f"bad magic {magic!r}")
        check_version(path, version)
        try:
            deleted: BitMap = BitMap.deserialize(memoryview(raw)[HEADER_SIZE:])  # type: ignore[arg-type]
        except ValueError as exc:
            raise IndexCorruptError(path, f"undecodable bitmap: {exc}") from exc
        if len(deleted) != count or (len(deleted) and deleted.max() >= self.doc_count):
            raise IndexCorruptError(path, "deleted ordinals do not match the segment")
        return deleted


def _ordinal_array(ordinals: Sequence[int]) -> array.array[int]:
    """_ordinal_array gives ordinals as the native record readers take them: a roaring bitmap's
    uint32 array as it is, anything else as int64."""
    if isinstance(ordinals, array.array) and ordinals.typecode in "Iq":
        return ordinals
    return array.array("q", ordinals)


def decode_symbol_at(data: bytes | memoryview, record_at: int, strings_at: int) -> tuple[Symbol, int]:
    """decode_symbol_at unpacks the symbol whose record and strings start at these offsets of `data`.

    Returns the symbol and where the strings after its own begin; ValueError when the strings
    run past `data` or are not UTF-8.
    """
    start_line, end_line, start_byte, end_byte, *lengths = SYMBOL_RECORD.unpack_from(data, record_at)
    texts = []
    for length in lengths:
        if strings_at + length > len(data):
            raise ValueError("symbol strings run past the record")
        texts.append(str(data[strings_at : strings_at + length], "utf-8"))
        strings_at += length
    name, kind, qualified, parent = texts
    return Symbol(name, kind, qualified, start_line, end_line, start_byte, end_byte, parent), strings_at


def decode_symbols(blob: bytes, count: int) -> tuple[Symbol, ...]:
    """decode_symbols unpacks `count` symbol records in the symbols.bin layout (format.py)."""
    out = []
    pos = count * SYMBOL_RECORD.size
    for i in range(count):
        symbol, pos = decode_symbol_at(blob, i * SYMBOL_RECORD.size, pos)
        out.append(symbol)
    if pos != len(blob):
        raise ValueError("trailing bytes after symbol strings")
    return tuple(out)


class SegmentReader:
    """SegmentReader is one segment as seen by one snapshot: shared data plus that snapshot's live set.

    `postings` returns every document containing the trigram, deleted ones included; intersect
    with `live` (the searcher does) to drop deletions. `live` is frozen because snapshots share
    it: ``live & bits`` makes a new bitmap.
    """

    def __init__(self, data: SegmentData, live: FrozenBitMap) -> None:
        self.data = data
        self.live = live

    @property
    def name(self) -> str:
        """name is the segment's directory name, e.g. ``seg-00000003``."""
        return self.data.name

    @property
    def doc_count(self) -> int:
        """doc_count counts every ordinal of the segment, deleted ones included."""
        return self.data.doc_count

    @property
    def live_count(self) -> int:
        """live_count counts the documents not deleted in this snapshot."""
        return len(self.live)

    def postings(self, tri: bytes) -> BitMap:
        """postings returns the ordinals containing folded trigram `tri` (deleted ordinals included)."""
        return self.data.postings(tri)

    def intersect(self, grams: Sequence[bytes]) -> BitMap:
        """intersect returns the ordinals containing every trigram of `grams` (SegmentData.intersect)."""
        return self.data.intersect(grams)

    def doc(self, ordinal: int) -> DocRecord:
        """doc returns the document table row of `ordinal`."""
        return self.data.doc(ordinal)

    def content(self, ordinal: int) -> memoryview:
        """content returns the stored bytes of `ordinal` (a view valid while the index is open)."""
        return self.data.content(ordinal)

    def symbols(self, ordinal: int) -> tuple[Symbol, ...]:
        """symbols returns the symbols stored with `ordinal`."""
        return self.data.symbols(ordinal)

    def symbol_spans(self, ordinal: int) -> SymbolSpans:
        """symbol_spans returns `ordinal`'s symbol spans, decoding a symbol's strings only on demand."""
        return self.data.symbol_spans(ordinal)

    @property
    def paths(self) -> Sequence[str]:
        """paths lists every ordinal's path (deleted ones included); it decodes the whole table once."""
        return self.data.paths

    def facts(self, ordinals: Sequence[int]) -> bytes:
        """facts returns the path facts of the given ordinals, a byte each (SegmentData.facts)."""
        return self.data.facts(ordinals)

    def doc_facts(self, ordinal: int, content: bytes | memoryview) -> int:
        """doc_facts returns every fact bit of one document (SegmentData.doc_facts)."""
        return self.data.doc_facts(ordinal, content)

    def names(self, ordinal: int) -> tuple[str, str, str]:
        """names returns (external_id, path, repository) of `ordinal` (SegmentData.names)."""
        return self.data.names(ordinal)

    def content_spans(self, ordinals: Sequence[int]) -> bytes:
        """content_spans returns the content spans of `ordinals` (SegmentData.content_spans)."""
        return self.data.content_spans(ordinals)

    def symbols_holding(
        self, ordinals: Sequence[int], screen: SymbolScreen
    ) -> list[tuple[int, list[Symbol]]]:
        """symbols_holding returns the symbols of `ordinals` that `screen` keeps (see SegmentData)."""
        return self.data.symbols_holding(ordinals, screen)

    def names_of(self, ordinals: Sequence[int]) -> list[tuple[str, str, str]]:
        """names_of returns `names` of each of `ordinals` (SegmentData.names_of)."""
        return self.data.names_of(ordinals)

    def verified_content(self, spans: bytes | memoryview) -> memoryview:
        """verified_content checks the spans' content and returns content.bin (see SegmentData)."""
        return self.data.verified_content(spans)

    def verify(self) -> None:
        """verify checks every checksum of the segment now."""
        self.data.verify()
