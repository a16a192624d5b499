"""Conversions between ingest protos and domain values, as paired `x_from_proto` / `x_to_proto` functions.

Document part: `document_input_from_proto`, `write_result_to_proto`, `document_to_proto`
(honouring a read mask) and `read_mask_fields` (which refuses unknown mask paths).
Repository part: `repository_spec_from_proto`, `filter_change_from_proto` (UpdateRepository's
field mask) and `repository_to_proto` (never any secret).
Job part: `job_to_proto`, `job_event_to_proto`, `job_state_from_proto`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from kotadb.v1 import document_pb2, ingest_pb2, job_pb2, repository_pb2

from services.common.errors import ERROR_DOMAIN, FieldViolation, InvalidArgument
from services.ingest.documents import DocumentInput, ItemResult
from services.ingest.documentstore import DocumentRow
from services.ingest.events import JobEventRecord
from services.ingest.queue import JobRecord
from services.ingest.repositories import UPDATABLE_FIELDS, FilterChange, RepositorySpec
from services.ingest.repostore import RepositoryRecord

_SKIP_CODES: dict[str, document_pb2.SkipReason.Code.ValueType] = {
    "empty": document_pb2.SkipReason.EMPTY,
    "too_large": document_pb2.SkipReason.TOO_LARGE,
    "too_many_trigrams": document_pb2.SkipReason.TOO_MANY_TRIGRAMS,
}
_SKIP_MESSAGES = {
    "empty": "the document is empty",
    "too_large": "the content is over the search engine's size limit",
    "too_many_trigrams": "the content has too many distinct trigrams (minified or data)",
}
# Document fields a read mask may name (the proto's own field names).
DOCUMENT_FIELDS = frozenset(document_pb2.Document.DESCRIPTOR.fields_by_name)
# Mask paths that need the content column read.
CONTENT_FIELDS = frozenset({"text", "content_bytes"})


# An id no repository has (gen_random_uuid never makes it): a repository_id that is not a UUID
# becomes this one, which the writer answers per item as an unknown repository.
NO_REPOSITORY = uuid.UUID(int=0)


def document_input_from_proto(document: document_pb2.Document) -> DocumentInput:
    """document_input_from_proto reads one Document of a write request (content as text or bytes)."""
    repository_id: uuid.UUID | None = None
    if document.repository_id:
        try:
            repository_id = uuid.UUID(document.repository_id)
        except ValueError:
            repository_id = NO_REPOSITORY
    body = document.WhichOneof("body")
    content: bytes | str = document.content_bytes if body == "content_bytes" else document.text
    return DocumentInput(
        path=document.path,
        content=content,
        repository_id=repository_id,
        language=document.language or None,
        title=document.title or None,
        tags=tuple(document.tags),
        metadata=dict(document.metadata),
    )


def _skip_reason(code: str | None, detail: str) -> document_pb2.SkipReason | None:
    """_skip_reason is the SkipReason message for a stored index skip, or None."""
    if code is None:
        return None
    message = _SKIP_MESSAGES.get(code, code)
    return document_pb2.SkipReason(
        code=_SKIP_CODES.get(code, document_pb2.SkipReason.CODE_UNSPECIFIED),
        message=f"{message} ({detail})" if detail else message,
    )


def write_result_to_proto(result: ItemResult) -> ingest_pb2.DocumentWriteResult:
    """write_result_to_proto converts one item's outcome (violations included)."""
    message = ingest_pb2.DocumentWriteResult(
        id=str(result.id) if result.id else "",
        path=result.path,
        revision=result.revision,
        created=result.created,
        unchanged=result.unchanged,
        content_hash=result.content_hash,
        repository_id=str(result.repository_id) if result.repository_id else "",
        index=result.index,
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=v.field, description=v.description, reason=v.reason
            )
            for v in result.violations
        ],
    )
    if not result.rejected:
        skip = _skip_reason(result.index_skip, result.index_skip_detail)
        message.index_state = document_pb2.Document.SKIPPED if skip else document_pb2.Document.INDEXABLE
        if skip is not None:
            message.skip_reason.CopyFrom(skip)
    return message


