"""The document queries of the ingest service (asyncpg): documents, symbols, request ids.

Every function takes a connection that is already inside a transaction, `db.as_user` for RPCs
(row level security confines it to the caller) or `db.as_service` for workers; each also names
the user explicitly, so a service-role caller is confined the same way. Nothing here commits.

Writes go through the triggers of 20261124000400: every insert or update of a document takes
the next revision and appends a change-feed row, so the writer decides "unchanged" before it
writes, and the upsert's `WHERE` repeats that test so that a concurrent identical write is not
turned into a second revision either.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.db import Connection
from services.ingest.symbolizer import SymbolRow


@dataclass(frozen=True, slots=True)
class StoredState:
    """StoredState is what the writer compares to decide that an upsert changes nothing."""

    id: uuid.UUID
    path: str
    revision: int
    content_hash: str
    language: str | None
    metadata: dict[str, str]
    title: str | None
    tags: tuple[str, ...]
    deleted: bool
    index_skip: str | None
    index_skip_detail: str


@dataclass(frozen=True, slots=True)
class WriteRow:
    """WriteRow is one validated document to write (`tags` sorted and distinct)."""

    path: str
    content: str
    language: str | None
    metadata: dict[str, str]
    title: str | None
    tags: tuple[str, ...]
    index_skip: str | None
    index_skip_detail: str


@dataclass(frozen=True, slots=True)
class Written:
    """Written is a document as the upsert left it: id, revision, hash, and whether it was new."""

    id: uuid.UUID
    path: str
    revision: int
    content_hash: str
    created: bool


def _repository_clause(repository_id: uuid.UUID | None, position: int) -> str:
    """_repository_clause matches one repository (or pushed documents) with an indexable test."""
    return "repository_id is null" if repository_id is None else f"repository_id = ${position}"


def _repository_args(repository_id: uuid.UUID | None) -> list[Any]:
    """_repository_args is the parameter `_repository_clause` needs (none for pushed documents)."""
    return [] if repository_id is None else [repository_id]


async def visible_repositories(
    conn: Connection, user_id: uuid.UUID, repository_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """visible_repositories are those of `repository_ids` that exist and belong to `user_id`."""
    if not repository_ids:
        return set()
    rows = await conn.fetch(
        "select id from public.repositories where user_id = $1 and id = any($2::uuid[])",
        user_id,
        list(set(repository_ids)),
    )
    return {row["id"] for row in rows}


async def current_states(
    conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None, paths: Sequence[str]
) -> dict[str, StoredState]:
    """current_states maps each of `paths` that exists in the repository to its stored state."""
    if not paths:
        return {}
    rows = await conn.fetch(
        "select id, path, revision, content_hash, language, metadata::text as metadata, title, tags,"
        " deleted_at is not null as deleted, index_skip, index_skip_detail"
        " from public.documents where user_id = $1 and path = any($2::text[])"
        f" and {_repository_clause(repository_id, 3)}",
        user_id,
        list(paths),
        *_repository_args(repository_id),
    )
    return {
        row["path"]: StoredState(
            id=row["id"],
            path=row["path"],
            revision=row["revision"],
            content_hash=row["content_hash"],
            language=row["language"],
            metadata=json.loads(row["metadata"]),
            title=row["title"],
            tags=tuple(row["tags"]),
            deleted=row["deleted"],
            index_skip=row["index_skip"],
            index_skip_detail=row["index_skip_detail"] or "",
        )
        for row in rows
    }


_UPSERT = """
insert into public.documents as d
  (user_id, repository_id, path, language, content, metadata, title, tags, index_skip, index_skip_detail)
select $1, $2, k.path, k.language, k.content, k.metadata::jsonb, k.title,
  array(select jsonb_array_elements_text(k.tags::jsonb)), k.skip, nullif(k.detail, '')
from unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
  as k(path, language, content, metadata, title, tags, skip, detail)
on conflict on constraint documents_user_id_repository_id_path_key do update set
  language = excluded.language, content = excluded.content, metadata = excluded.metadata,
  title = excluded.title, tags = excluded.tags, index_skip = excluded.index_skip,
  index_skip_detail = excluded.index_skip_detail, deleted_at = null
