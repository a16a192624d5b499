"""Plain data shared by the engine's modules: documents going in, symbols, skip records.

Everything here is a frozen dataclass with no behaviour beyond validation, so the writer,
the symbol extractor, the searcher and the command line can agree on shapes without
importing each other.
"""

from __future__ import annotations

import enum

from services.search.engine.record import Record, field


class Symbol(Record):
    """Symbol is one definition found by tree-sitter in a document.

    Lines are 1-based and inclusive; `start_byte`/`end_byte` are UTF-8 byte offsets of the
    definition's name within the document. `qualified_name` joins the enclosing definitions
    with the language's separator (`Class.method`, `Type::method`); `parent` is the
    qualified name of the enclosing definition, or "" at top level.
    """

    name: str
    kind: str
    qualified_name: str
    start_line: int
    end_line: int
    start_byte: int = 0
    end_byte: int = 0
    parent: str = ""


class SourceDocument(Record):
    """SourceDocument is one file handed to the index writer.

    `external_id` is opaque to the engine (the database's document id, or a path for the
    offline command) and unique within an index: adding a document with an id already
    present replaces the old one.
    """

    external_id: str
    path: str
    content: bytes
    repository: str = ""
    language: str = ""
    symbols: tuple[Symbol, ...] = field(default_factory=tuple)


class SkipReason(enum.StrEnum):
    """SkipReason names why the writer refused to index a document."""

    BINARY = "binary"
    INVALID_UTF8 = "invalid_utf8"
    TOO_LARGE = "too_large"
    TOO_MANY_TRIGRAMS = "too_many_trigrams"
    EMPTY = "empty"


class Skipped(Record):
    """Skipped records a document the writer did not index, and why."""

    external_id: str
    path: str
    reason: SkipReason
    detail: str = ""
