"""Repositories: registering, reading, changing and deleting the git repositories users index.

`RepositoryManager` holds the rules; the servicer translates protos in and out around it. Every
user-facing query runs as the caller (`db.as_user`), so row level security confines it to the
caller's repositories whatever the code does; queue writes run as the service role, which is how
services/ingest/queue.py takes them, with the tenant passed explicitly and tied to the repository
by the composite foreign key.

Secrets. The webhook secret (32 random bytes, URL-safe base64) is returned once, by
CreateRepository and RotateWebhookSecret; both it and the optional access token are stored
sealed by SecretBox with the repository id and field name as associated data. Neither is ever
put in a log, an error message or a URL; the worker gets the token through
`decrypt_access_token` and hands it to git through its environment. To rotate the sealing key,
put a new key first in KOTADB_INGEST_SECRET_KEYS and run `reseal_secrets`; the old key can go
once it reports nothing unreadable.

Deletion. DeleteRepository first marks the row `deleting` as the caller (a quick update that does
not block workers' or webhooks' foreign-key checks), then, as the service role, deletes the
repository's jobs and the repository. The cascade hard-deletes its documents, and every deleted
document leaves a tombstone in the change feed (documents_record_change), in that transaction;
webhook deliveries go with it. A worker running one of the jobs loses its lease at its next
checkpoint (`queue.fence` finds no row) and its uncommitted batch rolls back. If the second step
fails (a deadlock with a worker's batch is possible and retryable) the repository stays
`deleting`: webhooks and updates refuse it and a repeated DeleteRepository finishes the job.

Filters. A changed branch, glob list or size limit forgets `last_synced_commit`, so the next sync
is a full one: an incremental sync only looks at the paths that changed between two commits.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import uuid
from collections.abc import Sequence

import asyncpg

from services.common import db
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.common.server import LazyPool
from services.common.settings import env_settings
from services.ingest import repostore
from services.ingest.config import IngestSettings
from services.ingest.jobs import JobService
from services.ingest.queue import JobRecord
from services.ingest.repostore import RepositoryRecord
from services.ingest.secretbox import SecretBox, SecretBoxError
from services.ingest.urlpolicy import Resolver, check_url, system_resolver

logger = logging.getLogger("kotadb.ingest.repositories")

PROVIDERS: tuple[str, ...] = ("github", "gitlab", "git")
UPDATABLE_FIELDS: tuple[str, ...] = ("default_branch", "include_globs", "exclude_globs", "max_file_bytes")
MAX_GLOBS = 64
MAX_GLOB_LENGTH = 256
MAX_TOKEN_LENGTH = 4096
MAX_REQUEST_ID_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WEBHOOK_SECRET_BYTES = 32

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# git check-ref-format's rules, for one branch name (no refs/heads/ prefix).
_BAD_BRANCH = re.compile(r"(^[-/.])|(\.\.)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(//)|([/.]$)|(\.lock$)|(/\.)")


@dataclasses.dataclass(frozen=True)
class RepositorySpec:
    """RepositorySpec is what a caller asks CreateRepository for (already taken out of the proto).

    Empty `full_name` is derived from the URL; empty `provider` from the host; empty `branch`
    means the remote's default branch.
    """

    full_name: str
    url: str
    provider: str = ""
    branch: str = ""
    include_globs: tuple[str, ...] = ()
    exclude_globs: tuple[str, ...] = ()
    max_file_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Created:
    """Created is CreateRepository's outcome: the repository, its secret (empty on a retry), the job."""

    repository: RepositoryRecord
    webhook_secret: str
    job: JobRecord | None


@dataclasses.dataclass(frozen=True)
class FilterChange:
    """FilterChange holds UpdateRepository's new values; None leaves a field as it is."""

    branch: str | None = None
    include_globs: tuple[str, ...] | None = None
    exclude_globs: tuple[str, ...] | None = None
    max_file_bytes: int | None = None


def secret_context(repository_id: uuid.UUID, field: str) -> bytes:
    """secret_context is the AES-GCM associated data binding a sealed secret to its row and column."""
    return f"{repository_id}:{field}".encode("ascii")