where d.deleted_at is not null
  or d.content_hash <> excluded.content_hash
  or d.language is distinct from excluded.language
  or d.metadata <> excluded.metadata
  or d.title is distinct from excluded.title
  or d.tags <> excluded.tags
returning d.id, d.path, d.revision, d.content_hash, (d.xmax = 0) as created
"""


async def upsert_documents(
    conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None, rows: Sequence[WriteRow]
) -> dict[str, Written]:
    """upsert_documents writes `rows` (distinct paths) in one statement; returns those it wrote.

    A row identical to the stored document is not written (and not returned): the caller then
    reports the stored revision as unchanged.
    """
    if not rows:
        return {}
    records = await conn.fetch(
        _UPSERT,
        user_id,
        repository_id,
        [r.path for r in rows],
        [r.language for r in rows],
        [r.content for r in rows],
        [json.dumps(r.metadata, sort_keys=True) for r in rows],
        [r.title for r in rows],
        [json.dumps(list(r.tags)) for r in rows],
        [r.index_skip for r in rows],
        [r.index_skip_detail for r in rows],
    )
    return {
        rec["path"]: Written(rec["id"], rec["path"], rec["revision"], rec["content_hash"], rec["created"])
        for rec in records
    }


# The symbol rows of a batch are loaded with binary COPY into a temporary table, then moved into
# public.symbols with one INSERT … SELECT: COPY cannot write a table under row level security,
# and COPY's binary rows cost the client and the server far less than a dozen parallel arrays
# for `unnest` (~20,000 rows a batch). The temporary table lives for one call of
# `replace_symbols` inside the caller's transaction (dropped before it returns, and on commit or
# rollback in any case), so nothing of it survives into a pooled session's next client.
_SYMBOL_LOAD = "kotadb_symbol_load"
_SYMBOL_LOAD_COLUMNS = (
    "document_id",
    "name",
    "kind",
    "qualified_name",
    "start_line",
    "start_column",
    "end_line",
    "end_column",
    "signature",
    "parent",
    "name_start_byte",
    "name_end_byte",
)
_CREATE_SYMBOL_LOAD = f"""
create temporary table {_SYMBOL_LOAD} (
  document_id uuid, name text, kind text, qualified_name text, start_line int, start_column int,
  end_line int, end_column int, signature text, parent text, name_start_byte int, name_end_byte int
) on commit drop
"""
_INSERT_SYMBOLS = f"""
insert into public.symbols (user_id, {", ".join(_SYMBOL_LOAD_COLUMNS)})
select $1, {", ".join(_SYMBOL_LOAD_COLUMNS)} from pg_temp.{_SYMBOL_LOAD}
"""


async def replace_symbols(
    conn: Connection,
    user_id: uuid.UUID,
    symbols: Sequence[tuple[uuid.UUID, Sequence[SymbolRow]]],
    *,
    new_documents: Collection[uuid.UUID] = frozenset(),
) -> int:
    """replace_symbols replaces the stored symbols of each document; returns the rows inserted.

    `new_documents` are documents inserted by this transaction: they cannot have symbols yet (the
    foreign key needs the document first), so no delete is run for them. On a bulk push that is
    every document, and the delete's plan on a freshly grown table can be a sequential scan.
    """
    if not symbols:
        return 0
    replaced = [document_id for document_id, _ in symbols if document_id not in new_documents]
    if replaced:
        await conn.execute(
            "delete from public.symbols where user_id = $1 and document_id = any($2::uuid[])",
            user_id,
            replaced,
        )
    # Empty strings are stored as NULL (the columns are optional), as the reads expect.
    records = [
        (
            document_id,
            s.name,
            s.kind,
            s.qualified_name or None,
            s.start_line,
            s.start_column,
            s.end_line,
            s.end_column,
            s.signature or None,
            s.parent or None,
            s.name_start_byte,
            s.name_end_byte,
        )
        for document_id, rows in symbols
        for s in rows
    ]
    if not records:
        return 0
    await conn.execute(_CREATE_SYMBOL_LOAD)
    await conn.copy_records_to_table(
        _SYMBOL_LOAD, schema_name="pg_temp", records=records, columns=_SYMBOL_LOAD_COLUMNS
    )
    await conn.execute(_INSERT_SYMBOLS, user_id)
    await conn.execute(f"drop table pg_temp.{_SYMBOL_LOAD}")
    return len(records)


_TOMBSTONE = """
update public.documents set deleted_at = now(), content = '', index_skip = null, index_skip_detail = null
where user_id = $1 and deleted_at is null and {where}
returning id, revision
"""


async def tombstone_ids(
    conn: Connection, user_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """tombstone_ids deletes live documents by id (content dropped, row kept); returns id → revision."""
    rows = await conn.fetch(_TOMBSTONE.format(where="id = any($2::uuid[])"), user_id, list(ids))
    return await _drop_symbols(conn, user_id, rows)


async def tombstone_paths(
    conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None, paths: Sequence[str]
) -> dict[uuid.UUID, int]:
    """tombstone_paths deletes live documents of a repository by path; returns id → revision."""
    where = f"path = any($2::text[]) and {_repository_clause(repository_id, 3)}"
    rows = await conn.fetch(
        _TOMBSTONE.format(where=where), user_id, list(paths), *_repository_args(repository_id)
    )
    return await _drop_symbols(conn, user_id, rows)


async def _drop_symbols(conn: Connection, user_id: uuid.UUID, rows: Sequence[Any]) -> dict[uuid.UUID, int]:
    """_drop_symbols deletes the symbols of tombstoned documents; returns their id → revision."""
    deleted = {row["id"]: row["revision"] for row in rows}
    if deleted:
        await conn.execute(
            "delete from public.symbols where user_id = $1 and document_id = any($2::uuid[])",
            user_id,
            list(deleted),
        )
    return deleted


async def content_hashes(
    conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None
) -> dict[str, str]:
    """content_hashes maps every live document path of a repository to its content hash."""
    rows = await conn.fetch(
        "select path, content_hash from public.documents where user_id = $1 and deleted_at is null"
        f" and {_repository_clause(repository_id, 2)}",
        user_id,
        *_repository_args(repository_id),
    )
    return {row["path"]: row["content_hash"] for row in rows}


@dataclass(frozen=True, slots=True)
class RequestClaim:
    """RequestClaim says whether this call owns a request id, or what the first call answered."""

    owned: bool
    fingerprint: str = ""
    response: Any = None


async def claim_request(
    conn: Connection,
    user_id: uuid.UUID,
    method: str,
    request_id: str,
    fingerprint: str,
    retention: float,
) -> RequestClaim:
    """claim_request records `request_id` for this transaction, or returns the first call's answer.

    A concurrent call with the same id blocks on the primary key until this transaction ends,
    then finds the committed answer. Expired rows of the user are pruned first so the id is free.
    """
    await conn.execute(
        "delete from public.ingest_requests where user_id = $1"
        " and created_at < now() - make_interval(secs => $2)",
        user_id,
        retention,
    )
    inserted = await conn.fetchval(
        "insert into public.ingest_requests (user_id, method, request_id, fingerprint)"
        " values ($1, $2, $3, $4) on conflict do nothing returning true",
        user_id,
        method,
        request_id,
        fingerprint,
    )
    if inserted:
        return RequestClaim(owned=True)
    row = await conn.fetchrow(
        "select fingerprint, response::text as response from public.ingest_requests"
        " where user_id = $1 and method = $2 and request_id = $3",
        user_id,
        method,
        request_id,
    )
    if row is None:  # pruned by a concurrent call between the two statements: take it again
        return await claim_request(conn, user_id, method, request_id, fingerprint, retention)
    response = json.loads(row["response"]) if row["response"] is not None else None
    return RequestClaim(owned=False, fingerprint=row["fingerprint"], response=response)


async def record_response(
    conn: Connection, user_id: uuid.UUID, method: str, request_id: str, response: Any
) -> None:
    """record_response stores the answer of a claimed request id (committed with the write)."""
    await conn.execute(
        "update public.ingest_requests set response = $4::jsonb"
        " where user_id = $1 and method = $2 and request_id = $3",
        user_id,
        method,
        request_id,
        json.dumps(response),
    )


async def prune_requests(conn: Connection, retention: float) -> int:
    """prune_requests deletes every user's request ids older than `retention` seconds (workers)."""
    status = await conn.execute(
        "delete from public.ingest_requests where created_at < now() - make_interval(secs => $1)", retention
    )
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """DocumentRow is one document as read back; `content` is None when it was not selected."""

    id: uuid.UUID
    repository_id: uuid.UUID | None
    repository_name: str
    path: str
    language: str | None
    content: str | None
    size: int
    content_hash: str
    revision: int
    metadata: dict[str, str]
    title: str | None
    tags: tuple[str, ...]
    index_skip: str | None
    index_skip_detail: str
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted_at: dt.datetime | None


