"""builder holds segment construction: document guardrails and writing one immutable segment.

The layout written here is described in format.py. `build_segment` is a plain function of
picklable arguments so the index writer can run it in a worker process: on 2 cores, building
segments in a pool while the caller reads and checks the next documents roughly doubles
throughput.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from services.search.engine.index.facts import content_facts, path_facts
from services.search.engine.index.format import (
    BLOCK_SIZE,
    DOC_RECORD,
    FORMAT_VERSION,
    MAGIC_CONTENT,
    MAGIC_DICT,
    MAGIC_DOCS,
    MAGIC_POSTINGS,
    MAGIC_SYMBOLS,
    META_FILE,
    SYMBOL_RECORD,
    PartInfo,
    PartWriter,
    dict_padding,
    dump_checked_json,
    fsync_dir,
    write_atomic,
)
from services.search.engine.index.postings import PostingsBuilder
from services.search.engine.index.trigrams import distinct_trigrams
from services.search.engine.model import Skipped, SkipReason, SourceDocument, Symbol

DEFAULT_MAX_FILE_SIZE = 1 << 20
DEFAULT_MAX_TRIGRAMS = 20_000
BINARY_PROBE = 8 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits are the guardrails a document must pass to be indexed (see format.py for the figures)."""

    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_trigrams: int = DEFAULT_MAX_TRIGRAMS
    binary_probe: int = BINARY_PROBE


def check_document(doc: SourceDocument, limits: Limits) -> Skipped | None:
    """check_document returns why `doc` must be skipped, or None; the trigram limit is checked later.

    Raises ValueError for identifiers the format cannot store (NUL bytes).
    """
    for name in ("external_id", "path", "repository", "language"):
        if "\0" in getattr(doc, name):
            raise ValueError(f"document {name} must not contain NUL: {doc.external_id!r}")
    content = doc.content
    if not content:
        return Skipped(doc.external_id, doc.path, SkipReason.EMPTY)
    if len(content) > limits.max_file_size:
        detail = f"{len(content)} bytes > limit {limits.max_file_size}"
        return Skipped(doc.external_id, doc.path, SkipReason.TOO_LARGE, detail)
    nul = content.find(b"\0", 0, limits.binary_probe)
    if nul >= 0:
        return Skipped(doc.external_id, doc.path, SkipReason.BINARY, f"NUL byte at offset {nul}")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"invalid UTF-8 at byte {exc.start}"
        return Skipped(doc.external_id, doc.path, SkipReason.INVALID_UTF8, detail)
    return None


def trigram_skip(doc_id: str, path: str, count: int, limits: Limits) -> Skipped | None:
    """trigram_skip returns the skip record for a document with `count` distinct trigrams, if too many."""
    if count <= limits.max_trigrams:
        return None
    detail = f"{count} distinct trigrams > limit {limits.max_trigrams}"
    return Skipped(doc_id, path, SkipReason.TOO_MANY_TRIGRAMS, detail)


def encode_symbols(symbols: Sequence[Symbol]) -> bytes:
    """encode_symbols packs symbol records in the symbols.bin layout (format.py)."""
    if not symbols:
        return b""
    records = []
    strings = []
    for sym in symbols:
        parts = [s.encode() for s in (sym.name, sym.kind, sym.qualified_name, sym.parent)]
        records.append(
            SYMBOL_RECORD.pack(
                sym.start_line, sym.end_line, sym.start_byte, sym.end_byte, *(len(p) for p in parts)
            )
        )
        strings.extend(parts)
    return b"".join(records) + b"".join(strings)


class PendingDoc(NamedTuple):
    """PendingDoc is a checked document waiting for its segment, in a picklable shape.

    `seq` orders writes within a writer session; `content_hash` is empty until computed;
    `trigrams` holds the distinct ids when already extracted.
    """

    seq: int
    external_id: str
    path: str
    repository: str
    language: str
    content: bytes | memoryview
    symbols_blob: bytes | memoryview
    symbol_count: int
    content_hash: bytes = b""
    trigrams: NDArray[np.uint32] | None = None


def pending_from_source(
    seq: int,
    doc: SourceDocument,
    trigrams: NDArray[np.uint32] | None,
    packed_symbols: tuple[bytes, int] | None = None,
) -> PendingDoc:
    """pending_from_source converts an accepted SourceDocument for the builder.

    `packed_symbols` (records as encode_symbols packs them, and their count) stands for
    `doc.symbols` when given.
    """
    blob, count = packed_symbols or (encode_symbols(doc.symbols), len(doc.symbols))
    return PendingDoc(
        seq,
        doc.external_id,
        doc.path,
        doc.repository,
        doc.language,
        doc.content,
        blob,
        count,
        b"",
        trigrams,
    )