def webhook_path(repository_id: uuid.UUID, public_url: str = "") -> str:
    """webhook_path is where GitHub delivers a repository's webhooks, under `public_url` if set."""
    return f"{public_url.rstrip('/')}/v1/webhooks/github/{repository_id}"


def not_found(repository_id: uuid.UUID) -> NotFound:
    """not_found is the one error for a repository that does not exist or is someone else's."""
    return NotFound(
        "no such repository",
        reason="REPOSITORY_NOT_FOUND",
        resource_type="kotadb.v1.Repository",
        resource_name=str(repository_id),
    )


def check_branch(branch: str, field: str, violations: list[FieldViolation]) -> None:
    """check_branch adds a violation unless `branch` is empty or a valid git branch name."""
    if branch and (len(branch) > 255 or _BAD_BRANCH.search(branch) or branch == "@"):
        violations.append(FieldViolation(field, "not a valid git branch name", "INVALID_BRANCH"))


def check_globs(globs: Sequence[str], field: str, violations: list[FieldViolation]) -> None:
    """check_globs adds a violation for too many globs, or for an empty, long or control-character one."""
    if len(globs) > MAX_GLOBS:
        violations.append(FieldViolation(field, f"at most {MAX_GLOBS} globs", "TOO_MANY_GLOBS"))
        return
    for index, glob in enumerate(globs):
        if not glob or len(glob) > MAX_GLOB_LENGTH or _CONTROL.search(glob):
            violations.append(
                FieldViolation(
                    f"{field}[{index}]",
                    f"a glob is 1 to {MAX_GLOB_LENGTH} characters without control characters",
                    "INVALID_GLOB",
                )
            )


