"""writer holds IndexWriter: the one write session of an index — add, replace, delete, commit, merge.

Documents are checked (builder.check_document), buffered, and flushed as a new segment every
`flush_bytes` of content; `commit` publishes the flushed segments, the deletions that replaced
or removed documents anywhere in the index, and the updated skip list as one new generation
(format.py), then lets the merge policy fold small segments together.

With ``workers > 0`` segments are built in a process pool while the caller keeps adding
documents; the trigram-count guardrail then runs inside the build, so `add` cannot report it
and the skip appears in `skipped` and the index's skip list after the next commit.
Measured on Linux 6.1 (78,625 files, 1,299 MB read, 947 MB indexed; no symbols), workers=2,
64 MiB segments: 26.9 CPU-seconds in all (48 MB per CPU-second, main process included; before
the vectorised postings encoder it was 13 MB per CPU-second), peak RSS 374 MB for the caller
and 542 MB per worker. The shared 2-core test machine ran at load 4-5, so wall throughput was
27-33 MB/s; at load 2.8, ``drivers/`` (910 MB read) took 13.1 s = 70 MB/s wall, with 3.4
CPU-seconds in the caller and 11.8 in the two workers, so with both cores to itself the build
should roughly match cindex's 12.5 s for the whole tree. Resulting sizes: postings 207.6 MB
+ dictionary 15.8 MB (cindex: 148 MB in all, so 1.5x), everything on disk 1,183 MB = 0.91x
the corpus.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyroaring import BitMap

from services.search.engine.index.builder import (
    BuiltSegment,
    Limits,
    PendingDoc,
    build_segment,
    check_document,
    pending_from_source,
    trigram_skip,
)
from services.search.engine.index.format import MAGIC_DELETED, fsync_dir, header, write_atomic
from services.search.engine.index.index import (
    Index,
    Manifest,
    SegmentEntry,
    SkippedRef,
    deleted_name,
    encode_skipped,
    read_skipped,
    skipped_name,
)
from services.search.engine.index.merge import TieredMergePolicy, merge_segments, sizes_of
from services.search.engine.index.reader import SegmentReader
from services.search.engine.index.trigrams import distinct_trigrams
from services.search.engine.model import Skipped, SourceDocument

DEFAULT_FLUSH_BYTES = 64 << 20
"""DEFAULT_FLUSH_BYTES bounds the content buffered per segment; peak RSS is a few times this per worker."""


@dataclass(slots=True)
class _Flushed:
    """_Flushed is a segment built (or being built) in this session, not yet published."""

    name: str
    tmp: Path
    future: concurrent.futures.Future[BuiltSegment]


class IndexWriter:
    """IndexWriter is the only writer of an index while open (an in-process lock plus a file lock).

    Use it as a context manager; `close` abandons uncommitted work. `add` replaces any live
    document with the same external id, in any segment, when the change is committed.
    `workers` > 0 starts a spawn-context process pool (safe next to gRPC threads); as with any
    spawn pool, a script that creates the writer at import time needs an
    ``if __name__ == "__main__"`` guard. `flush_bytes` sets the segment size (and memory per build).
    """

    def __init__(
        self,
        index: Index,
        *,
        limits: Limits | None = None,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        workers: int = 0,
        merge_policy: TieredMergePolicy | None = None,
    ) -> None:
        self.index = index
        self.limits = limits or Limits()
        self.flush_bytes = flush_bytes
        self.merge_policy = merge_policy if merge_policy is not None else TieredMergePolicy()
        self._lock = index.write_lock()
        self._lock.__enter__()
        try:
            index.remove_orphans()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers > 0:
            # spawn, not fork: the caller may be a threaded gRPC server.
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
        self._workers = workers
        self._next_segment = index.manifest.next_segment
        self._locations: dict[str, tuple[str, int]] | None = None
        self._reset_session()
        self._closed = False
        self.skipped: list[Skipped] = []
        """skipped collects every skip reported since the writer opened (including deferred ones)."""

    def _reset_session(self) -> None:
        self._seq = 0
        self._latest: dict[str, int] = {}
        self._buffer: dict[str, PendingDoc] = {}
        self._buffer_bytes = 0
        self._flushed: list[_Flushed] = []
        self._skips: dict[str, tuple[int, Skipped]] = {}

    def _next_seq(self, external_id: str) -> int:
        self._seq += 1
        self._latest[external_id] = self._seq
        return self._seq

    def add(self, doc: SourceDocument, *, packed_symbols: tuple[bytes, int] | None = None) -> Skipped | None:
        """add indexes `doc` (replacing any document with its external id) or returns why it was skipped.

        A skipped document still removes the previous version of its id: the index must not
        serve content the source no longer has. `packed_symbols` (builder.encode_symbols' bytes
        and the symbol count) replaces `doc.symbols`, for callers that hold symbols packed.
        """
        seq = self._next_seq(doc.external_id)
        old = self._buffer.pop(doc.external_id, None)
        if old is not None:
            self._buffer_bytes -= len(old.content)
        skip = check_document(doc, self.limits)
        trigrams = None
        if skip is None and self._pool is None:
            trigrams = distinct_trigrams(doc.content)
            skip = trigram_skip(doc.external_id, doc.path, len(trigrams), self.limits)
        if skip is not None:
            self._skips[doc.external_id] = (seq, skip)
            self.skipped.append(skip)
            return skip
        self._skips.pop(doc.external_id, None)
        self._buffer[doc.external_id] = pending_from_source(seq, doc, trigrams, packed_symbols)
        self._buffer_bytes += len(doc.content)
        if self._buffer_bytes >= self.flush_bytes:
            self.flush()
        return None

    def delete(self, external_id: str) -> None:
        """delete removes the document with `external_id` (a no-op if absent) at the next commit."""
        self._next_seq(external_id)
        old = self._buffer.pop(external_id, None)
        if old is not None:
            self._buffer_bytes -= len(old.content)
        self._skips.pop(external_id, None)

    def flush(self) -> None:
        """flush starts building a segment from the buffered documents (published by commit)."""
        if not self._buffer:
            return
        docs = list(self._buffer.values())
        self._buffer = {}
        self._buffer_bytes = 0
        name, tmp = self._new_segment_name()
        if self._pool is None:
            future: concurrent.futures.Future[BuiltSegment] = concurrent.futures.Future()
            future.set_result(build_segment(tmp, docs, self.limits, durable=self.index.durable))
        else:
            # Bound memory: at most `workers` builds in flight, each holding its documents.
            running = [f.future for f in self._flushed if not f.future.done()]
            while len(running) >= self._workers:
                concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                running = [f for f in running if not f.done()]
            future = self._pool.submit(build_segment, tmp, docs, self.limits, durable=self.index.durable)
        self._flushed.append(_Flushed(name, tmp, future))

    def _new_segment_name(self) -> tuple[str, Path]:
        name = f"seg-{self._next_segment:08d}"
        self._next_segment += 1
        return name, self.index.path / f".tmp-{name}"

    def commit(self, *, merge: bool = True) -> int:
        """commit publishes everything added or deleted so far as a new generation and returns it.

        With `merge`, the merge policy then runs until satisfied (each merge is its own generation).
        If a build fails, its error is raised, nothing is published, and the uncommitted work is
        dropped (already-built segment directories are removed by the next writer).
        """
        self._check_open()
        try:
            generation = self._publish_session()
        except BaseException:
            # The id map may be half-updated; rebuild it from the manifest on next use.
            self._locations = None
            self.rollback()
            raise
        if merge:
            self.merge()
        return self.index.manifest.generation if merge else generation

    def _publish_session(self) -> int:
        self.flush()
        built: list[tuple[str, BuiltSegment]] = []
        for flushed in self._flushed:
            result = flushed.future.result()
            if result.doc_count:
                os.replace(flushed.tmp, self.index.path / flushed.name)
                built.append((flushed.name, result))
            for seq, skip in result.skipped:
                self.skipped.append(skip)
                if self._latest.get(skip.external_id) == seq:
                    self._skips[skip.external_id] = (seq, skip)
        fsync_dir(self.index.path, durable=self.index.durable)
        base = self.index.manifest
        if not built and not self._latest:
            # Nothing changed: keep the generation, so idle commits cost nothing for readers.
            self._reset_session()
            return base.generation
        generation = base.generation + 1
        locations = self._id_locations()

        deleted_now: dict[str, set[int]] = {}
        for external_id in self._latest:
            where = locations.pop(external_id, None)
            if where is not None:
                deleted_now.setdefault(where[0], set()).add(where[1])
        entries: list[SegmentEntry] = []
        for entry in base.segments:
            entries.append(self._apply_deletes(entry, deleted_now.get(entry.name, set()), generation))
        for name, result in built:
            dead = {i for i, (eid, seq) in enumerate(result.documents) if self._latest.get(eid) != seq}
            for i, (eid, seq) in enumerate(result.documents):
                if self._latest.get(eid) == seq:
                    locations[eid] = (name, i)
            fresh = SegmentEntry(name, result.doc_count)
            entries.append(self._apply_deletes(fresh, dead, generation))
        entries = [e for e in entries if e.live_count > 0]

        manifest = Manifest(
            generation, self._next_segment, tuple(entries), self._new_skiplist(base, generation)
        )
        self.index.publish(manifest)
        self._reset_session()
        return generation

    def _apply_deletes(self, entry: SegmentEntry, ordinals: set[int], generation: int) -> SegmentEntry:
        if not ordinals:
            return entry
        deleted = BitMap(ordinals)
        if entry.deleted:
            data = self.index.segment_data(entry.name)
            deleted |= data.load_deleted(self.index.path / entry.name / entry.deleted, entry.deleted_crc32)
        if len(deleted) == entry.doc_count:
            return SegmentEntry(entry.name, entry.doc_count, None, entry.doc_count, 0)
        deleted.run_optimize()
        raw = header(MAGIC_DELETED, len(deleted)) + deleted.serialize()
        name = deleted_name(generation)
        write_atomic(self.index.path / entry.name / name, raw, durable=self.index.durable)
        return SegmentEntry(entry.name, entry.doc_count, name, len(deleted), zlib.crc32(raw))

    def _new_skiplist(self, base: Manifest, generation: int) -> SkippedRef | None:
        if not self._latest:
            return base.skipped
        rows = {s.external_id: s for s in read_skipped(self.index.path, base.skipped)}
        before = dict(rows)
        for external_id in self._latest:
            rows.pop(external_id, None)
        for external_id, (seq, skip) in self._skips.items():
            if self._latest.get(external_id) == seq:
                rows[external_id] = skip
        if rows == before:
            return base.skipped
        if not rows:
            return None
        raw = encode_skipped(list(rows.values()))
        name = skipped_name(generation)
        write_atomic(self.index.path / name, raw, durable=self.index.durable)
        return SkippedRef(name, zlib.crc32(raw), len(rows))

    def _id_locations(self) -> dict[str, tuple[str, int]]:
        if self._locations is None:
            locations: dict[str, tuple[str, int]] = {}
            for entry in self.index.manifest.segments:
                data = self.index.segment_data(entry.name)
                ids = data.external_ids
                for ordinal in self.index.live_set(entry):
                    locations[ids[ordinal]] = (entry.name, ordinal)
            self._locations = locations
        return self._locations

    def external_ids(self) -> set[str]:
        """external_ids returns the ids of every live document as of the last commit.

        A caller rebuilding from a source of truth deletes the ids it no longer has.
        """
        return set(self._id_locations())

    def merge(self, *, policy: TieredMergePolicy | None = None) -> int:
        """merge runs `policy` (default: the writer's) until it selects nothing; returns merges done."""
        self._check_open()
        policy = policy or self.merge_policy
        done = 0
        while True:
            readers = self._readers()
            chosen = policy.select(sizes_of(readers))
            if not chosen:
                return done
            self._merge_named(readers, chosen)
            done += 1

    def force_merge(self, max_segments: int = 1) -> None:
        """force_merge merges the smallest segments until at most `max_segments` remain."""
        self._check_open()
        while True:
            readers = self._readers()
            if len(readers) <= max(1, max_segments):
                return
            smallest = sorted(sizes_of(readers), key=lambda s: (s.live_bytes, s.name))
            take = len(readers) - max(1, max_segments) + 1
            self._merge_named(readers, [s.name for s in smallest[:take]])

    def _readers(self) -> list[SegmentReader]:
        manifest = self.index.manifest
        return [
            SegmentReader(self.index.segment_data(e.name), self.index.live_set(e)) for e in manifest.segments
        ]

    def _merge_named(self, readers: Iterable[SegmentReader], names: list[str]) -> None:
        chosen = set(names)
        sources = [r for r in readers if r.name in chosen]
        name, tmp = self._new_segment_name()
        result = merge_segments(sources, tmp, durable=self.index.durable)
        base = self.index.manifest
        entries: list[SegmentEntry] = []
        placed = False
        for entry in base.segments:
            if entry.name not in chosen:
                entries.append(entry)
            elif not placed:
                placed = True
                if result.doc_count:
                    entries.append(SegmentEntry(name, result.doc_count))
        if result.doc_count:
            os.replace(tmp, self.index.path / name)
            fsync_dir(self.index.path, durable=self.index.durable)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = Manifest(base.generation + 1, self._next_segment, tuple(entries), base.skipped)
        self.index.publish(manifest)
        if self._locations is not None:
            for ordinal, (external_id, _) in enumerate(result.documents):
                self._locations[external_id] = (name, ordinal)

    def rollback(self) -> None:
        """rollback discards everything added or deleted since the last commit."""
        for flushed in self._flushed:
            with contextlib.suppress(Exception):
                flushed.future.result()
            shutil.rmtree(flushed.tmp, ignore_errors=True)
        self._reset_session()

    def close(self) -> None:
        """close abandons uncommitted work, stops the worker pool and releases the writer lock."""
        if self._closed:
            return
        self._closed = True
        try:
            self.rollback()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._lock.__exit__(None, None, None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("IndexWriter is closed")

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
