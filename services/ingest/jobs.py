"""JobService: the job RPCs' domain (SyncRepository, GetJob, ListJobs, CancelJob, WatchJob).

Everything is for the verified caller's tenant. Reads run as the caller under row level
security (`db.as_user`), so another tenant's job is simply not found. Queueing and cancelling
change columns users may not write directly (state, run_after, params), so they run as the
service role, and only after a read as the caller has shown that the repository or job is the
caller's; the queue's statements carry the caller's user id as well.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Sequence

from services.common import db
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.common.server import LazyPool
from services.ingest import events, queue
from services.ingest.config import IngestSettings
from services.ingest.documentservice import parse_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID_CHARS = 128
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def _invalid(field: str, description: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        description, reason=reason, field_violations=[FieldViolation(field, description, reason)]
    )


def encode_page_token(job: queue.JobRecord) -> str:
    """encode_page_token is the opaque token of the page after `job` (newest first)."""
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> tuple[dt.datetime, uuid.UUID]:
    """decode_page_token reads a token made by encode_page_token (InvalidArgument otherwise)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
        created, job_id = raw.split("|")
        return dt.datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid(
            "page_token", "the page token is not one this service issued", "PAGE_TOKEN_INVALID"
        ) from None


class JobService:
    """JobService queues, reads, cancels and watches the caller's indexing jobs."""

    def __init__(self, pool: LazyPool, settings: IngestSettings, wakeups: events.Wakeups) -> None:
        self._pool = pool
        self.settings = settings
        self.wakeups = wakeups

    async def sync_repository(
        self,
        user_id: uuid.UUID,
        repository: str,
        *,
        full: bool,
        commit_sha: str = "",
        request_id: str = "",
        key_id: uuid.UUID | None = None,
    ) -> queue.JobRecord:
        """sync_repository queues a full (or, when possible, incremental) sync of the caller's repository.

        A sync already queued for the repository absorbs this one (and is returned).
        """
        repository_id = parse_id(repository, "id")
        if commit_sha and not _SHA.match(commit_sha):
            raise _invalid(
                "commit_sha", "commit_sha must be a full lowercase hex commit id", "COMMIT_SHA_INVALID"
            )
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise _invalid(
                "request_id", f"request_id is longer than {MAX_REQUEST_ID_CHARS}", "REQUEST_ID_INVALID"
            )
        pool = self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            state = await conn.fetchval("select state from public.repositories where id = $1", repository_id)
        if state is None:
            raise NotFound(f"repository {repository_id} not found", reason="REPOSITORY_NOT_FOUND")
        if state == "deleting":
            raise FailedPrecondition(
                f"repository {repository_id} is being deleted", reason="REPOSITORY_DELETING"
            )
        kind = "sync" if full or commit_sha else "webhook_push"
        params = {"requested_by": "api", **({"commit_sha": commit_sha} if commit_sha else {})}
        async with db.as_service(pool) as conn:
            job = await queue.enqueue(
                conn,
                user_id=user_id,
                repository_id=repository_id,
                kind=kind,
                params=params,
                request_id=request_id or None,
                key_id=key_id,
                max_attempts=self.settings.job_max_attempts,
            )
        self.wakeups.nudge()
        return job

    async def get(self, user_id: uuid.UUID, job: str) -> queue.JobRecord:
        """get returns one of the caller's jobs (NotFound otherwise)."""
        job_id = parse_id(job, "id")
        async with db.as_user(self._pool.get(), user_id) as conn:
            return await queue.get_job(conn, job_id)

    async def list(
        self,
        user_id: uuid.UUID,
        *,
        page_size: int,
        page_token: str,
        repository: str,
        states: Sequence[str],
    ) -> tuple[list[queue.JobRecord], str]:
        """list returns a page of the caller's jobs, newest first, and the next page's token."""
        if page_size < 0:
            raise _invalid("page_size", "page_size must not be negative", "PAGE_SIZE_INVALID")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else None
        repository_id = parse_id(repository, "repository_id") if repository else None
        async with db.as_user(self._pool.get(), user_id) as conn:
            jobs = await queue.list_jobs(
                conn, limit=size + 1, after=after, repository_id=repository_id, states=states
            )
        token = encode_page_token(jobs[size - 1]) if len(jobs) > size else ""
        return jobs[:size], token

    async def cancel(self, user_id: uuid.UUID, job: str) -> queue.JobRecord:
        """cancel cancels the caller's queued job, or asks its running job to stop; returns the job."""
        job_id = parse_id(job, "id")
        pool = self._pool.get()
        async with db.as_user(pool, user_id) as conn:
            await queue.get_job(conn, job_id)
        async with db.as_service(pool) as conn:
            return await queue.cancel(conn, job_id, user_id=user_id)

    async def watch(
        self, user_id: uuid.UUID, job: str, *, after: int
    ) -> AsyncIterator[events.JobEventRecord]:
        """watch streams the caller's job's events after sequence `after` until the job has ended."""
        job_id = parse_id(job, "id")
        if after < 0:
            raise _invalid("after_sequence", "after_sequence must not be negative", "SEQUENCE_INVALID")
        async for event in events.watch(
            self._pool.get(),
            user_id,
            job_id,
            after=after,
            wakeups=self.wakeups,
            max_seconds=self.settings.watch_max_seconds,
        ):
            yield event
