"""Batch timing: where a document batch's time goes, per phase, as a metric and a debug log line.

Every batch DocumentWriter writes (UpsertDocuments, each StreamUpsertDocuments batch, each sync
batch) carries a `BatchTimer`. The code that does a phase wraps it in `timer.phase(name)`; when
the batch is done, `record()` observes each phase in the histogram
`kotadb_ingest_batch_phase_seconds{phase=...}` and logs one `ingest batch` line at DEBUG with
the batch's size and every phase in milliseconds, so a slow push can be explained from a running
service without a profiler. The phases, in the order a batch meets them:

* `receive`: waiting for the batch's messages to arrive from the client stream (streams only;
  the time the service spends reading while the previous batch is still being written does not
  count, only what the writer waits for);
* `check`: per-item checks, hashing and language detection, on the event loop;
* `extract`: waiting for the symbol workers (tree-sitter, index guardrails);
* `begin`: taking a connection and opening the transaction as the caller (role, claims);
* `request_id`: claiming the request id and recording the answer (when the batch has one);
* `read`: reading visible repositories and the stored states the unchanged test compares;
* `documents`: the documents write (the revision and feed triggers fire inside it);
* `symbols`: deleting the written documents' old symbols and loading the new ones;
* `commit`: the commit (the WAL flush with `synchronous_commit` on).

Phases overlap across batches when a stream pipelines them (batch N+1 extracts while batch N
commits), so the phases of one batch may add up to more than the wall time per batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from services.common import metrics

PHASES = ("receive", "check", "extract", "begin", "request_id", "read", "documents", "symbols", "commit")

BATCH_PHASE_SECONDS = metrics.histogram(
    "kotadb_ingest_batch_phase_seconds",
    "Seconds one document batch spent in each phase of its write (receive, check, extract, begin,"
    " request_id, read, documents, symbols, commit).",
    ("phase",),
)
BATCH_DOCUMENTS = metrics.counter(
    "kotadb_ingest_batch_documents_total", "Documents in the batches the document writer handled."
)
BATCH_BYTES = metrics.counter(
    "kotadb_ingest_batch_bytes_total", "Content bytes in the batches the document writer handled."
)

log = logging.getLogger("kotadb.ingest.batches")


class BatchTimer:
    """BatchTimer adds up the seconds one batch spends in each named phase.

    `phase(name)` times a block (several blocks of one name add up); `add(name, seconds)` adds a
    duration measured elsewhere; `record()` publishes the totals once the batch is done. The
    writer fills in the counts: `documents` and `size` (the batch's items and content bytes),
    `written` (documents it changed) and `symbols` (symbol rows it stored).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self.documents = 0
        self.size = 0
        self.written = 0
        self.symbols = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """phase times the block as part of phase `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """add counts `seconds` towards phase `name`."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def record(self) -> None:
        """record observes every phase in the histogram and logs the batch's line at DEBUG."""
        for name, seconds in self.seconds.items():
            BATCH_PHASE_SECONDS.labels(phase=name).observe(seconds)
        BATCH_DOCUMENTS.inc(self.documents)
        BATCH_BYTES.inc(self.size)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "ingest batch",
                extra={
                    "fields": {
                        "documents": self.documents,
                        "bytes": self.size,
                        "written": self.written,
                        "symbols": self.symbols,
                        "total_ms": round((time.perf_counter() - self.started) * 1000, 1),
                        **{f"{name}_ms": round(s * 1000, 1) for name, s in self.seconds.items()},
                    }
                },
            )