def write_results_to_proto(results: Iterable[ItemResult]) -> list[ingest_pb2.DocumentWriteResult]:
    """write_results_to_proto converts a batch's outcomes, in order."""
    return [write_result_to_proto(r) for r in results]


def read_mask_fields(mask: field_mask_pb2.FieldMask) -> frozenset[str] | None:
    """read_mask_fields is the set of Document fields a read mask asks for (None: no mask).

    Unknown paths are refused with a `read_mask` field violation.
    """
    if not mask.paths:
        return None
    unknown = [p for p in mask.paths if p not in DOCUMENT_FIELDS]
    if unknown:
        raise InvalidArgument(
            f"read_mask names unknown Document fields: {', '.join(sorted(unknown))}",
            reason="READ_MASK_INVALID",
            field_violations=[
                FieldViolation("read_mask", f"unknown field {p!r}", "READ_MASK_INVALID")
                for p in sorted(unknown)
            ],
        )
    return frozenset(mask.paths)


def document_to_proto(row: DocumentRow, fields: frozenset[str] | None = None) -> document_pb2.Document:
    """document_to_proto converts a stored document; `fields` (a read mask) keeps only those fields.

    The content goes out as `text` when it was read (the row's content is not None).
    """
    full = document_pb2.Document(
        id=str(row.id),
        repository_id=str(row.repository_id) if row.repository_id else "",
        path=row.path,
        language=row.language or "",
        size=row.size,
        content_hash=row.content_hash,
        revision=row.revision,
        metadata=row.metadata,
        repository_name=row.repository_name,
        title=row.title or "",
        tags=list(row.tags),
    )
    full.create_time.FromDatetime(row.created_at)
    full.update_time.FromDatetime(row.updated_at)
    if row.content is not None:
        full.text = row.content
    if row.deleted_at is not None:
        full.index_state = document_pb2.Document.DELETED
        full.delete_time.FromDatetime(row.deleted_at)
    else:
        skip = _skip_reason(row.index_skip, row.index_skip_detail)
        full.index_state = document_pb2.Document.SKIPPED if skip else document_pb2.Document.INDEXABLE
        if skip is not None:
            full.skip_reason.CopyFrom(skip)
    if fields is None:
        return full
    if row.content is not None and "content_bytes" in fields and "text" not in fields:
        full.content_bytes = row.content.encode("utf-8")
    masked = document_pb2.Document()
    field_mask_pb2.FieldMask(paths=sorted(fields)).MergeMessage(full, masked)
    return masked


# --- Repositories (ingest-repos) ---------------------------------------------------------------

_PROVIDER_TO_PROTO: dict[str, repository_pb2.Repository.Provider.ValueType] = {
    "github": repository_pb2.Repository.GITHUB,
    "gitlab": repository_pb2.Repository.GITLAB,
    "git": repository_pb2.Repository.GIT,
}
_PROVIDER_FROM_PROTO = {value: name for name, value in _PROVIDER_TO_PROTO.items()}
_REPOSITORY_STATES: dict[str, repository_pb2.Repository.State.ValueType] = {
    "pending": repository_pb2.Repository.PENDING,
    "syncing": repository_pb2.Repository.SYNCING,
    "ready": repository_pb2.Repository.READY,
    "error": repository_pb2.Repository.ERROR,
    "deleting": repository_pb2.Repository.DELETING,
}


def repository_spec_from_proto(repository: repository_pb2.Repository) -> RepositorySpec:
    """repository_spec_from_proto takes CreateRepository's fields; output-only ones are ignored."""
    return RepositorySpec(
        full_name=repository.full_name,
        url=repository.url,
        provider=_PROVIDER_FROM_PROTO.get(repository.provider, ""),
        branch=repository.default_branch,
        include_globs=tuple(repository.include_globs),
        exclude_globs=tuple(repository.exclude_globs),
        max_file_bytes=repository.max_file_bytes,
    )


