"""rebuild builds a tenant's index from Postgres, and holds the tenant directory's layout and state file.

Layout of the search volume (`KOTADB_SEARCH_DATA_DIR`)::

    <data_dir>/
      cursor.key                 random page-token key, when no cursor secret is configured
      <tenant uuid>/             one tenant, replaced whole by a rebuild
        state.json               {"version", "tenant", "revision", "rebuilt_at"}
        index/                   the engine's index directory (engine/index/format.py)
      .build-<tenant>-<hex>/     a build in progress (removed at start)
      .old-<tenant>-<hex>/       a replaced build being deleted (removed at start)

`state.json` is written after the index commit it describes, so it never claims more than the
index holds: a crash between the two leaves an older revision, and replaying changes is
idempotent (each change re-reads the document's current row). A build streams the tenant's
live, indexable documents from one REPEATABLE READ snapshot with a server-side cursor, content
and symbols as stored by ingest (nothing is re-parsed), into a new directory that then
replaces the tenant's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from services.search.engine.index.index import Index
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument, Symbol
from services.search.store import DocumentRow, SearchStore
from services.search.tailer import RevisionRule

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"
INDEX_DIR = "index"
# Segment size of a build (peak memory is a few times this); the merge policy folds them together.
BUILD_FLUSH_BYTES = 32 << 20
# A build logs its progress every this many documents.
PROGRESS_EVERY = 10000


@dataclass(frozen=True, slots=True)
class TenantState:
    """TenantState is a tenant directory's state file: the covered revision and the last rebuild."""

    tenant: uuid.UUID
    revision: int
    rebuilt_at: float

    def save(self, directory: Path) -> None:
        """save writes the state file atomically (temporary file, fsync, rename)."""
        body = {
            "version": STATE_VERSION,
            "tenant": str(self.tenant),
            "revision": self.revision,
            "rebuilt_at": self.rebuilt_at,
        }
        tmp = directory / f".{STATE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(body, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / STATE_FILE)

    @staticmethod
    def load(directory: Path, tenant: uuid.UUID) -> TenantState | None:
        """load reads the state file; None when missing, malformed, of another version or tenant."""
        try:
            body = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
            if body.get("version") != STATE_VERSION or body.get("tenant") != str(tenant):
                return None
            return TenantState(tenant, int(body["revision"]), float(body["rebuilt_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def source_document(row: DocumentRow) -> SourceDocument:
    """source_document turns a stored document and its symbols into the engine's input."""
    return SourceDocument(
        external_id=str(row.id),
        path=row.path,
        content=row.content.encode("utf-8"),
        repository=row.repository,
        language=row.language,
        symbols=tuple(
            Symbol(
                name=s.name,
                kind=s.kind,
                qualified_name=s.qualified_name,
                start_line=s.start_line,
                end_line=s.end_line,
                start_byte=s.name_start_byte,
                end_byte=s.name_end_byte,
                parent=s.parent,
            )
            for s in row.symbols
        ),
    )


def add_documents(writer: IndexWriter, rows: Sequence[DocumentRow]) -> None:
    """add_documents adds a batch to an open writer (runs in the write thread)."""
    for row in rows:
        writer.add(source_document(row))


def clean_leftovers(data_dir: Path) -> None:
    """clean_leftovers removes builds and replaced directories a crash left behind."""
    if not data_dir.is_dir():
        return
    for entry in data_dir.iterdir():
        if entry.name.startswith((".build-", ".old-")):
            shutil.rmtree(entry, ignore_errors=True)


async def build_tenant(
    store: SearchStore,
    rule: RevisionRule,
    tenant: uuid.UUID,
    data_dir: Path,
    executor: Executor,
    *,
    batch: int,
    durable: bool,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[Path, TenantState]:
    """build_tenant builds the tenant's index from Postgres into a new directory; returns it and its state.

    The watermark is read before the stream's snapshot, so the covered revision it yields obeys
    tailer.py's rule; changes above it are replayed by the tailer. `swap_in` puts it in place.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    build = data_dir / f".build-{tenant}-{secrets.token_hex(4)}"
    await loop.run_in_executor(executor, lambda: build.mkdir(parents=True))
    try:
        index = await loop.run_in_executor(executor, lambda: Index.create(build / INDEX_DIR, durable=durable))
        writer = await loop.run_in_executor(
            executor, lambda: IndexWriter(index, flush_bytes=BUILD_FLUSH_BYTES)
        )
        try:
            key = await store.tenant_key(tenant)
            watermark = await rule.read(store)
            count = 0
            revision = 0
            async for snapshot, rows in store.stream_documents(tenant, batch):
                revision = rule.safe(watermark, snapshot, key)
                await loop.run_in_executor(executor, add_documents, writer, rows)
                before, count = count, count + len(rows)
                if count // PROGRESS_EVERY > before // PROGRESS_EVERY:
                    log.info("building the index of tenant %s: %d documents so far", tenant, count)
                if on_progress is not None:
                    on_progress(count)
            await loop.run_in_executor(executor, lambda: writer.commit(merge=True))
        finally:
            await loop.run_in_executor(executor, writer.close)
            index.close()
        state = TenantState(tenant, revision, time.time())
        state.save(build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    log.info(
        "built the index of tenant %s: %d documents, revision %d, %.3f s",
        tenant,
        count,
        revision,
        time.monotonic() - started,
    )
    return build, state


def swap_in(data_dir: Path, tenant: uuid.UUID, build: Path) -> None:
    """swap_in replaces the tenant's directory by a finished build (two renames, then deletion)."""
    target = data_dir / str(tenant)
    old = None
    if target.exists():
        old = data_dir / f".old-{tenant}-{secrets.token_hex(4)}"
        os.replace(target, old)
    os.replace(build, target)
    with contextlib.suppress(OSError):
        fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
