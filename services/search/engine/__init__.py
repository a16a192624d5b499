"""engine is the search engine: a pure library (no gRPC, no database, no event loop) over an index.

This is its public surface; callers import from here::

    from services.search.engine import Index, IndexWriter, Searcher, SearchMode, EngineError

Sub-packages by data direction (pyproject.toml's import-linter contracts keep the layering:
search over index and query, all of them over symbols and the base, no cycles):

* index/ — the on-disk index, written and read: format (the layout, described once), trigrams,
  postings, facts, builder (one segment), writer, merge, build (a source tree), reader (one
  segment), index (snapshots of the live segments);
* query/ — what a query compiles to: query (the query language), regexsyntax, plan (trigram
  plans), verify (exact line matching), matchtree;
* search/ — runs over a snapshot: request, candidates, searchrun (ranked pages), hits, page,
  stream (every match in index order, and counts), rank, cursor, results, searcher;
* symbols/ — tree-sitter definitions: symbols (one document), pygaps, symbolpool (worker
  processes), symsearch (symbol search ranking);
* the base, here: errors (the one error tree), model (plain data), record, languages, and the
  C extension _fastscan.

Names are resolved on first use (PEP 562), so importing one module of the engine (the
ingest service imports languages and symbols.symbols) does not load the rest; the sub-packages'
__init__ files import nothing either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.search.engine.errors import (
        CursorError,
        EngineError,
        IndexFileError,
        InvalidPatternError,
        QuerySyntaxError,
        SearchCancelled,
        SearchDeadlineError,
    )
    from services.search.engine.index.format import IndexCorruptError, IndexNotFoundError, IndexVersionError
    from services.search.engine.index.index import Index, IndexLockedError, Snapshot
    from services.search.engine.index.writer import IndexWriter
    from services.search.engine.model import SourceDocument, Symbol
    from services.search.engine.search.request import RunContext, SearchRequest
    from services.search.engine.search.results import (
        FileMatch,
        LimitReason,
        LineMatch,
        SearchMode,
        SearchResult,
    )
    from services.search.engine.search.searcher import Searcher
    from services.search.engine.search.stream import MatchStream, StreamedFile

_EXPORTS = {
    "CursorError": "errors",
    "EngineError": "errors",
    "IndexFileError": "errors",
    "InvalidPatternError": "errors",
    "QuerySyntaxError": "errors",
    "SearchCancelled": "errors",
    "SearchDeadlineError": "errors",
    "IndexCorruptError": "index.format",
    "IndexNotFoundError": "index.format",
    "IndexVersionError": "index.format",
    "Index": "index.index",
    "IndexLockedError": "index.index",
    "Snapshot": "index.index",
    "SourceDocument": "model",
    "Symbol": "model",
    "RunContext": "search.request",
    "SearchRequest": "search.request",
    "FileMatch": "search.results",
    "LimitReason": "search.results",
    "LineMatch": "search.results",
    "SearchMode": "search.results",
    "SearchResult": "search.results",
    "Searcher": "search.searcher",
    "MatchStream": "search.stream",
    "StreamedFile": "search.stream",
    "IndexWriter": "index.writer",
}

__all__ = [
    "CursorError",
    "EngineError",
    "FileMatch",
    "Index",
    "IndexCorruptError",
    "IndexFileError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexVersionError",
    "IndexWriter",
    "InvalidPatternError",
    "LimitReason",
    "LineMatch",
    "MatchStream",
    "QuerySyntaxError",
    "RunContext",
    "SearchCancelled",
    "SearchDeadlineError",
    "SearchMode",
    "SearchRequest",
    "SearchResult",
    "Searcher",
    "Snapshot",
    "SourceDocument",
    "StreamedFile",
    "Symbol",
]


def __getattr__(name: str) -> Any:
    """__getattr__ imports the module that defines a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
