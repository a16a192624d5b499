"""buildstream reads a tenant's documents for a rebuild: one snapshot, a server-side cursor, packed symbols.

A rebuild must see the tenant as of one instant, so everything is read in one REPEATABLE READ,
read-only transaction on one connection: first the snapshot (xmax and in-progress xids, for the
covered-revision rule of tailer.py) and the tenant's size, then the live, indexable documents
through a server-side cursor in path order, a batch per FETCH, and for each batch the stored
symbols of its documents. Nothing is re-parsed.

The per-row Python cost is what limits a large tenant (Linux: 78k documents, 947 MB, a few
hundred thousand symbols), so both halves arrive in the shape the engine stores:

* content as `bytea` (`convert_to(content, 'UTF8')`): the UTF-8 bytes the engine indexes,
  without decoding 1 GB into `str` and encoding it back;
* symbols aggregated by Postgres per document, in the order the engine keeps them (start line,
  then insertion): the fixed-size records as one `bytea` of big-endian int4s and the strings
  (name, kind, qualified name, parent of each symbol) as one text. `pack_symbols` turns them into
  the symbols.bin layout (engine format.SYMBOL_RECORD: eight little-endian uint32 per record, then
  the strings) with one byte swap, so no Symbol object is built; the Postgres backend does the
  per-symbol work on its own core while this process indexes.

A batch is `rows` documents, so memory is bounded by the batch size times the largest document
(ingest stores none above its size limit) times the batches the caller keeps queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import numpy as np

from services.common import db
from services.common.db import Connection
from services.common.server import LazyPool
from services.search.engine.format import SYMBOL_RECORD
from services.search.engine.model import SourceDocument
from services.search.store import Snapshot

# The records `pack_symbols` produces must be the engine's: eight uint32 fields, little-endian.
if SYMBOL_RECORD.format != "<IIIIIIII":  # pragma: no cover - a format change must update the SQL below
    raise ImportError(f"buildstream packs symbols as <IIIIIIII, the engine now stores {SYMBOL_RECORD.format}")

_DOCUMENTS = """
select d.id::text as id, d.path, convert_to(d.content, 'UTF8') as content,
       coalesce(d.language, '') as language, coalesce(r.full_name, '') as repository
  from public.documents d
  left join public.repositories r on r.id = d.repository_id and r.user_id = d.user_id
 where d.user_id = $1 and d.deleted_at is null and d.index_skip is null
 order by d.path, d.id
"""

# Fields in SYMBOL_RECORD order: lines, the name's byte range, then the four string lengths.
_SYMBOLS = """
select s.document_id::text as id, count(*)::int as n,
       string_agg(int4send(s.start_line) || int4send(s.end_line)
                  || int4send(s.name_start_byte) || int4send(s.name_end_byte)
                  || int4send(octet_length(s.name)) || int4send(octet_length(s.kind))
                  || int4send(octet_length(coalesce(s.qualified_name, s.name)))
                  || int4send(octet_length(coalesce(s.parent, ''))),
                  ''::bytea order by s.start_line, s.id) as records,
       convert_to(string_agg(s.name || s.kind || coalesce(s.qualified_name, s.name)
                             || coalesce(s.parent, ''), '' order by s.start_line, s.id), 'UTF8') as strings
  from public.symbols s
 where s.user_id = $1 and s.document_id = any($2::uuid[])
 group by s.document_id
"""

_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+-[0-9]+")

_SIZE = """
select count(*)::bigint as documents, coalesce(sum(d.size), 0)::bigint as bytes
  from public.documents d
 where d.user_id = $1 and d.deleted_at is null and d.index_skip is null
"""


def pack_symbols(records: bytes, strings: bytes) -> bytes:
    """pack_symbols turns Postgres' big-endian records and the joined strings into the symbols.bin layout."""
    if not records:
        return b""
    little = np.frombuffer(records, dtype=">u4").astype("<u4")
    return little.tobytes() + strings


@dataclass(frozen=True, slots=True)
class BuildDocument:
    """BuildDocument is one document to index: the engine's input, its symbols packed, and their count."""

    document: SourceDocument
    symbols: bytes
    symbol_count: int


@dataclass(frozen=True, slots=True)
class TenantSize:
    """TenantSize is what a rebuild will read: live, indexable documents and their content bytes."""

    documents: int
    bytes: int