def filter_change_from_proto(request: ingest_pb2.UpdateRepositoryRequest) -> FilterChange:
    """filter_change_from_proto reads UpdateRepository's mask (AIP-134); an empty mask means the set fields.

    A path outside UPDATABLE_FIELDS is refused with a field violation on `update_mask`.
    """
    repository = request.repository
    paths = list(request.update_mask.paths)
    if not paths:
        paths = [name for name in UPDATABLE_FIELDS if _is_set(repository, name)]
    unknown = [path for path in paths if path not in UPDATABLE_FIELDS]
    if unknown:
        message = f"only {', '.join(UPDATABLE_FIELDS)} can be updated"
        raise InvalidArgument(
            message,
            field_violations=[
                FieldViolation("update_mask", f"{path}: {message}", "NOT_UPDATABLE") for path in unknown
            ],
        )
    chosen = set(paths)
    return FilterChange(
        branch=repository.default_branch if "default_branch" in chosen else None,
        include_globs=tuple(repository.include_globs) if "include_globs" in chosen else None,
        exclude_globs=tuple(repository.exclude_globs) if "exclude_globs" in chosen else None,
        max_file_bytes=repository.max_file_bytes if "max_file_bytes" in chosen else None,
    )


def _is_set(repository: repository_pb2.Repository, name: str) -> bool:
    value = getattr(repository, name)
    return bool(len(value)) if not isinstance(value, str | int) else bool(value)


def repository_to_proto(record: RepositoryRecord, webhook_url: str) -> repository_pb2.Repository:
    """repository_to_proto renders a repository without its secrets (has_access_token says if one is set)."""
    proto = repository_pb2.Repository(
        id=str(record.id),
        full_name=record.full_name,
        url=record.url,
        default_branch=record.branch,
        provider=_PROVIDER_TO_PROTO.get(record.provider, repository_pb2.Repository.PROVIDER_UNSPECIFIED),
        state=_REPOSITORY_STATES.get(record.state, repository_pb2.Repository.STATE_UNSPECIFIED),
        last_synced_commit=record.last_synced_commit or "",
        document_count=max(record.document_count, 0),
        webhook_url=webhook_url,
        has_access_token=record.has_access_token,
        include_globs=list(record.include_globs),
        exclude_globs=list(record.exclude_globs),
        max_file_bytes=record.max_file_bytes,
    )
    proto.create_time.FromDatetime(record.created_at)
    proto.update_time.FromDatetime(record.updated_at)
    if record.last_synced_at is not None:
        proto.last_sync_time.FromDatetime(record.last_synced_at)
    if record.state == "error" and record.error:
        proto.error.code = code_pb2.FAILED_PRECONDITION
        proto.error.message = str(record.error.get("message", ""))
        proto.error.details.add().Pack(
            error_details_pb2.ErrorInfo(
                reason=str(record.error.get("reason", "SYNC_FAILED")), domain=ERROR_DOMAIN
            )
        )
    return proto


# --- Jobs (ingest-jobs): JobRecord / JobEventRecord → job_pb2 -----------------------------------

_JOB_KINDS: dict[str, job_pb2.Job.Kind.ValueType] = {
    "sync": job_pb2.Job.FULL_SYNC,
    "webhook_push": job_pb2.Job.INCREMENTAL_SYNC,
    "delete": job_pb2.Job.DELETE_REPOSITORY,
    "reindex": job_pb2.Job.REBUILD_INDEX,
}
_JOB_STATES: dict[str, job_pb2.Job.State.ValueType] = {
    "queued": job_pb2.Job.QUEUED,
    "running": job_pb2.Job.RUNNING,
    "succeeded": job_pb2.Job.SUCCEEDED,
    "failed": job_pb2.Job.FAILED,
    "cancelled": job_pb2.Job.CANCELLED,
}
JOB_STATE_NAMES: dict[job_pb2.Job.State.ValueType, str] = {v: k for k, v in _JOB_STATES.items()}
_PROGRESS_FIELDS = (
    "files_total",
    "files_processed",
    "files_indexed",
    "files_skipped",
    "files_deleted",
    "bytes_processed",
    "symbols_extracted",
)