_DOCUMENT_COLUMNS = (
    "d.id, d.repository_id, coalesce(r.full_name, '') as repository_name, d.path, d.language, {content},"
    " d.size, d.content_hash, d.revision, d.metadata::text as metadata, d.title, d.tags, d.index_skip,"
    " d.index_skip_detail, d.created_at, d.updated_at, d.deleted_at"
)
_FROM = (
    " from public.documents d"
    " left join public.repositories r on r.id = d.repository_id and r.user_id = d.user_id"
)


def _document(row: Any) -> DocumentRow:
    """_document reads one documents row into a DocumentRow."""
    return DocumentRow(
        id=row["id"],
        repository_id=row["repository_id"],
        repository_name=row["repository_name"],
        path=row["path"],
        language=row["language"],
        content=row["content"],
        size=row["size"],
        content_hash=row["content_hash"],
        revision=row["revision"],
        metadata=json.loads(row["metadata"]),
        title=row["title"],
        tags=tuple(row["tags"]),
        index_skip=row["index_skip"],
        index_skip_detail=row["index_skip_detail"] or "",
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
    )


async def get_document(
    conn: Connection, user_id: uuid.UUID, document_id: uuid.UUID, *, with_content: bool
) -> DocumentRow | None:
    """get_document reads one of the user's documents (tombstones included), or None."""
    columns = _DOCUMENT_COLUMNS.format(content="d.content" if with_content else "null::text as content")
    row = await conn.fetchrow(
        f"select {columns}{_FROM} where d.user_id = $1 and d.id = $2", user_id, document_id
    )
    return _document(row) if row is not None else None