class RepositoryManager:
    """RepositoryManager applies the repository rules on the shared pool for the servicer."""

    def __init__(
        self,
        pool: LazyPool,
        settings: IngestSettings,
        jobs: JobService,
        *,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._pool = pool
        self.settings = settings
        self._jobs = jobs
        self._resolver = resolver
        self._box: SecretBox | None = None

    @property
    def box(self) -> SecretBox:
        """box is the SecretBox from the settings; FailedPrecondition when none is configured."""
        if self._box is None:
            self._box = SecretBox.from_settings(self.settings)
        return self._box

    def max_file_limit(self) -> int:
        """max_file_limit is the largest max_file_bytes a repository may ask for."""
        return self.settings.max_document_bytes

    def webhook_url(self, repository_id: uuid.UUID) -> str:
        """webhook_url is the repository's webhook address as users configure it on GitHub."""
        return webhook_path(repository_id, self.settings.public_url)

    async def validate(self, spec: RepositorySpec, access_token: str) -> RepositorySpec:
        """validate checks a new repository and fills in its derived fields, or raises InvalidArgument."""
        violations: list[FieldViolation] = []
        checked = None
        try:
            checked = await check_url(
                spec.url, allow_local=self.settings.allow_local_urls, resolver=self._resolver
            )
        except InvalidArgument as refused:
            if not spec.url:
                violations.append(FieldViolation("repository.url", "the clone URL is required", "REQUIRED"))
            else:
                violations.extend(refused.field_violations)
        name = spec.full_name.strip()
        if not name and checked is not None:
            name = checked.path.strip("/").removesuffix(".git").strip("/")
        if not name or len(name) > 512 or _CONTROL.search(name):
            violations.append(
                FieldViolation("repository.full_name", "1 to 512 characters, like owner/name", "INVALID_NAME")
            )
        provider = spec.provider
        if not provider:
            host = checked.host.lower() if checked is not None else ""
            provider = "github" if host == "github.com" else "gitlab" if host == "gitlab.com" else "git"
        if provider not in PROVIDERS:
            violations.append(
                FieldViolation("repository.provider", "github, gitlab or git", "INVALID_PROVIDER")
            )
        check_branch(spec.branch, "repository.default_branch", violations)
        check_globs(spec.include_globs, "repository.include_globs", violations)
        check_globs(spec.exclude_globs, "repository.exclude_globs", violations)
        self._check_size(spec.max_file_bytes, violations)
        if len(access_token) > MAX_TOKEN_LENGTH or _CONTROL.search(access_token) or " " in access_token:
            # The description never quotes the token.
            violations.append(
                FieldViolation(
                    "access_token",
                    f"at most {MAX_TOKEN_LENGTH} characters, without spaces or control characters",
                    "INVALID_TOKEN",
                )
            )
        if violations:
            raise InvalidArgument("the repository is not valid", field_violations=violations)
        return dataclasses.replace(spec, full_name=name, provider=provider)

    def _check_size(self, size: int, violations: list[FieldViolation]) -> None:
        limit = self.max_file_limit()
        if size < 0 or size > limit:
            violations.append(
                FieldViolation(
                    "repository.max_file_bytes", f"0 (the server's limit) to {limit}", "OUT_OF_RANGE"
                )
            )

    async def create(
        self,
        user_id: uuid.UUID,
        spec: RepositorySpec,
        *,
        access_token: str = "",
        request_id: str = "",
        sync: bool = False,
        key_id: uuid.UUID | None = None,
    ) -> Created:
        """create registers a repository and returns it with its webhook secret (shown once).

        A repeated `request_id` returns the repository it created, with an empty secret (the
        secret exists only in that first answer), and the job it queued if any.
        """
        if len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument(
                f"request_id is at most {MAX_REQUEST_ID_LENGTH} characters",
                field_violations=[FieldViolation("request_id", "too long", "TOO_LONG")],
            )
        pool = self._pool.get()
        if request_id:
            async with db.as_user(pool, user_id) as conn:
                earlier = await repostore.get_by_request_id(conn, user_id, request_id)
            if earlier is not None:
                job = await self._enqueue_full(user_id, earlier.id, request_id, key_id) if sync else None
                return Created(earlier, "", job)
        spec = await self.validate(spec, access_token)
        box = self.box
        repository_id = uuid.uuid4()
        secret = secrets.token_urlsafe(WEBHOOK_SECRET_BYTES)
        sealed_secret = box.encrypt(
            secret.encode("ascii"), context=secret_context(repository_id, "webhook_secret")
        )
        sealed_token = (
            box.encrypt(access_token.encode("utf-8"), context=secret_context(repository_id, "access_token"))
            if access_token
            else None
        )
        try:
            async with db.as_user(pool, user_id) as conn:
                record = await repostore.insert(
                    conn,
                    repository_id=repository_id,
                    user_id=user_id,
                    full_name=spec.full_name,
                    url=spec.url,
                    provider=spec.provider,
                    branch=spec.branch,
                    settings=repostore.settings_document(
                        spec.include_globs, spec.exclude_globs, spec.max_file_bytes
                    ),
                    webhook_secret_encrypted=sealed_secret,
                    access_token_encrypted=sealed_token,
                    request_id=request_id or None,
                )
        except AlreadyExists as exists:
            if request_id and exists.metadata.get("constraint") == "repositories_user_id_request_id_idx":
                # A concurrent retry won the race: answer as a retry does.
                return await self.create(user_id, spec, request_id=request_id, sync=sync, key_id=key_id)
            raise AlreadyExists(
                f"a {spec.provider} repository named {spec.full_name} is already registered",
                reason="REPOSITORY_EXISTS",
            ) from None
        job = await self._enqueue_full(user_id, record.id, request_id, key_id) if sync else None
        return Created(record, secret, job)

    async def _enqueue_full(
        self, user_id: uuid.UUID, repository_id: uuid.UUID, request_id: str, key_id: uuid.UUID | None
    ) -> JobRecord:
        return await self._jobs.sync_repository(
            user_id,
            str(repository_id),
            full=True,
            # Derived, so a retried create finds its job; hashed, so it fits the jobs' id limit.
            request_id=f"create:{hashlib.sha256(request_id.encode()).hexdigest()[:40]}" if request_id else "",
            key_id=key_id,
        )

    async def get(self, user_id: uuid.UUID, repository_id: uuid.UUID) -> RepositoryRecord:
        """get returns the caller's repository, or NotFound (also for another user's)."""
        async with db.as_user(self._pool.get(), user_id) as conn:
            record = await repostore.get(conn, repository_id)
        if record is None:
            raise not_found(repository_id)
        return record

    async def list(
        self, user_id: uuid.UUID, *, page_size: int, page_token: str
    ) -> tuple[list[RepositoryRecord], str]:
        """list returns one page of the caller's repositories by name, and the next page's token."""
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                field_violations=[FieldViolation("page_size", "must not be negative", "OUT_OF_RANGE")],
            )
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        async with db.as_user(self._pool.get(), user_id) as conn:
            records = await repostore.page(conn, user_id, after=after, limit=limit + 1)
        if len(records) > limit:
            last = records[limit - 1]
            return records[:limit], _encode_token(last.full_name, last.id)
        return records, ""

    async def update(
        self, user_id: uuid.UUID, repository_id: uuid.UUID, change: FilterChange
    ) -> RepositoryRecord:
        """update applies a FilterChange to the caller's repository; a change forgets the synced commit."""
        violations: list[FieldViolation] = []
        if change.branch is not None:
            check_branch(change.branch, "repository.default_branch", violations)
        if change.include_globs is not None:
            check_globs(change.include_globs, "repository.include_globs", violations)
        if change.exclude_globs is not None:
            check_globs(change.exclude_globs, "repository.exclude_globs", violations)
        if change.max_file_bytes is not None:
            self._check_size(change.max_file_bytes, violations)
        if violations:
            raise InvalidArgument("the update is not valid", field_violations=violations)
        async with db.as_user(self._pool.get(), user_id) as conn:
            current = await repostore.get(conn, repository_id, count=False, lock=True)
            if current is None:
                raise not_found(repository_id)
            _refuse_deleting(current)
            branch = current.branch if change.branch is None else change.branch
            include = current.include_globs if change.include_globs is None else change.include_globs
            exclude = current.exclude_globs if change.exclude_globs is None else change.exclude_globs
            size = current.max_file_bytes if change.max_file_bytes is None else change.max_file_bytes
            changed = (branch, include, exclude, size) != (
                current.branch,
                current.include_globs,
                current.exclude_globs,
                current.max_file_bytes,
            )
            updated = await repostore.update_filters(
                conn,
                repository_id,
                branch=branch,
                settings=repostore.settings_document(include, exclude, size),
                reset_commit=changed,
            )
        if updated is None:
            raise not_found(repository_id)
        return updated

    async def rotate_webhook_secret(
        self, user_id: uuid.UUID, repository_id: uuid.UUID
    ) -> tuple[RepositoryRecord, str]:
        """rotate_webhook_secret seals a new secret for the caller's repository and returns it once.

        The old secret stops verifying deliveries as soon as this commits.
        """
        secret = secrets.token_urlsafe(WEBHOOK_SECRET_BYTES)
        sealed = self.box.encrypt(
            secret.encode("ascii"), context=secret_context(repository_id, "webhook_secret")
        )
        async with db.as_user(self._pool.get(), user_id) as conn:
            record = await repostore.set_webhook_secret(conn, repository_id, sealed)
        if record is None:
            raise not_found(repository_id)
        return record, secret

    async def delete(self, user_id: uuid.UUID, repository_id: uuid.UUID) -> None:
        """delete removes the caller's repository, its jobs and (as tombstones) its documents."""
        async with db.as_user(self._pool.get(), user_id) as conn:
            marked = await repostore.mark_deleting(conn, repository_id)
        if not marked:
            raise not_found(repository_id)
        async with db.as_service(self._pool.get()) as conn:
            await repostore.delete(conn, repository_id, user_id)

    def webhook_secret(self, record: RepositoryRecord) -> bytes:
        """webhook_secret opens a repository's webhook secret (HMAC key), or raises FailedPrecondition."""
        if record.webhook_secret_encrypted is None:
            raise FailedPrecondition("the repository has no webhook secret", reason="WEBHOOK_SECRET_MISSING")
        try:
            return self.box.decrypt(
                record.webhook_secret_encrypted, context=secret_context(record.id, "webhook_secret")
            )
        except SecretBoxError as exc:
            raise FailedPrecondition(
                f"the repository's webhook secret cannot be opened: {exc}", reason="WEBHOOK_SECRET_UNREADABLE"
            ) from None


