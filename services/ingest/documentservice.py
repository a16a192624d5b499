"""DocumentService: the document RPCs' rules around DocumentWriter — transactions, retries, pages.

Every call runs as the caller under row level security (`db.as_user`); the tenant is the
verified identity's user id, never a request field. On top of the writer it adds

* request ids: the first answer to a write carrying a `request_id` is stored in the same
  transaction (`ingest_requests`), so a retry returns it and writes nothing new; the same id
  with a different batch is refused (REQUEST_ID_REUSED);
* streams: `upsert_stream` commits one transaction per `stream_batch_items` documents or
  `stream_batch_bytes` content bytes, whichever comes first, so memory stays bounded whatever
  the stream's length (at most three batches: one read, one extracting, one committing, which
  overlap); a stream's request id makes each of its batches idempotent, so a retried stream
  replays the batches that committed and writes the rest;
* reads: GetDocument, and ListDocuments by keyset on (path, id), whose page tokens carry the
  last row seen and a digest of the filters (a token reused with other filters is refused), so
  pages stay stable while others write;
* DeleteDocument: a tombstone (content dropped, row kept) that the change feed carries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.common import db
from services.common.errors import FieldViolation, InvalidArgument, NotFound
from services.common.server import LazyPool
from services.ingest import documentstore as store
from services.ingest.batchtiming import BatchTimer
from services.ingest.config import IngestSettings
from services.ingest.documents import (
    MAX_REQUEST_ID_CHARS,
    BatchOutcome,
    DocumentInput,
    DocumentLimits,
    DocumentWriter,
    ItemResult,
    PreparedBatch,
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
        return await self._commit(user_id, items, prepared, method, request_id)

    async def _commit(
        self,
        user_id: uuid.UUID,
        items: Sequence[DocumentInput],
        prepared: PreparedBatch,
        method: str,
        request_id: str,
    ) -> BatchOutcome:
        """_commit writes a prepared batch in one transaction as the user, with its request id."""
        timer = prepared.timer
        pool = await self._pool.get()
        began = time.perf_counter()
        async with db.as_user(pool, user_id) as conn:
            timer.add("begin", time.perf_counter() - began)
            if request_id:
                with timer.phase("request_id"):
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
                with timer.phase("request_id"):
                    await store.record_response(conn, user_id, method, request_id, outcome.to_json())
            committing = time.perf_counter()
        timer.add("commit", time.perf_counter() - committing)
        timer.record()
        return outcome

    async def upsert_stream(
        self, user_id: uuid.UUID, stream: AsyncIterator[tuple[DocumentInput, str]]
    ) -> StreamOutcome:
        """upsert_stream writes `(document, request_id)` pairs in batches, one transaction each.

        The request id is the first message's; each batch is recorded under it with the batch's
        number, so a retried stream replays what committed and writes the rest. Batches go
        through a pipeline (`_StreamPipeline`): while batch N is written and committed, batch
        N+1's symbols are extracted and batch N+2 is read from the stream; batches still commit
        one at a time, in order, and at most those three are held.
        """
        summary = StreamOutcome(self.settings.stream_max_results)
        pipeline = _StreamPipeline(self, user_id, summary)
        batch: list[DocumentInput] = []
        size = 0
        request_id: str | None = None
        first_index = 0
        timer = BatchTimer()
        try:
            waiting = time.perf_counter()
            async for item, item_request_id in stream:
                timer.add("receive", time.perf_counter() - waiting)
                if request_id is None:
                    request_id = item_request_id
                    check_request_id(request_id)
                batch.append(item)
                size += item.content_size()
                if len(batch) >= self.settings.stream_batch_items or size >= self.settings.stream_batch_bytes:
                    await pipeline.submit(batch, request_id, first_index, timer)
                    first_index += len(batch)
                    batch, size = [], 0
                    timer = BatchTimer()
                waiting = time.perf_counter()
            if batch:
                await pipeline.submit(batch, request_id or "", first_index, timer)
            await pipeline.finish()
        finally:
            await pipeline.cancel()
        return summary

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


class _StreamPipeline:
    """_StreamPipeline overlaps one stream's batches: extract the next while the current commits.

    Each submitted batch runs in a task that extracts its symbols, waits for the batch before it
    to commit, then commits. `submit` first waits until fewer than two batches are in flight, so
    at most three are held (one being read by the caller, one extracting, one committing);
    commits keep the stream's order, a batch commits as soon as it is ready (a slow stream's
    batches are not held back), and once a batch fails none after it commits: the failure
    reaches the caller at the next `submit` or at `finish`. `cancel` stops whatever is still
    running (a transaction in flight rolls back).
    """

    def __init__(self, service: DocumentService, user_id: uuid.UUID, summary: StreamOutcome) -> None:
        self._service = service
        self._user_id = user_id
        self._summary = summary
        self._number = 0
        self._tasks: collections.deque[asyncio.Task[None]] = collections.deque()

    async def submit(
        self, batch: list[DocumentInput], request_id: str, first_index: int, timer: BatchTimer
    ) -> None:
        """submit starts `batch` once fewer than two batches are in flight."""
        while len(self._tasks) >= 2:
            await self._tasks.popleft()
        previous = self._tasks[-1] if self._tasks else None
        method = f"{STREAM_METHOD}#{self._number}"
        self._number += 1
        self._tasks.append(
            asyncio.create_task(self._run(batch, request_id, first_index, timer, method, previous))
        )

    async def finish(self) -> None:
        """finish waits for every submitted batch to commit, in order."""
        while self._tasks:
            await self._tasks.popleft()

    async def _run(
        self,
        batch: list[DocumentInput],
        request_id: str,
        first_index: int,
        timer: BatchTimer,
        method: str,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """_run extracts one batch, waits for its predecessor's commit, then commits it."""
        prepared = await self._service.writer.prepare(batch, first_index=first_index, timer=timer)
        if previous is not None:
            await previous  # its failure is this batch's too: nothing commits after a failed batch
        outcome = await self._service._commit(self._user_id, batch, prepared, method, request_id)
        self._summary.add(outcome)

    async def cancel(self) -> None:
        """cancel stops the batches still in flight and waits for them to wind down."""
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
