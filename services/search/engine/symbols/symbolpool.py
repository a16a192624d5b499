"""Symbol extraction over worker processes: `SymbolExtractor` and `extract_many`.

symbols.py extracts one document's symbols (`extract_symbols`); this module runs that over
many documents on a pool of worker processes, in input order, with bounded memory and a
restart when a grammar crashes a worker. symbols.py re-exports both names.

`extract_many` / `SymbolExtractor` spread documents over worker processes. Threads do not
help: the binding holds the GIL while parsing (two threads parse C at 7.4 MB/s against 7.7 MB/s
for one). Measured with `SymbolExtractor.map` on this 2-core machine, which other jobs were
sharing (load average in brackets), so wall-clock figures are lower bounds; CPU cost is the
steadier figure (MB extracted per CPU-second, all processes included):

    corpus                              workers  wall MB/s [load]         MB per CPU-second
    Linux 6.1 kernel/ mm/ fs/ net/      1        17.5 [0.8]  11.9 [3.8]   15.4 - 16.5
      (C, 90.7 MB, 149k symbols)        2        20.0 [1.2]  13.7 [3.7]   13.8 - 14.5
    Python 3.11 stdlib                  1         6.9 [1.9]   4.0 [3.8]    6.2 - 6.8
      (31.7 MB, 86k symbols)            2        10.3 [2.3]   4.4 [3.8]    5.6 - 5.7

Two workers cost ~10% more CPU than one (pickling documents and symbols, rebuilding them).
Before C function bodies were skipped (see `_outside_bodies` in symbols.py), one core managed 6.4 MB/s on
kernel/ and mm/: parsing took 76% of the time, the query 22%, Python the rest. With both
cores free, 2 workers should reach about 2 x 14.5 = 29 MB/s on kernel C, over the 14 MB/s
target; Python code has no such shortcut (its bodies are indentation, not braces).
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from services.search.engine.model import Symbol
from services.search.engine.symbols.symbols import SYMBOL_LANGUAGES, extract_symbols

_SymbolRow = tuple[str, str, str, int, int, int, int, str]


def _extract_batch(batch: Sequence[tuple[bytes, str]]) -> list[list[_SymbolRow]]:
    """_extract_batch is the worker-process entry point: one chunk of documents in, symbols out.

    Symbols travel as plain tuples: pickling the frozen dataclasses costs 8 µs a symbol
    each way, tuples 0.8 µs plus 1.7 µs to rebuild (150k symbols per 90 MB of kernel C).
    """
    return [
        [
            (s.name, s.kind, s.qualified_name, s.start_line, s.end_line, s.start_byte, s.end_byte, s.parent)
            for s in extract_symbols(content, language)
        ]
        for content, language in batch
    ]


def _rebuild(rows: list[list[_SymbolRow]]) -> Iterator[tuple[Symbol, ...]]:
    """_rebuild turns a worker's tuples back into symbols."""
    for doc in rows:
        yield tuple([Symbol(*row) for row in doc])


@dataclass(frozen=True, slots=True)
class _Pending:
    """_Pending is a chunk in flight: its future, its documents, and the pool running it."""

    future: Future[list[list[_SymbolRow]]]
    batch: list[tuple[bytes, str]]
    pool: ProcessPoolExecutor


class SymbolExtractor:
    """SymbolExtractor extracts symbols for a stream of documents over a pool of worker processes.

    Documents are grouped into chunks of about `chunk_bytes` so that inter-process overhead
    stays small, at most `2 * workers` chunks are in flight (memory stays bounded on huge
    trees), and results come back in input order. With `workers <= 1` everything runs in the
    calling process. The pool uses the `forkserver` start method by default, which is safe in
    processes that already run threads (gRPC, asyncio executors); like every non-fork method
    it needs the main module to be importable without side effects (`if __name__ ==
    "__main__"`). If a worker dies (a grammar crashing on some input), the pool is restarted
    and the affected chunks are redone one document at a time, so only the document that
    kills a worker loses its symbols. Use it as a context manager.
    """

    def __init__(
        self, workers: int = 2, *, chunk_bytes: int = 1 << 20, start_method: str = "forkserver"
    ) -> None:
        self.workers = max(1, workers)
        self.chunk_bytes = max(1, chunk_bytes)
        self.restarts = 0
        self._context = multiprocessing.get_context(start_method)
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:
            self._pool = self._new_pool()

    def __enter__(self) -> SymbolExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """close shuts the worker processes down."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, items: Iterable[tuple[bytes, str]]) -> Iterator[tuple[Symbol, ...]]:
        """map yields the symbols of each `(content, language)` item, in input order."""
        if self._pool is None:
            for content, language in items:
                yield extract_symbols(content, language)
            return
        pending: collections.deque[_Pending] = collections.deque()
        for batch in self._chunks(items):
            pending.append(self._submit(batch))
            while len(pending) >= 2 * self.workers:
                yield from _rebuild(self._collect(pending.popleft()))
        while pending:
            yield from _rebuild(self._collect(pending.popleft()))

    def _new_pool(self) -> ProcessPoolExecutor:
        """_new_pool starts the worker processes."""
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context)

    def _submit(self, batch: list[tuple[bytes, str]]) -> _Pending:
        """_submit hands a chunk to the pool, replacing the pool first if it has broken."""
        if self._pool is None:
            self._pool = self._new_pool()
        pool = self._pool
        try:
            return _Pending(pool.submit(_extract_batch, batch), batch, pool)
        except BrokenProcessPool:
            self._replace(pool)
            assert self._pool is not None
            return _Pending(self._pool.submit(_extract_batch, batch), batch, self._pool)

    def _collect(self, pending: _Pending) -> list[list[_SymbolRow]]:
        """_collect waits for a chunk; if its worker died, redoes the chunk document by document."""
        try:
            return pending.future.result()
        except (BrokenProcessPool, CancelledError):
            self._replace(pending.pool)
        rows: list[list[_SymbolRow]] = []
        for item in pending.batch:
            single = self._submit([item])
            try:
                rows.extend(single.future.result())
            except (BrokenProcessPool, CancelledError):
                self._replace(single.pool)
                rows.append([])  # This document kills the grammar: it gets no symbols.
        return rows

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """_replace starts a new pool if `broken` is still the current one.

        Chunks already submitted to a broken pool fail on their own; they must not take the
        replacement down with them, hence the identity check.
        """
        if self._pool is not broken:
            return
        broken.shutdown(wait=False)
        self.restarts += 1
        self._pool = self._new_pool()

    def _chunks(self, items: Iterable[tuple[bytes, str]]) -> Iterator[list[tuple[bytes, str]]]:
        """_chunks groups items into lists of about `chunk_bytes`, skipping work for the pool.

        Documents in languages without symbols still travel (to keep the order) but cost nothing.
        """
        batch: list[tuple[bytes, str]] = []
        size = 0
        for content, language in items:
            if language in SYMBOL_LANGUAGES:
                size += len(content)
                batch.append((content, language))
            else:
                batch.append((b"", language))
            if size >= self.chunk_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def extract_many(items: Iterable[tuple[bytes, str]], *, workers: int = 2) -> list[tuple[Symbol, ...]]:
    """extract_many returns the symbols of each `(content, language)` item, using `workers` processes."""
    with SymbolExtractor(workers) as extractor:
        return list(extractor.map(items))