def _refuse_deleting(record: RepositoryRecord) -> None:
    if record.state == "deleting":
        raise FailedPrecondition(f"repository {record.id} is being deleted", reason="REPOSITORY_DELETING")


def _encode_token(full_name: str, repository_id: uuid.UUID) -> str:
    raw = json.dumps([full_name, str(repository_id)], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_token(token: str) -> tuple[str, uuid.UUID]:
    try:
        name, text = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return str(name), uuid.UUID(text)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        message = "page_token is not a token this method returned"
        raise InvalidArgument(
            message, field_violations=[FieldViolation("page_token", message, "INVALID_PAGE_TOKEN")]
        ) from None


async def repository_for_worker(conn: db.Connection, repository_id: uuid.UUID) -> RepositoryRecord:
    """repository_for_worker returns any repository for a worker's connection (`db.as_service`).

    It raises NotFound when the repository was deleted meanwhile. The record carries the URL,
    `branch` (empty: the remote's default), `include_globs`, `exclude_globs`, `max_file_bytes`
    (0: the server's limit) and `last_synced_commit`; the token stays sealed until
    `decrypt_access_token`.
    """
    record = await repostore.get(conn, repository_id, count=False)
    if record is None:
        raise not_found(repository_id)
    return record


def decrypt_access_token(record: RepositoryRecord, *, box: SecretBox | None = None) -> str | None:
    """decrypt_access_token opens a repository's access token, or None when it has none.

    `box` defaults to the one KOTADB_INGEST_SECRET_KEYS configures. A token that cannot be opened
    (its key was removed) raises FailedPrecondition naming the key id, never the token.
    """
    if record.access_token_encrypted is None:
        return None
    opener = box if box is not None else SecretBox.from_settings(env_settings(IngestSettings))
    try:
        plain = opener.decrypt(
            record.access_token_encrypted, context=secret_context(record.id, "access_token")
        )
    except SecretBoxError as exc:
        raise FailedPrecondition(
            f"the repository's access token cannot be opened: {exc}", reason="ACCESS_TOKEN_UNREADABLE"
        ) from None
    return plain.decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Resealed:
    """Resealed counts what `reseal_secrets` did: blobs re-sealed, and blobs no configured key opens."""

    resealed: int
    unreadable: int


async def reseal_secrets(pool: asyncpg.Pool, box: SecretBox, *, batch: int = 500) -> Resealed:
    """reseal_secrets re-encrypts every repository secret not sealed by `box`'s primary key.

    It is the second half of a key rotation: put the new key first in KOTADB_INGEST_SECRET_KEYS,
    restart, run this, then drop the old key once `unreadable` is 0. It works in batches of
    `batch` repositories, one transaction each (rows locked while re-sealed). A blob that no key
    of `box` opens is left as it is, counted and logged by repository id.
    """
    resealed = unreadable = 0
    after: uuid.UUID | None = None
    while True:
        async with db.as_service(pool) as conn:
            page = await repostore.sealed_page(conn, after=after, limit=batch)
            for repository_id, secret, token in page:
                fresh: list[bytes | None] = []
                for blob, field in ((secret, "webhook_secret"), (token, "access_token")):
                    try:
                        fresh.append(_reseal(box, blob, secret_context(repository_id, field)))
                    except SecretBoxError:
                        unreadable += 1
                        logger.warning(
                            "a repository secret opens with no configured key",
                            extra={"fields": {"repository_id": str(repository_id), "field": field}},
                        )
                        fresh.append(None)
                if fresh != [None, None]:
                    await repostore.set_sealed(conn, repository_id, fresh[0], fresh[1])
                    resealed += sum(blob is not None for blob in fresh)
        if len(page) < batch:
            return Resealed(resealed, unreadable)
        after = page[-1][0]


def _reseal(box: SecretBox, blob: bytes | None, context: bytes) -> bytes | None:
    """_reseal is `blob` sealed again under the primary key, or None when it already is (or is absent)."""
    if blob is None or box.key_id(blob) == box.primary:
        return None
    return box.encrypt(box.decrypt(blob, context=context), context=context)
