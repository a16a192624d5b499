"""Repositories: the rules for the git repositories users register, and what workers read of them.

This first part holds what workers need: `repository_for_worker` reads any repository on a
service-role connection and `decrypt_access_token` opens its clone token (sealed by SecretBox with
the repository id and field name as associated data). The token is never put in a log, an error
message or a URL; the worker hands it to git through its environment.
"""

from __future__ import annotations

import uuid

from services.common import db
from services.common.errors import FailedPrecondition, NotFound
from services.common.settings import env_settings
from services.ingest import repostore
from services.ingest.config import IngestSettings
from services.ingest.repostore import RepositoryRecord
from services.ingest.secretbox import SecretBox, SecretBoxError


def secret_context(repository_id: uuid.UUID, field: str) -> bytes:
    """secret_context is the AES-GCM associated data binding a sealed secret to its row and column."""
    return f"{repository_id}:{field}".encode("ascii")


def not_found(repository_id: uuid.UUID) -> NotFound:
    """not_found is the one error for a repository that does not exist or is someone else's."""
    return NotFound(
        "no such repository",
        reason="REPOSITORY_NOT_FOUND",
        resource_type="kotadb.v1.Repository",
        resource_name=str(repository_id),
    )


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