@dataclass(frozen=True, slots=True)
class ListFilter:
    """ListFilter holds ListDocuments' filters; empty strings and None mean "any"."""

    repository_id: uuid.UUID | None = None
    path_prefix: str = ""
    language: str = ""
    tag: str = ""
    show_deleted: bool = False


async def list_documents(
    conn: Connection,
    user_id: uuid.UUID,
    filters: ListFilter,
    *,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
    with_content: bool,
) -> list[DocumentRow]:
    """list_documents returns up to `limit` documents ordered by (path, id), after the keyset `after`."""
    args: list[Any] = [user_id]
    where = ["d.user_id = $1"]

    def arg(value: Any) -> str:
        """arg appends a query parameter and returns its placeholder."""
        args.append(value)
        return f"${len(args)}"

    if filters.repository_id is not None:
        where.append(f"d.repository_id = {arg(filters.repository_id)}")
    if filters.path_prefix:
        where.append(f"starts_with(d.path, {arg(filters.path_prefix)})")
    if filters.language:
        where.append(f"d.language = {arg(filters.language)}")
    if filters.tag:
        where.append(f"d.tags @> array[{arg(filters.tag)}::text]")
    if not filters.show_deleted:
        where.append("d.deleted_at is null")
    if after is not None:
        where.append(f"(d.path, d.id) > ({arg(after[0])}::text, {arg(after[1])}::uuid)")
    columns = _DOCUMENT_COLUMNS.format(content="d.content" if with_content else "null::text as content")
    rows = await conn.fetch(
        f"select {columns}{_FROM} where {' and '.join(where)} order by d.path, d.id limit {arg(limit)}", *args
    )
    return [_document(row) for row in rows]