@dataclass(slots=True)
class BuiltSegment:
    """BuiltSegment describes a segment directory written by build_segment.

    `documents` lists (external_id, seq) per ordinal; `skipped` the documents the trigram
    limit rejected, with their seq.
    """

    path: Path
    doc_count: int
    content_bytes: int
    trigram_count: int
    documents: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[int, Skipped]] = field(default_factory=list)


def build_segment(
    dest: Path, docs: Sequence[PendingDoc], limits: Limits | None, *, durable: bool = True
) -> BuiltSegment:
    """build_segment writes `docs` as a new segment in directory `dest` (created; must not exist).

    With `limits`, documents over the trigram limit are left out and reported; merges pass None
    because their documents were accepted once already. If no document remains, `dest` is removed
    and the result has doc_count 0.
    """
    dest.mkdir(parents=True)
    try:
        return _build(dest, docs, limits, durable)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _build(dest: Path, docs: Sequence[PendingDoc], limits: Limits | None, durable: bool) -> BuiltSegment:
    result = BuiltSegment(dest, 0, 0, 0)
    postings = PostingsBuilder()
    accepted: list[PendingDoc] = []
    for doc in docs:
        ids = doc.trigrams if doc.trigrams is not None else distinct_trigrams(doc.content)
        if limits is not None:
            skip = trigram_skip(doc.external_id, doc.path, len(ids), limits)
            if skip is not None:
                result.skipped.append((doc.seq, skip))
                continue
        postings.add(ids)
        accepted.append(doc)
        result.documents.append((doc.external_id, doc.seq))
    if not accepted:
        shutil.rmtree(dest)
        return result

    parts: dict[str, PartInfo] = {}
    count = len(accepted)

    content = PartWriter(dest / "content.bin", MAGIC_CONTENT, count, lazy=True, durable=durable)
    symbol_total = sum(d.symbol_count for d in accepted)
    symbols = PartWriter(dest / "symbols.bin", MAGIC_SYMBOLS, symbol_total, lazy=True, durable=durable)
    records: list[bytes] = []
    strings: list[bytes] = []
    content_off = symbols_off = strings_off = 0
    for doc in accepted:
        content.write(doc.content)
        symbols.write(doc.symbols_blob)
        digest = doc.content_hash or hashlib.sha256(doc.content).digest()
        text = "\0".join((doc.external_id, doc.path, doc.repository, doc.language)).encode()
        strings.append(text)
        records.append(
            DOC_RECORD.pack(
                content_off,
                len(doc.content),
                strings_off,
                symbols_off,
                len(text),
                len(doc.symbols_blob),
                doc.symbol_count,
                path_facts(doc.path) | content_facts(doc.content),
                digest,
            )
        )
        content_off += len(doc.content)
        symbols_off += len(doc.symbols_blob)
        strings_off += len(text)
    parts["content.bin"] = content.finish()
    parts["symbols.bin"] = symbols.finish()
    result.content_bytes = content_off

    table = PartWriter(dest / "docs.bin", MAGIC_DOCS, count, lazy=True, durable=durable)
    table.write(b"".join(records))
    table.write(b"".join(strings))
    parts["docs.bin"] = table.finish()

    ids, offsets, data = postings.encoded()
    result.trigram_count = len(ids)
    post = PartWriter(dest / "postings.bin", MAGIC_POSTINGS, len(ids), lazy=True, durable=durable)
    post.write(data.data)
    parts["postings.bin"] = post.finish()

    dictionary = PartWriter(dest / "dict.bin", MAGIC_DICT, len(ids), lazy=True, durable=durable)
    dictionary.write(ids.astype("<u4").tobytes())
    dictionary.write(b"\0" * dict_padding(len(ids)))
    dictionary.write(offsets.astype("<u8").tobytes())
    parts["dict.bin"] = dictionary.finish()

    result.doc_count = count
    meta = {
        "format": FORMAT_VERSION,
        "kind": "kotadb-segment",
        "doc_count": count,
        "trigram_count": len(ids),
        "content_bytes": content_off,
        "block_size": BLOCK_SIZE,
        "parts": {name: info.to_json() for name, info in sorted(parts.items())},
    }
    write_atomic(dest / META_FILE, dump_checked_json(meta), durable=durable)
    fsync_dir(dest, durable=durable)
    return result
