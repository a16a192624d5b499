"""Symbolizer: tree-sitter symbols and index guardrails for ingested documents, off the event loop.

The engine's `extract_symbols` (services/search/engine/symbols/symbols.py) is CPU-bound and holds the
GIL while it parses, so it runs in worker processes (`concurrent.futures.ProcessPoolExecutor`,
`forkserver` start method: safe in a process that already runs gRPC and asyncio threads),
awaited through `loop.run_in_executor` so the event loop keeps serving other calls. The pool is
started on first use, sized by `KOTADB_INGEST_SYMBOL_WORKERS`. A batch is cut into chunks of
about `CHUNK_BYTES` so every worker gets a share; a worker that dies (a grammar crashing on some
input) breaks the pool, which is replaced and the chunk redone one document at a time, so only
the document that kills a worker loses its symbols, as in the engine's symbolpool.py.

The same worker also decides whether the search engine will index the document (the engine's
default limits in builder.py: size, distinct trigrams), because it already holds the bytes; the
answer is stored with the document and reported by the search service as a skip with its reason.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import NamedTuple

from services.search.engine.index import builder
from services.search.engine.index.trigrams import distinct_trigrams
from services.search.engine.model import Symbol
from services.search.engine.symbols.symbols import SYMBOL_LANGUAGES, extract_symbols

# Bytes of source per task: large enough that pickling and scheduling stay small next to the
# parse (~15 MB per CPU-second on C, symbolpool.py), small enough that two workers share a batch.
CHUNK_BYTES = 1 << 20
# Longest signature kept per symbol, in characters (the definition's first line, trimmed).
MAX_SIGNATURE_CHARS = 240


class SymbolRow(NamedTuple):
    """SymbolRow is one symbol as the `symbols` table stores it (lines 1-based, columns in bytes).

    `start_column` is the byte column of the name on its line; `name_start_byte` and
    `name_end_byte` are the name's range in the document, which restores the engine's `Symbol`.
    A named tuple, not a dataclass: rows cross from the symbol workers by pickle, ~20,000 a
    batch, and a tuple pickles several times faster; the fields are in the table's column order
    (services/ingest/documentstore.py loads them as they are).
    """

    name: str
    kind: str
    qualified_name: str
    start_line: int
    start_column: int
    end_line: int
    end_column: int
    signature: str
    parent: str
    name_start_byte: int
    name_end_byte: int


@dataclass(frozen=True, slots=True)
class Analysis:
    """Analysis is what the worker found in one document: its symbols and why it is not indexed.

    `index_skip` is None when the engine will index the document, else one of `empty`,
    `too_large`, `too_many_trigrams` (the engine's SkipReason values), with `index_skip_detail`.
    """

    symbols: tuple[SymbolRow, ...]
    index_skip: str | None = None
    index_skip_detail: str = ""


def symbol_rows(content: bytes, symbols: Sequence[Symbol]) -> tuple[SymbolRow, ...]:
    """symbol_rows converts engine symbols to table rows: name columns and a one-line signature."""
    rows: list[SymbolRow] = []
    for symbol in symbols:
        start = min(max(symbol.start_byte, 0), len(content))
        end = min(max(symbol.end_byte, start), len(content))
        line_start = content.rfind(b"\n", 0, start) + 1
        line_end = content.find(b"\n", start)
        line = content[line_start : line_end if line_end >= 0 else len(content)]
        signature = line.decode("utf-8", "replace").strip()[:MAX_SIGNATURE_CHARS]
        rows.append(
            SymbolRow(
                name=symbol.name,
                kind=symbol.kind,
                qualified_name=symbol.qualified_name,
                start_line=symbol.start_line,
                start_column=start - line_start,
                end_line=max(symbol.end_line, symbol.start_line),
                end_column=end - (content.rfind(b"\n", 0, end) + 1),
                signature=signature,
                parent=symbol.parent,
                name_start_byte=start,
                name_end_byte=end,
            )
        )
    return tuple(rows)


ENGINE_LIMITS = builder.Limits()


def index_skip(content: bytes, limits: builder.Limits = ENGINE_LIMITS) -> tuple[str | None, str]:
    """index_skip says why the engine would not index `content` (None, "" when it would)."""
    if not content:
        return "empty", ""
    if len(content) > limits.max_file_size:
        return "too_large", f"{len(content)} bytes > limit {limits.max_file_size}"
    count = len(distinct_trigrams(content))
    if count > limits.max_trigrams:
        return "too_many_trigrams", f"{count} distinct trigrams > limit {limits.max_trigrams}"
    return None, ""


def analyze(content: bytes, language: str) -> Analysis:
    """analyze extracts one document's symbols and its index guardrail verdict (in any process)."""
    skip, detail = index_skip(content)
    symbols = extract_symbols(content, language) if language in SYMBOL_LANGUAGES else ()
    return Analysis(symbol_rows(content, symbols), skip, detail)


def analyze_chunk(chunk: Sequence[tuple[bytes, str]]) -> list[Analysis]:
    """analyze_chunk is the worker-process entry point: `analyze` over one chunk, in order."""
    return [analyze(content, language) for content, language in chunk]


class Symbolizer:
    """Symbolizer analyzes batches of documents on a lazily started pool of `workers` processes.

    `await analyze_many(items)` returns one Analysis per `(content, language)` item, in order.
    `close()` stops the workers (the ingest server calls it on shutdown).
    """

    def __init__(self, workers: int = 2, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.workers = max(1, workers)
        self.chunk_bytes = max(1, chunk_bytes)
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = None
        self._context = multiprocessing.get_context("forkserver")

    def _executor(self) -> ProcessPoolExecutor:
        """_executor is the worker pool, started on first use (and again after a worker died)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context)
        return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """_replace drops a broken pool (once, however many chunks saw it break)."""
        if self._pool is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self.restarts += 1

    async def _run(self, chunk: list[tuple[bytes, str]]) -> list[Analysis]:
        """_run analyzes one chunk in a worker; if a worker dies, redoes it document by document."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            return await loop.run_in_executor(pool, analyze_chunk, chunk)
        except BrokenProcessPool:
            self._replace(pool)
        results: list[Analysis] = []
        for content, language in chunk:
            single = self._executor()
            try:
                results.extend(await loop.run_in_executor(single, analyze_chunk, [(content, language)]))
            except BrokenProcessPool:
                self._replace(single)
                # This document kills the grammar: it is stored without symbols.
                skip, detail = index_skip(content)
                results.append(Analysis((), skip, detail))
        return results

    async def analyze_many(self, items: Sequence[tuple[bytes, str]]) -> list[Analysis]:
        """analyze_many returns each item's Analysis, in input order, computed in worker processes."""
        chunks: list[list[tuple[bytes, str]]] = []
        current: list[tuple[bytes, str]] = []
        size = 0
        for content, language in items:
            current.append((content, language))
            size += len(content)
            if size >= self.chunk_bytes:
                chunks.append(current)
                current, size = [], 0
        if current:
            chunks.append(current)
        done = await asyncio.gather(*(self._run(chunk) for chunk in chunks))
        return [analysis for part in done for analysis in part]

    def close(self) -> None:
        """close stops the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