class BuildStream:
    """BuildStream is one rebuild's read of a tenant, open on two connections (see `open_stream`).

    `snapshot` and `size` were read first, in the snapshot every batch comes from.
    """

    def __init__(
        self,
        documents: Connection,
        symbols: Connection,
        tenant: uuid.UUID,
        rows: int,
        snapshot: Snapshot,
        size: TenantSize,
    ) -> None:
        self._documents = documents
        self._symbols = symbols
        self.tenant = tenant
        self.rows = rows
        self.snapshot = snapshot
        self.size = size

    async def batches(self) -> AsyncIterator[list[BuildDocument]]:
        """batches yields the tenant's documents in path order, `rows` at a time, with their symbols.

        The symbols of batch i are aggregated on the second connection while the first fetches
        batch i+1, so two Postgres backends work at once.
        """
        pending: tuple[list[asyncpg.Record], asyncio.Task[list[asyncpg.Record]]] | None = None
        try:
            with db.translated_errors():
                cursor = await self._documents.cursor(_DOCUMENTS, self.tenant)
                while True:
                    rows = await cursor.fetch(self.rows)
                    if pending is not None:
                        previous, symbols = pending
                        pending = None
                        yield _batch(previous, await symbols)
                    if not rows:
                        return
                    ids = [r["id"] for r in rows]
                    pending = (rows, asyncio.create_task(self._symbols.fetch(_SYMBOLS, self.tenant, ids)))
        finally:
            if pending is not None:
                pending[1].cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending[1]


@contextlib.asynccontextmanager
async def open_stream(pool: LazyPool, tenant: uuid.UUID, rows: int) -> AsyncIterator[BuildStream]:
    """open_stream opens the tenant's snapshot on two connections, reads its size, and yields the stream.

    The first connection exports its snapshot (`pg_export_snapshot`) and the second adopts it
    (`SET TRANSACTION SNAPSHOT`), so documents and symbols come from one instant. Database
    errors (while opening and in `batches`) are the shared error model's (db.translated_errors).
    """
    isolation = {"isolation": "repeatable_read", "readonly": True}
    with db.translated_errors():
        async with (
            pool.get().acquire() as documents,
            documents.transaction(**isolation),  # type: ignore[arg-type]
            pool.get().acquire() as symbols,
            symbols.transaction(**isolation),  # type: ignore[arg-type]
        ):
            snap = await documents.fetchrow(
                "select pg_catalog.pg_export_snapshot() as exported,"
                " pg_catalog.pg_snapshot_xmax(s)::text::bigint as xmax,"
                " array(select x::text::bigint from pg_catalog.pg_snapshot_xip(s) x) as xip"
                " from pg_catalog.pg_current_snapshot() s"
            )
            if snap is None or not _SNAPSHOT_ID.fullmatch(snap["exported"]):  # pragma: no cover
                raise RuntimeError(f"unexpected exported snapshot: {snap!r}")
            # SET cannot take a parameter; the identifier was checked above.
            await symbols.execute(f"set transaction snapshot '{snap['exported']}'")
            size = await documents.fetchrow(_SIZE, tenant)
            if size is None:  # pragma: no cover - an aggregate always returns one row
                raise RuntimeError("the size query returned no row")
            snapshot = Snapshot(int(snap["xmax"]), frozenset(int(x) for x in snap["xip"]))
            found = TenantSize(int(size["documents"]), int(size["bytes"]))
            yield BuildStream(documents, symbols, tenant, rows, snapshot, found)


def _batch(rows: list[asyncpg.Record], symbols: list[asyncpg.Record]) -> list[BuildDocument]:
    """_batch joins a batch of documents with their aggregated symbols."""
    packed = {s["id"]: (pack_symbols(s["records"], s["strings"]), int(s["n"])) for s in symbols}
    return [_build_document(r, packed.get(r["id"])) for r in rows]


def _build_document(row: asyncpg.Record, symbols: tuple[bytes, int] | None) -> BuildDocument:
    """_build_document builds the engine's input from a row of _DOCUMENTS and its packed symbols."""
    document = SourceDocument(
        external_id=row["id"],
        path=row["path"],
        content=row["content"],
        repository=row["repository"],
        language=row["language"],
    )
    blob, count = symbols or (b"", 0)
    return BuildDocument(document, blob, count)
