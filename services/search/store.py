"""SearchStore: the search service's database access (asyncpg): the change feed, documents, symbols.

Every read runs as the service role (`db.as_service`) and names the tenant explicitly, so the
queries of one tenant can never return another's rows. Nothing here writes.

The watermark reads (`revision_watermark`, `feed_rows`) are the database half of the rule in
tailer.py; their order matters and is explained there.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from services.common import db
from services.common.db import Connection
from services.common.server import LazyPool, require_tables

# The tables the search service reads; readiness fails until migrations created them.
TABLES: tuple[str, ...] = ("public.documents", "public.document_changes", "public.symbols")

# Lock modes an INSERT, UPDATE or DELETE (or stronger) takes on public.documents: a transaction
# holding one of them may still append change-feed rows.
_WRITE_MODES = ("RowExclusiveLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
# The advisory lock class document writers take per tenant (20261207100000_document_writer_locks).
WRITER_LOCK_CLASS = 1262764611


@dataclass(frozen=True, slots=True)
class Writer:
    """Writer is a running transaction that writes documents (or may be about to).

    `vxid` identifies the transaction, `xid` is its transaction id once it has one; `tenants`
    are the tenant keys it announced (the advisory locks of 20261207100000); `documents` says
    it holds a write lock on public.documents.
    """

    vxid: str
    xid: int | None
    tenants: frozenset[int]
    documents: bool


@dataclass(frozen=True, slots=True)
class Watermark:
    """Watermark is what one poll learns before its snapshot: the sequence value and the open writers."""

    sequence: int
    writers: tuple[Writer, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Snapshot is `pg_current_snapshot()` of a feed read: xmax and the in-progress xids."""

    xmax: int
    xip: frozenset[int]

    def running(self, xid: int) -> bool:
        """running tells whether `xid` had not finished when the snapshot was taken."""
        return xid >= self.xmax or xid in self.xip


@dataclass(frozen=True, slots=True)
class Change:
    """Change is one change-feed row: revision, document and whether it was a delete."""

    revision: int
    document_id: uuid.UUID
    deleted: bool