def job_state_from_proto(state: job_pb2.Job.State.ValueType) -> str:
    """job_state_from_proto is the table's name of a Job.State (InvalidArgument for UNSPECIFIED)."""
    name = JOB_STATE_NAMES.get(state)
    if name is None:
        raise InvalidArgument(
            "states must name job states",
            reason="JOB_STATE_INVALID",
            field_violations=[
                FieldViolation("states", "STATE_UNSPECIFIED is not a job state", "JOB_STATE_INVALID")
            ],
        )
    return name


def progress_to_proto(progress: Mapping[str, Any]) -> job_pb2.Job.Progress:
    """progress_to_proto converts a job's progress document (unknown keys are ignored)."""
    message = job_pb2.Job.Progress()
    for name in _PROGRESS_FIELDS:
        setattr(message, name, int(progress.get(name) or 0))
    for reason, count in dict(progress.get("skipped_by_reason") or {}).items():
        message.skipped_by_reason[str(reason)] = int(count)
    return message


def job_error_to_proto(error: Mapping[str, Any]) -> status_pb2.Status:
    """job_error_to_proto turns a stored error document into a google.rpc.Status with its ErrorInfo."""
    code_name = str(error.get("code") or "UNKNOWN")
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    status = status_pb2.Status(code=code.value[0], message=str(error.get("message") or ""))
    info = error_details_pb2.ErrorInfo(reason=str(error.get("reason") or code_name), domain=ERROR_DOMAIN)
    status.details.add().Pack(info)
    return status


def job_to_proto(job: JobRecord) -> job_pb2.Job:
    """job_to_proto converts a queue row into the API's Job."""
    message = job_pb2.Job(
        id=str(job.id),
        repository_id=str(job.repository_id) if job.repository_id else "",
        kind=_JOB_KINDS.get(job.kind, job_pb2.Job.KIND_UNSPECIFIED),
        state=_JOB_STATES.get(job.state, job_pb2.Job.STATE_UNSPECIFIED),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        progress=progress_to_proto(job.progress),
        commit_sha=str(job.progress.get("commit_sha") or job.params.get("commit_sha") or ""),
        cancel_requested=job.cancel_requested_at is not None,
        skipped_files=[
            job_pb2.Job.SkippedFile(
                path=str(s.get("path", "")), reason=str(s.get("reason", "")), detail=str(s.get("detail", ""))
            )
            for s in job.skips
        ],
    )
    if job.error:
        message.error.CopyFrom(job_error_to_proto(job.error))
    message.create_time.FromDatetime(job.created_at)
    message.update_time.FromDatetime(job.updated_at)
    if job.started_at is not None:
        message.start_time.FromDatetime(job.started_at)
    if job.finished_at is not None:
        message.end_time.FromDatetime(job.finished_at)
    return message


def job_event_to_proto(event: JobEventRecord) -> job_pb2.JobEvent:
    """job_event_to_proto converts one logged job event."""
    message = job_pb2.JobEvent(
        job_id=str(event.job_id),
        sequence=event.sequence,
        state=_JOB_STATES.get(event.state, job_pb2.Job.STATE_UNSPECIFIED),
        message=event.message,
        kind=event.kind,
        progress=progress_to_proto(event.data.get("progress") or {}),
    )
    message.create_time.FromDatetime(event.created_at)
    error = event.data.get("error")
    if error:
        message.error.CopyFrom(job_error_to_proto(error))
    return message
