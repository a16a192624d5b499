"""DocumentService: the document RPCs' rules around DocumentWriter — transactions, retries, pages.

Every call runs as the caller under row level security (`db.as_user`); the tenant is the
verified identity's user id, never a request field. On top of the writer it adds

* request ids: the first answer to a write carrying a `request_id` is stored in the same
  transaction (`ingest_requests`), so a retry returns it and writes nothing new; the same id
  with a different batch is refused (REQUEST_ID_REUSED);
* streams: `upsert_stream` commits one transaction per `stream_batch_items` documents or
  `stream_batch_bytes` content bytes, whichever comes first, so memory stays bounded whatever
  the stream's length; a stream's request id makes each of its batches idempotent, so a retried
  stream replays the batches that committed and writes the rest;
* reads: GetDocument, and ListDocuments by keyset on (path, id), whose page tokens carry the
  last row seen and a digest of the filters (a token reused with other filters is refused), so
  pages stay stable while others write;
* DeleteDocument: a tombstone (content dropped, row kept) that the change feed carries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.common import db
from services.common.errors import FieldViolation, InvalidArgument, NotFound
from services.common.server import LazyPool
from services.ingest import documentstore as store
from services.ingest.config import IngestSettings
from services.ingest.documents import (
    MAX_REQUEST_ID_CHARS,
    BatchOutcome,
    DocumentInput,
    DocumentLimits,
    DocumentWriter,
    ItemResult,
    check_request,
    fingerprint,
)
from services.ingest.symbolizer import Symbolizer

UPSERT_METHOD = "UpsertDocuments"
STREAM_METHOD = "StreamUpsertDocuments"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def limits_from_settings(settings: IngestSettings) -> DocumentLimits:
    """limits_from_settings picks the document limits out of the ingest settings."""
    return DocumentLimits(
        max_document_bytes=settings.max_document_bytes,
        max_metadata_bytes=settings.max_metadata_bytes,
        max_tags=settings.max_tags,
        max_batch_items=settings.max_batch_items,
        max_batch_bytes=settings.max_batch_bytes,
    )


def check_request_id(request_id: str) -> None:
    """check_request_id refuses an idempotency key that is too long or unprintable ("" means none)."""
    if request_id and not (len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isprintable()):
        raise InvalidArgument(
            "request_id must be 1 to 128 printable characters (a UUID is best)",
            field_violations=[
                FieldViolation("request_id", "1 to 128 printable characters", "REQUEST_ID_INVALID")
            ],
        )


def _reused(request_id: str) -> InvalidArgument:
    """_reused is the refusal of a request id already used for a different request."""
    return InvalidArgument(
        "this request_id was used for a different request",
        reason="REQUEST_ID_REUSED",
        field_violations=[
            FieldViolation("request_id", "already used for another request", "REQUEST_ID_REUSED")
        ],
        metadata={"request_id": request_id},
    )


@dataclass
class StreamOutcome:
    """StreamOutcome sums up a stream: counts, the highest revision, and the results it keeps.

    Results are kept while fewer than `max_results` are held; past that, only refused items are
    kept (up to as many again) and `truncated` is set, so a long stream's answer stays bounded.
    """

    max_results: int
    results: list[ItemResult] = field(default_factory=list)
    revision: int = 0
    document_count: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    batches: int = 0
    truncated: bool = False

    def add(self, outcome: BatchOutcome) -> None:
        """add folds one committed batch into the summary."""
        self.batches += 1
        self.revision = max(self.revision, outcome.revision)
        for result in outcome.results:
            self.document_count += 1
            if result.rejected:
                self.rejected += 1
            elif result.unchanged:
                self.unchanged += 1
            elif result.created:
                self.created += 1
            else:
                self.updated += 1
            limit = self.max_results * (2 if result.rejected else 1)
            if len(self.results) < limit:
                self.results.append(result)
            else:
                self.truncated = True


@dataclass(frozen=True)
class PageCursor:
    """PageCursor is the last (path, id) of a page; the next page starts after it."""

    path: str
    id: uuid.UUID


def _filter_digest(filters: store.ListFilter) -> str:
    """_filter_digest is a short digest of a listing's filters, which page tokens carry."""
    parts = [
        str(filters.repository_id or ""),
        filters.path_prefix,
        filters.language,
        filters.tag,
        "1" if filters.show_deleted else "0",
    ]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def encode_page_token(cursor: PageCursor, filters: store.ListFilter) -> str:
    """encode_page_token makes the opaque token for the page after `cursor` under `filters`."""
    payload = {"p": cursor.path, "i": str(cursor.id), "f": _filter_digest(filters)}
    raw = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str, filters: store.ListFilter) -> PageCursor:
    """decode_page_token reads a token back, refusing one made for other filters (INVALID_ARGUMENT)."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = PageCursor(str(payload["p"]), uuid.UUID(payload["i"]))
        digest = payload["f"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise _bad_token("not a token returned by ListDocuments") from None
    if digest != _filter_digest(filters):
        raise _bad_token("the token belongs to a listing with other filters")
    return cursor


def _bad_token(description: str) -> InvalidArgument:
    """_bad_token is the refusal of a page token that this listing did not make."""
    return InvalidArgument(
        f"page_token: {description}",
        reason="PAGE_TOKEN_INVALID",
        field_violations=[FieldViolation("page_token", description, "PAGE_TOKEN_INVALID")],
    )


class DocumentService:
    """DocumentService runs the document calls for a caller: writes, streams, reads, deletes."""

    def __init__(
        self, pool: LazyPool, settings: IngestSettings, symbolizer: Symbolizer | None = None
    ) -> None:
        self._pool = pool
        self.settings = settings
        self.symbolizer = symbolizer or Symbolizer(settings.symbol_workers)
        self.writer = DocumentWriter(self.symbolizer, limits_from_settings(settings))

    async def upsert(
        self, user_id: uuid.UUID, items: Sequence[DocumentInput], request_id: str = ""
    ) -> BatchOutcome:
        """upsert writes one batch in one transaction; a repeated `request_id` returns the first answer."""
        check_request_id(request_id)
        check_request(items, self.writer.limits)
        return await self._batch(user_id, items, UPSERT_METHOD, request_id, first_index=0)

    async def _batch(
        self,
        user_id: uuid.UUID,
        items: Sequence[DocumentInput],
        method: str,
        request_id: str,
        *,
        first_index: int,
    ) -> BatchOutcome:
        """_batch runs one batch in one transaction as the user, claiming and recording its request id.

        Symbols are extracted before the transaction opens, so it only reads and writes.
        """
        prepared = await self.writer.prepare(items, first_index=first_index)
        pool = await self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            if request_id:
                digest = fingerprint(items)
                claim = await store.claim_request(
                    conn, user_id, method, request_id, digest, self.settings.request_retention
                )
                if not claim.owned:
                    if claim.fingerprint != digest or claim.response is None:
                        raise _reused(request_id)
                    return BatchOutcome.from_json(claim.response)
            outcome = await self.writer.write(conn, user_id, prepared)
            if request_id:
                await store.record_response(conn, user_id, method, request_id, outcome.to_json())
            return outcome

    async def upsert_stream(
        self, user_id: uuid.UUID, stream: AsyncIterator[tuple[DocumentInput, str]]
    ) -> StreamOutcome:
        """upsert_stream writes `(document, request_id)` pairs in batches, one transaction each.

        The request id is the first message's; each batch is recorded under it with the batch's
        number, so a retried stream replays what committed and writes the rest.
        """
        summary = StreamOutcome(self.settings.stream_max_results)
        batch: list[DocumentInput] = []
        size = 0
        request_id: str | None = None
        first_index = 0
        async for item, item_request_id in stream:
            if request_id is None:
                request_id = item_request_id
                check_request_id(request_id)
            batch.append(item)
            size += item.content_size()
            if len(batch) >= self.settings.stream_batch_items or size >= self.settings.stream_batch_bytes:
                await self._stream_batch(user_id, batch, request_id, first_index, summary)
                first_index += len(batch)
                batch, size = [], 0
        if batch:
            await self._stream_batch(user_id, batch, request_id or "", first_index, summary)
        return summary

    async def _stream_batch(
        self,
        user_id: uuid.UUID,
        batch: list[DocumentInput],
        request_id: str,
        first_index: int,
        summary: StreamOutcome,
    ) -> None:
        """_stream_batch commits one stream batch under the stream's request id and the batch's number."""
        method = f"{STREAM_METHOD}#{summary.batches}"
        summary.add(await self._batch(user_id, batch, method, request_id, first_index=first_index))

    async def get(self, user_id: uuid.UUID, document_id: str, *, with_content: bool) -> store.DocumentRow:
        """get returns one of the caller's documents (a tombstone too), or raises NotFound."""
        parsed = parse_id(document_id, "id")
        pool = await self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            row = await store.get_document(conn, user_id, parsed, with_content=with_content)
        if row is None:
            raise _not_found(document_id)
        return row

    async def list_page(
        self,
        user_id: uuid.UUID,
        filters: store.ListFilter,
        *,
        page_size: int,
        page_token: str,
        with_content: bool,
    ) -> tuple[list[store.DocumentRow], str]:
        """list_page returns one page of the caller's documents by (path, id) and the next page's token."""
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                field_violations=[
                    FieldViolation("page_size", "0 (the default) to 1000", "PAGE_SIZE_INVALID")
                ],
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token, filters) if page_token else None
        pool = await self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            rows = await store.list_documents(
                conn,
                user_id,
                filters,
                after=(after.path, after.id) if after else None,
                limit=size + 1,
                with_content=with_content,
            )
        if len(rows) <= size:
            return rows, ""
        page = rows[:size]
        return page, encode_page_token(PageCursor(page[-1].path, page[-1].id), filters)

    async def delete(self, user_id: uuid.UUID, document_id: str) -> int:
        """delete tombstones one live document and returns the tombstone's revision, or NotFound."""
        parsed = parse_id(document_id, "id")
        pool = await self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            deleted = await store.tombstone_ids(conn, user_id, [parsed])
        if parsed not in deleted:
            raise _not_found(document_id)
        return deleted[parsed]

    def close(self) -> None:
        """close stops the symbol workers."""
        self.symbolizer.close()


def parse_id(value: str, name: str) -> uuid.UUID:
    """parse_id reads a UUID request field, refusing anything else with a field violation."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(
            f"{name} is not a valid id",
            field_violations=[FieldViolation(name, "a UUID", "ID_INVALID")],
        ) from None


def _not_found(document_id: str) -> NotFound:
    """_not_found is the answer for a document that does not exist or is another tenant's."""
    return NotFound("no such document", resource_type="kotadb.v1.Document", resource_name=document_id)
