"""Repository and webhook-delivery queries (asyncpg), on a connection the caller already opened.

Every function takes a connection inside `db.as_user(...)` (RPCs: row level security confines
it to the caller's rows) or `db.as_service(...)` (the webhook, which has no user, and workers),
and never opens a transaction of its own, so a caller can combine several in one. Rows come back
as `RepositoryRecord`s; the encrypted secrets stay bytes and are only opened by
services/ingest/repositories.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from services.common.db import Connection

# The columns every repository read returns; document_count is a live count (indexed by
# documents_repository_id_idx), so callers that never show it can skip it.
_COLUMNS = """
  r.id, r.user_id, r.full_name, r.url, r.provider, r.default_branch, r.webhook_secret_encrypted,
  r.access_token_encrypted, r.last_synced_commit, r.last_synced_at, r.state, r.error, r.settings,
  r.request_id, r.created_at, r.updated_at
"""
_COUNT = """,
  (select count(*) from public.documents d
    where d.repository_id = r.id and d.user_id = r.user_id and d.deleted_at is null) as document_count
"""


@dataclasses.dataclass(frozen=True)
class RepositoryRecord:
    """RepositoryRecord is one repositories row, with its settings jsonb unpacked.

    `branch` is the tracked branch, empty for "the remote's default branch (HEAD)" until a sync
    resolves it. `include_globs`, `exclude_globs` and `max_file_bytes` (0: the server's limit)
    come from `settings`. The two `*_encrypted` fields are SecretBox blobs (never printed:
    repr=False); `document_count` is -1 when the query did not count.
    """

    id: uuid.UUID
    user_id: uuid.UUID
    full_name: str
    url: str
    provider: str
    branch: str
    state: str
    error: Mapping[str, Any] | None
    last_synced_commit: str | None
    last_synced_at: datetime.datetime | None
    include_globs: tuple[str, ...]
    exclude_globs: tuple[str, ...]
    max_file_bytes: int
    request_id: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    webhook_secret_encrypted: bytes | None = dataclasses.field(default=None, repr=False)
    access_token_encrypted: bytes | None = dataclasses.field(default=None, repr=False)
    document_count: int = -1

    @property
    def has_access_token(self) -> bool:
        """has_access_token tells whether a clone token is stored."""
        return self.access_token_encrypted is not None


def _json(value: Any) -> Any:
    # asyncpg returns jsonb as text unless a codec is set; the pool sets none.
    return json.loads(value) if isinstance(value, str) else value


def record_from_row(row: asyncpg.Record) -> RepositoryRecord:
    """record_from_row builds a RepositoryRecord from a row selected with this module's columns."""
    settings = _json(row["settings"]) or {}
    error = _json(row["error"])
    return RepositoryRecord(
        id=row["id"],
        user_id=row["user_id"],
        full_name=row["full_name"],
        url=row["url"],
        provider=row["provider"],
        branch=row["default_branch"],
        state=row["state"],
        error=error if isinstance(error, dict) else None,
        last_synced_commit=row["last_synced_commit"],
        last_synced_at=row["last_synced_at"],
        include_globs=tuple(str(g) for g in settings.get("include_globs", ())),
        exclude_globs=tuple(str(g) for g in settings.get("exclude_globs", ())),
        max_file_bytes=int(settings.get("max_file_bytes", 0)),
        request_id=row["request_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        webhook_secret_encrypted=row["webhook_secret_encrypted"],
        access_token_encrypted=row["access_token_encrypted"],
        document_count=int(row.get("document_count", -1)),
    )


def settings_document(include_globs: Sequence[str], exclude_globs: Sequence[str], max_file_bytes: int) -> str:
    """settings_document is the repositories.settings jsonb for these filters."""
    return json.dumps(
        {
            "include_globs": list(include_globs),
            "exclude_globs": list(exclude_globs),
            "max_file_bytes": max_file_bytes,
        }
    )


async def insert(
    conn: Connection,
    *,
    repository_id: uuid.UUID,
    user_id: uuid.UUID,
    full_name: str,
    url: str,
    provider: str,
    branch: str,
    settings: str,
    webhook_secret_encrypted: bytes,
    access_token_encrypted: bytes | None,
    request_id: str | None,
) -> RepositoryRecord:
    """insert adds a repository row and returns it (unique violations surface as AlreadyExists)."""
    row = await conn.fetchrow(
        f"""insert into public.repositories as r
              (id, user_id, full_name, url, provider, default_branch, settings,
               webhook_secret_encrypted, access_token_encrypted, request_id)
            values ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10)
            returning {_COLUMNS}, 0::bigint as document_count""",
        repository_id,
        user_id,
        full_name,
        url,
        provider,
        branch,
        settings,
        webhook_secret_encrypted,
        access_token_encrypted,
        request_id,
    )
    assert row is not None
    return record_from_row(row)


async def get(
    conn: Connection, repository_id: uuid.UUID, *, count: bool = True, lock: bool = False
) -> RepositoryRecord | None:
    """get returns one repository visible on `conn`, or None; `lock` locks the row (no key update).

    `for no key update` does not wait for workers' and webhooks' foreign-key checks (key share).
    """
    row = await conn.fetchrow(
        f"select {_COLUMNS}{_COUNT if count else ''} from public.repositories r where r.id = $1"
        + (" for no key update of r" if lock else ""),
        repository_id,
    )
    return record_from_row(row) if row is not None else None


async def get_by_request_id(conn: Connection, user_id: uuid.UUID, request_id: str) -> RepositoryRecord | None:
    """get_by_request_id returns the repository a CreateRepository with `request_id` made, or None."""
    row = await conn.fetchrow(
        f"select {_COLUMNS}{_COUNT} from public.repositories r where r.user_id = $1 and r.request_id = $2",
        user_id,
        request_id,
    )
    return record_from_row(row) if row is not None else None


async def page(
    conn: Connection, user_id: uuid.UUID, *, after: tuple[str, uuid.UUID] | None, limit: int
) -> list[RepositoryRecord]:
    """page returns up to `limit` repositories ordered by (full_name, id), after the given key."""
    if after is None:
        rows = await conn.fetch(
            f"""select {_COLUMNS}{_COUNT} from public.repositories r where r.user_id = $1
                order by r.full_name, r.id limit $2""",
            user_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"""select {_COLUMNS}{_COUNT} from public.repositories r
                where r.user_id = $1 and (r.full_name, r.id) > ($2, $3)
                order by r.full_name, r.id limit $4""",
            user_id,
            after[0],
            after[1],
            limit,
        )
    return [record_from_row(row) for row in rows]


async def update_filters(
    conn: Connection,
    repository_id: uuid.UUID,
    *,
    branch: str,
    settings: str,
    reset_commit: bool,
) -> RepositoryRecord | None:
    """update_filters stores a new branch and settings; `reset_commit` forgets the synced commit.

    Forgetting it makes the next sync a full one, which a changed branch or filter needs: an
    incremental sync only looks at paths that changed between two commits.
    """
    row = await conn.fetchrow(
        f"""update public.repositories r
               set default_branch = $2, settings = $3::jsonb,
                   last_synced_commit = case when $4 then null else r.last_synced_commit end
             where r.id = $1
         returning {_COLUMNS}{_COUNT}""",
        repository_id,
        branch,
        settings,
        reset_commit,
    )
    return record_from_row(row) if row is not None else None


async def set_webhook_secret(
    conn: Connection, repository_id: uuid.UUID, blob: bytes
) -> RepositoryRecord | None:
    """set_webhook_secret replaces a repository's encrypted webhook secret; None if not visible."""
    row = await conn.fetchrow(
        f"""update public.repositories r set webhook_secret_encrypted = $2 where r.id = $1
            returning {_COLUMNS}{_COUNT}""",
        repository_id,
        blob,
    )
    return record_from_row(row) if row is not None else None


async def mark_error(conn: Connection, repository_id: uuid.UUID, reason: str, message: str) -> None:
    """mark_error puts a repository in state `error` with `{reason, message}` as its error."""
    await conn.execute(
        "update public.repositories set state = 'error', error = $2::jsonb where id = $1",
        repository_id,
        json.dumps({"reason": reason, "message": message}),
    )


async def mark_deleting(conn: Connection, repository_id: uuid.UUID) -> bool:
    """mark_deleting puts a repository visible on `conn` in state `deleting`; False if there is none.

    A plain row update takes no lock that a worker's or webhook's foreign-key check waits for.
    """
    marked = await conn.fetchval(
        "update public.repositories set state = 'deleting' where id = $1 returning id", repository_id
    )
    return marked is not None


async def delete(conn: Connection, repository_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """delete removes a repository's jobs, then the repository; documents and deliveries cascade.

    Each cascaded document delete fires documents_record_change, which writes the tombstone
    into the change feed, in this same transaction. Jobs go first, so a worker holding one
    finishes its batch before this proceeds and loses its lease at its next checkpoint.
    """
    await conn.execute(
        "delete from public.indexing_jobs where repository_id = $1 and user_id = $2", repository_id, user_id
    )
    deleted = await conn.fetchval(
        "delete from public.repositories where id = $1 and user_id = $2 returning id", repository_id, user_id
    )
    return deleted is not None


async def sealed_page(
    conn: Connection, *, after: uuid.UUID | None, limit: int
) -> list[tuple[uuid.UUID, bytes | None, bytes | None]]:
    """sealed_page locks and returns (id, secret blob, token blob) of up to `limit` repositories by id."""
    rows = await conn.fetch(
        "select id, webhook_secret_encrypted, access_token_encrypted from public.repositories"
        " where ($1::uuid is null or id > $1) order by id limit $2 for update",
        after,
        limit,
    )
    return [(row[0], row[1], row[2]) for row in rows]


async def set_sealed(
    conn: Connection, repository_id: uuid.UUID, secret: bytes | None, token: bytes | None
) -> None:
    """set_sealed stores re-sealed blobs for one repository (None keeps what is there)."""
    await conn.execute(
        "update public.repositories set webhook_secret_encrypted = coalesce($2, webhook_secret_encrypted),"
        " access_token_encrypted = coalesce($3, access_token_encrypted) where id = $1",
        repository_id,
        secret,
        token,
    )


@dataclasses.dataclass(frozen=True)
class DeliveryRecord:
    """DeliveryRecord is one webhook_deliveries row: what GitHub sent and what it caused."""

    id: uuid.UUID
    repository_id: uuid.UUID
    delivery_id: str
    event: str
    status: str
    job_id: uuid.UUID | None
    ignored_reason: str | None
    ref: str | None
    after: str | None


def _delivery(row: asyncpg.Record) -> DeliveryRecord:
    return DeliveryRecord(
        id=row["id"],
        repository_id=row["repository_id"],
        delivery_id=row["delivery_id"],
        event=row["event"],
        status=row["status"],
        job_id=row["job_id"],
        ignored_reason=row["ignored_reason"],
        ref=row["ref"],
        after=row["after"],
    )


_DELIVERY_COLUMNS = "id, repository_id, delivery_id, event, status, job_id, ignored_reason, ref, after"


async def record_delivery(
    conn: Connection,
    *,
    repository_id: uuid.UUID,
    user_id: uuid.UUID,
    delivery_id: str,
    event: str,
    payload_sha256: str,
    ref: str | None,
    after: str | None,
) -> DeliveryRecord | None:
    """record_delivery stores a verified delivery as `received`; None when the id was seen before."""
    row = await conn.fetchrow(
        f"""insert into public.webhook_deliveries
              (repository_id, user_id, delivery_id, event, signature_valid, payload_sha256, ref, after)
            values ($1, $2, $3, $4, true, $5, $6, $7)
            on conflict (repository_id, delivery_id) do nothing
            returning {_DELIVERY_COLUMNS}""",
        repository_id,
        user_id,
        delivery_id,
        event,
        payload_sha256,
        ref,
        after,
    )
    return _delivery(row) if row is not None else None


async def get_delivery(conn: Connection, repository_id: uuid.UUID, delivery_id: str) -> DeliveryRecord | None:
    """get_delivery returns the delivery GitHub numbered `delivery_id` for a repository, or None."""
    row = await conn.fetchrow(
        f"select {_DELIVERY_COLUMNS} from public.webhook_deliveries"
        " where repository_id = $1 and delivery_id = $2",
        repository_id,
        delivery_id,
    )
    return _delivery(row) if row is not None else None


async def fail_delivery(conn: Connection, delivery: uuid.UUID, *, reason: str, message: str) -> None:
    """fail_delivery marks a delivery `failed` with `{reason, message}` as its error."""
    await conn.execute(
        "update public.webhook_deliveries set status = 'failed', error = $2::jsonb where id = $1",
        delivery,
        json.dumps({"reason": reason, "message": message}),
    )


async def finish_delivery(
    conn: Connection,
    delivery: uuid.UUID,
    *,
    status: str,
    job_id: uuid.UUID | None = None,
    ignored_reason: str | None = None,
) -> None:
    """finish_delivery records what a delivery caused: `queued` with its job, or `processed`."""
    await conn.execute(
        "update public.webhook_deliveries set status = $2, job_id = $3, ignored_reason = $4 where id = $1",
        delivery,
        status,
        job_id,
        ignored_reason,
    )