@dataclass(frozen=True, slots=True)
class SymbolRow:
    """SymbolRow is one stored symbol, in the shape the engine's model.Symbol takes."""

    name: str
    kind: str
    qualified_name: str
    start_line: int
    end_line: int
    name_start_byte: int
    name_end_byte: int
    parent: str


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """DocumentRow is a live, indexable document with its repository name and symbols."""

    id: uuid.UUID
    path: str
    content: str
    language: str
    repository: str
    symbols: tuple[SymbolRow, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class TenantCounts:
    """TenantCounts is what Postgres holds for a tenant: head revision, live and skipped documents."""

    head_revision: int
    live_documents: int
    skipped: dict[str, int]
    symbols: int


_DOCUMENT_COLUMNS = """
    d.id, d.path, d.content, coalesce(d.language, '') as language,
    coalesce(r.full_name, '') as repository
"""


class SearchStore:
    """SearchStore runs the search service's queries on the shared pool."""

    def __init__(self, pool: LazyPool) -> None:
        self._pool = pool

    @property
    def pool(self) -> LazyPool:
        """pool is the shared pool (a rebuild's stream holds one of its connections, buildstream.py)."""
        return self._pool

    async def check_ready(self) -> None:
        """check_ready raises unless the tables the search service reads exist."""
        await require_tables(self._pool, TABLES)

    async def revision_watermark(self) -> Watermark:
        """revision_watermark reads the revision sequence, then the transactions writing documents.

        Two statements, in this order (tailer.py proves the rule that depends on it): the
        sequence value first, then the writers, both outside any snapshot.
        """
        pool = self._pool.get()
        with db.translated_errors():
            async with pool.acquire() as conn:
                sequence = await conn.fetchval(
                    "select case when is_called then last_value else 0 end from public.document_revision_seq"
                )
                rows = await conn.fetch(
                    """
                    select l.virtualtransaction as vxid, l.locktype, l.objid::text::bigint as key,
                           (select x.transactionid::text::bigint from pg_catalog.pg_locks x
                             where x.locktype = 'transactionid' and x.granted
                               and x.virtualtransaction = l.virtualtransaction
                             limit 1) as xid
                      from pg_catalog.pg_locks l
                     where l.pid is distinct from pg_catalog.pg_backend_pid()
                       and ((l.locktype = 'relation' and l.relation = 'public.documents'::regclass
                             and l.mode = any($1::text[]))
                            or (l.locktype = 'advisory' and l.classid = $2::oid and l.objsubid = 2))
                    """,
                    list(_WRITE_MODES),
                    WRITER_LOCK_CLASS,
                )
        found: dict[str, tuple[int | None, set[int], bool]] = {}
        for r in rows:
            xid, keys, documents = found.setdefault(str(r["vxid"]), (None, set(), False))
            xid = xid if r["xid"] is None else int(r["xid"])
            if r["locktype"] == "advisory":
                keys.add(int(r["key"]))
            else:
                documents = True
            found[str(r["vxid"])] = (xid, keys, documents)
        writers = tuple(Writer(v, x, frozenset(k), d) for v, (x, k, d) in sorted(found.items()))
        return Watermark(int(sequence), writers)

    async def head_revision(self) -> int:
        """head_revision is the last revision the database has handed out (any tenant)."""
        with db.translated_errors():
            value = await self._pool.get().fetchval(
                "select case when is_called then last_value else 0 end from public.document_revision_seq"
            )
        return int(value)

    async def tenant_key(self, tenant: uuid.UUID) -> int:
        """tenant_key is the key of the tenant's writer lock, as pg_locks shows it (objid)."""
        with db.translated_errors():
            key = await self._pool.get().fetchval(
                "select pg_catalog.hashtext($1::text)::bigint & 4294967295", str(tenant)
            )
        return int(key)

    async def feed_rows(self, tenant: uuid.UUID, after: int, limit: int) -> tuple[Snapshot, list[Change]]:
        """feed_rows reads the tenant's change rows above `after` and the snapshot they were read in."""
        async with db.as_service(self._pool.get()) as conn:
            snap = await conn.fetchrow(
                "select pg_catalog.pg_snapshot_xmax(s)::text::bigint as xmax,"
                " array(select x::text::bigint from pg_catalog.pg_snapshot_xip(s) x) as xip"
                " from pg_catalog.pg_current_snapshot() s"
            )
            rows = await conn.fetch(
                "select revision, document_id, op from public.document_changes"
                " where user_id = $1 and revision > $2 order by revision limit $3",
                tenant,
                after,
                limit,
            )
        assert snap is not None
        snapshot = Snapshot(int(snap["xmax"]), frozenset(int(x) for x in snap["xip"]))
        return snapshot, [Change(int(r["revision"]), r["document_id"], r["op"] == "delete") for r in rows]

    async def documents(self, tenant: uuid.UUID, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, DocumentRow]:
        """documents returns the live, indexable documents among `ids`, with their symbols."""
        async with db.as_service(self._pool.get()) as conn:
            rows = await conn.fetch(
                f"select {_DOCUMENT_COLUMNS} from public.documents d"
                " left join public.repositories r on r.id = d.repository_id and r.user_id = d.user_id"
                " where d.user_id = $1 and d.id = any($2::uuid[])"
                " and d.deleted_at is null and d.index_skip is null",
                tenant,
                list(ids),
            )
            symbols = await _symbols(conn, tenant, [r["id"] for r in rows])
        return {r["id"]: _document(r, symbols.get(r["id"], ())) for r in rows}

    async def tenant_counts(self, tenant: uuid.UUID) -> TenantCounts:
        """tenant_counts reads the tenant's head revision, live documents and skips by reason."""
        async with db.as_service(self._pool.get()) as conn:
            head = await conn.fetchval(
                "select coalesce(max(revision), 0) from public.document_changes where user_id = $1", tenant
            )
            rows = await conn.fetch(
                "select index_skip, count(*) as n from public.documents"
                " where user_id = $1 and deleted_at is null group by index_skip",
                tenant,
            )
            symbols = await conn.fetchval(
                "select count(*) from public.symbols s join public.documents d on d.id = s.document_id"
                " where s.user_id = $1 and d.user_id = $1 and d.deleted_at is null and d.index_skip is null",
                tenant,
            )
        skipped = {str(r["index_skip"]): int(r["n"]) for r in rows if r["index_skip"] is not None}
        live = sum(int(r["n"]) for r in rows)
        return TenantCounts(int(head), live, skipped, int(symbols))


async def _symbols(
    conn: Connection, tenant: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[SymbolRow, ...]]:
    """_symbols loads the symbols of `ids`, grouped by document, in line order."""
    if not ids:
        return {}
    rows = await conn.fetch(
        "select document_id, name, kind, coalesce(qualified_name, name) as qualified_name,"
        " start_line, end_line, name_start_byte, name_end_byte, coalesce(parent, '') as parent"
        " from public.symbols where user_id = $1 and document_id = any($2::uuid[])"
        " order by document_id, start_line, id",
        tenant,
        list(ids),
    )
    out: dict[uuid.UUID, list[SymbolRow]] = {}
    for r in rows:
        out.setdefault(r["document_id"], []).append(
            SymbolRow(
                r["name"],
                r["kind"],
                r["qualified_name"],
                int(r["start_line"]),
                int(r["end_line"]),
                int(r["name_start_byte"]),
                int(r["name_end_byte"]),
                r["parent"],
            )
        )
    return {k: tuple(v) for k, v in out.items()}


def _document(r: asyncpg.Record, symbols: tuple[SymbolRow, ...]) -> DocumentRow:
    """_document builds a DocumentRow from a documents row (see _DOCUMENT_COLUMNS)."""
    return DocumentRow(r["id"], r["path"], r["content"], r["language"], r["repository"], symbols)
