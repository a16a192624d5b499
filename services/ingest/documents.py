"""Documents: the rules an ingested document must pass and the batch write (DocumentWriter).

`DocumentWriter` is the one code path that writes documents: UpsertDocuments,
StreamUpsertDocuments and the sync workers all use it in two steps. `prepare` checks the batch
and extracts its symbols in worker processes, with no connection held; `write` then runs inside
a transaction the caller owns (`db.as_user` for RPCs, `db.as_service` for workers; the writer
never commits, so a worker can combine a batch with its job bookkeeping), and only reads and
writes, so the transaction lasts the database's share of the work (milliseconds a batch), not
the parse's (seconds): the change feed's readers wait for the oldest open transaction.
`upsert` does both for callers that already hold a transaction. For each item the writer

1. checks the item (`check_item`): path shape, content that is UTF-8 text without NUL bytes and
   under the hard limit, language, title, tags, metadata; then the repository (unknown or
   someone else's) and paths repeated within the batch. A bad item is answered with field
   violations (`documents[i].path`, ...) and nothing is written for it; the rest go on;
2. compares each valid item with the stored document (content hash, language, metadata, title,
   tags): an identical one is a no-op answered with its stored revision and `unchanged` (the
   revision trigger stamps every write, so the decision is made before writing);
3. writes the changed ones with what `prepare` found in them (tree-sitter symbols, the
   engine's index guardrails; services/ingest/symbolizer.py): the documents in one statement
   per repository, their symbols by COPY (services/ingest/documentstore.py); the documents
   trigger appends their change-feed rows. Each phase is timed (services/ingest/batchtiming.py).
   Every valid item is analyzed, identical ones too (which ones are identical is only known
   inside the transaction); pushes and syncs send only changed files anyway.

Content the engine will not index (over its 1 MiB limit, too many distinct trigrams, empty) is
stored all the same and marked with the reason, which the search service reports as a skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.db import Connection
from services.common.errors import FieldViolation, InvalidArgument
from services.ingest import documentstore as store
from services.ingest.batchtiming import BatchTimer
from services.ingest.paths import MAX_PATH_BYTES as MAX_PATH_BYTES
from services.ingest.paths import check_path
from services.ingest.paths import has_control as _has_control
from services.ingest.symbolizer import Analysis, Symbolizer
from services.search.engine.languages import detect_language, normalize_language

MAX_TITLE_CHARS = 512
MAX_TAG_CHARS = 64
MAX_METADATA_KEY_CHARS = 256
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class DocumentLimits:
    """DocumentLimits are the per-item and per-request limits (IngestSettings' document block)."""

    max_document_bytes: int = 10 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_tags: int = 32
    max_batch_items: int = 1000
    max_batch_bytes: int = 14 * 1024 * 1024


@dataclass(frozen=True)
class DocumentInput:
    """DocumentInput is one document to write: `content` as text or raw bytes, the rest optional.

    `language` None means "detect it from the path and content"; `repository_id` None means a
    pushed document outside any repository.
    """

    path: str
    content: bytes | str
    repository_id: uuid.UUID | None = None
    language: str | None = None
    title: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def content_size(self) -> int:
        """content_size is the content's length in bytes (UTF-8 for text)."""
        return (
            len(self.content)
            if isinstance(self.content, bytes)
            else len(self.content.encode("utf-8", "surrogatepass"))
        )


@dataclass(frozen=True)
class ItemResult:
    """ItemResult is the outcome of one item: written, unchanged, or refused with violations.

    `index` is the item's position in the request (or stream); `id` and `revision` are None/0
    for a refused item; `index_skip` says why the engine will not index it (None: it will).
    """

    index: int
    path: str
    repository_id: uuid.UUID | None
    id: uuid.UUID | None = None
    revision: int = 0
    created: bool = False
    unchanged: bool = False
    content_hash: str = ""
    index_skip: str | None = None
    index_skip_detail: str = ""
    violations: tuple[FieldViolation, ...] = ()

    @property
    def rejected(self) -> bool:
        """rejected tells whether the item was refused (nothing written for it)."""
        return bool(self.violations)

    def to_json(self) -> dict[str, Any]:
        """to_json is the item as stored for request-id replays."""
        return {
            "index": self.index,
            "path": self.path,
            "repository_id": str(self.repository_id) if self.repository_id else None,
            "id": str(self.id) if self.id else None,
            "revision": self.revision,
            "created": self.created,
            "unchanged": self.unchanged,
            "content_hash": self.content_hash,
            "index_skip": self.index_skip,
            "index_skip_detail": self.index_skip_detail,
            "violations": [[v.field, v.description, v.reason] for v in self.violations],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemResult:
        """from_json reads back what `to_json` stored."""
        return cls(
            index=int(data["index"]),
            path=str(data["path"]),
            repository_id=uuid.UUID(data["repository_id"]) if data["repository_id"] else None,
            id=uuid.UUID(data["id"]) if data["id"] else None,
            revision=int(data["revision"]),
            created=bool(data["created"]),
            unchanged=bool(data["unchanged"]),
            content_hash=str(data["content_hash"]),
            index_skip=data["index_skip"],
            index_skip_detail=str(data["index_skip_detail"]),
            violations=tuple(FieldViolation(f, d, r) for f, d, r in data["violations"]),
        )


@dataclass(frozen=True)
class BatchOutcome:
    """BatchOutcome is one batch's answer: each item's result in order, and the highest revision."""

    results: tuple[ItemResult, ...]
    revision: int

    def to_json(self) -> dict[str, Any]:
        """to_json is the outcome as stored for request-id replays."""
        return {"revision": self.revision, "results": [r.to_json() for r in self.results]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchOutcome:
        """from_json reads back what `to_json` stored."""
        return cls(tuple(ItemResult.from_json(r) for r in data["results"]), int(data["revision"]))


@dataclass(frozen=True)
class _Valid:
    """_Valid is an item that passed `check_item`, in the shape the store writes."""

    index: int
    repository_id: uuid.UUID | None
    raw: bytes
    row: store.WriteRow
    content_hash: str


@dataclass(frozen=True)
class PreparedBatch:
    """PreparedBatch is a batch checked and analyzed by `DocumentWriter.prepare`, ready to write.

    `refused` answers the items that failed their checks; `valid` are the others, and
    `analyses` holds each valid item's symbols and index verdict by item index.
    """

    first_index: int
    size: int
    refused: Mapping[int, ItemResult]
    valid: tuple[_Valid, ...]
    analyses: Mapping[int, Analysis]
    timer: BatchTimer = field(default_factory=BatchTimer)


def _violation(index: int, name: str, description: str, reason: str) -> FieldViolation:
    """_violation is a field violation on field `name` of the item at `index`."""
    return FieldViolation(f"documents[{index}].{name}", description, reason)


def check_item(index: int, item: DocumentInput, limits: DocumentLimits) -> _Valid | list[FieldViolation]:
    """check_item validates one item on its own; it returns the item ready to write or its violations."""
    violations: list[FieldViolation] = []
    problem = check_path(item.path)
    if problem is not None:
        violations.append(_violation(index, "path", problem[1], problem[0]))
    content_field = "text" if isinstance(item.content, str) else "content_bytes"
    size = item.content_size()
    text = ""
    raw = b""
    if size > limits.max_document_bytes:
        violations.append(
            _violation(
                index,
                content_field,
                f"the content is {size} bytes, over the {limits.max_document_bytes}-byte limit",
                "CONTENT_TOO_LARGE",
            )
        )
    else:
        raw = (
            item.content if isinstance(item.content, bytes) else item.content.encode("utf-8", "surrogatepass")
        )
        nul = raw.find(b"\0")
        if nul >= 0:
            # A NUL byte marks binary content, whatever else is wrong with it.
            violations.append(
                _violation(
                    index, content_field, f"the content has a NUL byte at {nul} (binary)", "CONTENT_BINARY"
                )
            )
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                violations.append(
                    _violation(
                        index,
                        content_field,
                        f"the content is not UTF-8 (byte {exc.start})",
                        "CONTENT_NOT_UTF8",
                    )
                )
    language = _check_language(index, item, raw, violations)
    title = _check_title(index, item.title, violations)
    tags = _check_tags(index, item.tags, limits, violations)
    _check_metadata(index, item.metadata, limits, violations)
    if violations:
        return violations
    row = store.WriteRow(
        path=item.path,
        content=text,
        language=language,
        metadata=dict(item.metadata),
        title=title,
        tags=tags,
        index_skip=None,
        index_skip_detail="",
    )
    return _Valid(index, item.repository_id, raw, row, hashlib.sha256(raw).hexdigest())


def _check_language(
    index: int, item: DocumentInput, raw: bytes, violations: list[FieldViolation]
) -> str | None:
    """_check_language is the item's language: the given one normalised, or detected when absent."""
    if item.language is None or item.language == "":
        return detect_language(item.path, raw) or None
    known = normalize_language(item.language)
    if known is None:
        violations.append(
            _violation(
                index,
                "language",
                "not a language KotaDB knows; leave it empty to detect it",
                "LANGUAGE_UNKNOWN",
            )
        )
    return known


def _check_title(index: int, title: str | None, violations: list[FieldViolation]) -> str | None:
    """_check_title is the item's title (None when empty); too long or unprintable is a violation."""
    if not title:
        return None
    if len(title) > MAX_TITLE_CHARS or _has_control(title):
        violations.append(
            _violation(
                index,
                "title",
                f"at most {MAX_TITLE_CHARS} characters, no control characters",
                "TITLE_INVALID",
            )
        )
    return title


def _check_tags(
    index: int, tags: Sequence[str], limits: DocumentLimits, violations: list[FieldViolation]
) -> tuple[str, ...]:
    """_check_tags is the item's tags sorted and distinct, with violations for too many or malformed ones."""
    distinct = tuple(sorted(set(tags)))
    if len(distinct) > limits.max_tags:
        violations.append(
            _violation(
                index, "tags", f"{len(distinct)} tags, over the limit of {limits.max_tags}", "TOO_MANY_TAGS"
            )
        )
    for tag in distinct:
        if not tag or len(tag) > MAX_TAG_CHARS or _has_control(tag):
            violations.append(
                _violation(
                    index,
                    "tags",
                    f"each tag has 1 to {MAX_TAG_CHARS} characters, no control characters",
                    "TAG_INVALID",
                )
            )
            break
    return distinct


def _check_metadata(
    index: int, metadata: Mapping[str, str], limits: DocumentLimits, violations: list[FieldViolation]
) -> None:
    """_check_metadata adds violations for oversize metadata and keys or values Postgres cannot store."""
    size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())
    if size > limits.max_metadata_bytes:
        violations.append(
            _violation(
                index,
                "metadata",
                f"the metadata is {size} bytes, over the {limits.max_metadata_bytes}-byte limit",
                "METADATA_TOO_LARGE",
            )
        )
    # Postgres text and jsonb cannot hold NUL, so it is refused here rather than failing the batch.
    if any(not k or len(k) > MAX_METADATA_KEY_CHARS or "\0" in k or "\0" in v for k, v in metadata.items()):
        violations.append(
            _violation(
                index,
                "metadata",
                f"keys have 1 to {MAX_METADATA_KEY_CHARS} characters; keys and values no NUL",
                "METADATA_INVALID",
            )
        )


def check_request(items: Sequence[DocumentInput], limits: DocumentLimits) -> None:
    """check_request refuses a whole request with too many items or content bytes (nothing is written)."""
    if len(items) > limits.max_batch_items:
        raise InvalidArgument(
            f"{len(items)} documents in one request, over the limit of {limits.max_batch_items}",
            reason="TOO_MANY_DOCUMENTS",
            field_violations=[
                FieldViolation(
                    "documents", f"at most {limits.max_batch_items} documents", "TOO_MANY_DOCUMENTS"
                )
            ],
        )
    size = sum(item.content_size() for item in items)
    if size > limits.max_batch_bytes:
        raise InvalidArgument(
            f"{size} content bytes in one request, over the limit of {limits.max_batch_bytes}",
            reason="REQUEST_TOO_LARGE",
            field_violations=[
                FieldViolation(
                    "documents", f"at most {limits.max_batch_bytes} content bytes", "REQUEST_TOO_LARGE"
                )
            ],
        )


def _same(state: store.StoredState, valid: _Valid) -> bool:
    """_same tells whether writing `valid` would change nothing the client sees."""
    row = valid.row
    return (
        not state.deleted
        and state.content_hash == valid.content_hash
        and state.language == row.language
        and state.metadata == row.metadata
        and state.title == row.title
        and state.tags == row.tags
    )


def _unchanged(valid: _Valid, state: store.StoredState) -> ItemResult:
    """_unchanged answers an item identical to the stored document with the stored revision."""
    return ItemResult(
        index=valid.index,
        path=valid.row.path,
        repository_id=valid.repository_id,
        id=state.id,
        revision=state.revision,
        unchanged=True,
        content_hash=state.content_hash,
        index_skip=state.index_skip,
        index_skip_detail=state.index_skip_detail,
    )


class DocumentWriter:
    """DocumentWriter checks and analyzes batches of documents, then writes them in a transaction.

    `symbolizer` extracts symbols off the event loop; `limits` bounds each item. Item indexes in
    results and violations start at `first_index` (streams number items across batches).
    """

    def __init__(self, symbolizer: Symbolizer, limits: DocumentLimits | None = None) -> None:
        self.symbolizer = symbolizer
        self.limits = limits or DocumentLimits()

    async def upsert(
        self, conn: Connection, user_id: uuid.UUID, items: Sequence[DocumentInput], *, first_index: int = 0
    ) -> BatchOutcome:
        """upsert prepares and writes one batch in the caller's transaction (extraction included)."""
        return await self.write(conn, user_id, await self.prepare(items, first_index=first_index))

    async def prepare(
        self, items: Sequence[DocumentInput], *, first_index: int = 0, timer: BatchTimer | None = None
    ) -> PreparedBatch:
        """prepare checks every item and analyzes the valid ones in worker processes (no database)."""
        timer = timer or BatchTimer()
        timer.documents += len(items)
        refused: dict[int, ItemResult] = {}
        valid: list[_Valid] = []
        with timer.phase("check"):
            for offset, item in enumerate(items):
                index = first_index + offset
                checked = check_item(index, item, self.limits)
                if isinstance(checked, list):
                    refused[index] = ItemResult(
                        index, item.path, item.repository_id, violations=tuple(checked)
                    )
                else:
                    valid.append(checked)
        timer.size += sum(len(v.raw) for v in valid)
        with timer.phase("extract"):
            analyses = await self.symbolizer.analyze_many([(v.raw, v.row.language or "") for v in valid])
        return PreparedBatch(
            first_index,
            len(items),
            refused,
            tuple(valid),
            {v.index: a for v, a in zip(valid, analyses, strict=True)},
            timer,
        )

    async def write(self, conn: Connection, user_id: uuid.UUID, prepared: PreparedBatch) -> BatchOutcome:
        """write stores the valid items of a prepared batch and answers every item, in order."""
        results: dict[int, ItemResult] = dict(prepared.refused)
        valid = prepared.valid
        wanted = {v.repository_id for v in valid if v.repository_id is not None}
        timer = prepared.timer
        with timer.phase("read"):
            visible = await store.visible_repositories(conn, user_id, sorted(wanted))
        groups: dict[uuid.UUID | None, dict[str, _Valid]] = {}
        for v in valid:
            refusal: FieldViolation | None = None
            group = groups.setdefault(v.repository_id, {})
            if v.repository_id is not None and v.repository_id not in visible:
                refusal = _violation(v.index, "repository_id", "no such repository", "REPOSITORY_NOT_FOUND")
            elif v.row.path in group:
                first = group[v.row.path].index
                refusal = _violation(
                    v.index, "path", f"the same path as documents[{first}]", "DUPLICATE_PATH"
                )
            if refusal is not None:
                results[v.index] = ItemResult(v.index, v.row.path, v.repository_id, violations=(refusal,))
            else:
                group[v.row.path] = v
        for repository_id, by_path in groups.items():
            results.update(
                await self._write_group(conn, user_id, repository_id, by_path, prepared.analyses, timer)
            )
        ordered = tuple(results[prepared.first_index + i] for i in range(prepared.size))
        return BatchOutcome(ordered, max((r.revision for r in ordered), default=0))

    async def _write_group(
        self,
        conn: Connection,
        user_id: uuid.UUID,
        repository_id: uuid.UUID | None,
        by_path: dict[str, _Valid],
        analyzed: Mapping[int, Analysis],
        timer: BatchTimer,
    ) -> dict[int, ItemResult]:
        """_write_group writes one repository's changed items; identical ones are answered unchanged."""
        if not by_path:
            return {}
        results: dict[int, ItemResult] = {}
        with timer.phase("read"):
            states = await store.current_states(conn, user_id, repository_id, list(by_path))
        changed: list[_Valid] = []
        # Path order: two batches touching the same paths lock them in the same order (no deadlock).
        for path, v in sorted(by_path.items()):
            state = states.get(path)
            if state is not None and _same(state, v):
                results[v.index] = _unchanged(v, state)
            else:
                changed.append(v)
        if not changed:
            return results
        analyses = [analyzed[v.index] for v in changed]
        rows = [
            dataclasses.replace(v.row, index_skip=a.index_skip, index_skip_detail=a.index_skip_detail)
            for v, a in zip(changed, analyses, strict=True)
        ]
        with timer.phase("documents"):
            written = await store.upsert_documents(conn, user_id, repository_id, rows)
        symbols = [
            (written[v.row.path].id, a.symbols)
            for v, a in zip(changed, analyses, strict=True)
            if v.row.path in written
        ]
        with timer.phase("symbols"):
            created = {w.id for w in written.values() if w.created}
            timer.symbols += await store.replace_symbols(conn, user_id, symbols, new_documents=created)
        timer.written += len(written)
        # A concurrent identical write can win the row between the read and the upsert.
        raced = await store.current_states(
            conn, user_id, repository_id, [v.row.path for v in changed if v.row.path not in written]
        )
        for v, a in zip(changed, analyses, strict=True):
            done = written.get(v.row.path)
            if done is None:
                results[v.index] = _unchanged(v, raced[v.row.path])
                continue
            results[v.index] = ItemResult(
                index=v.index,
                path=v.row.path,
                repository_id=repository_id,
                id=done.id,
                revision=done.revision,
                created=done.created,
                content_hash=done.content_hash,
                index_skip=a.index_skip,
                index_skip_detail=a.index_skip_detail,
            )
        return results

    async def delete_paths(
        self, conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None, paths: Sequence[str]
    ) -> int:
        """delete_paths tombstones the live documents at `paths`; returns the highest revision, 0 if none."""
        deleted = await store.tombstone_paths(conn, user_id, repository_id, paths)
        return max(deleted.values(), default=0)

    async def existing_hashes(
        self, conn: Connection, user_id: uuid.UUID, repository_id: uuid.UUID | None
    ) -> dict[str, str]:
        """existing_hashes maps each live path of a repository (None: pushed documents) to its hash."""
        return await store.content_hashes(conn, user_id, repository_id)


def fingerprint(items: Sequence[DocumentInput]) -> str:
    """fingerprint is a digest of a batch, so a request id reused for another batch is recognised."""
    digest = hashlib.sha256()
    for item in items:
        raw = item.content.encode("utf-8", "surrogatepass") if isinstance(item.content, str) else item.content
        parts = (
            item.path,
            hashlib.sha256(raw).hexdigest(),
            str(item.repository_id or ""),
            item.language or "",
            item.title or "",
            "\x1f".join(sorted(item.tags)),
            "\x1f".join(f"{k}\x1e{v}" for k, v in sorted(item.metadata.items())),
        )
        digest.update("\x1d".join(parts).encode("utf-8", "surrogatepass") + b"\x1c")
    return digest.hexdigest()
