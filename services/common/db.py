"""Database access shared by every service: the asyncpg pool, tenant-scoped transactions, errors.

Work done on behalf of a user runs inside `as_user(pool, user_id)`: one transaction in which the
role is `authenticated` and the JWT claims carry the user's id, both set transaction-locally with
`set_config(..., true)` exactly as PostgREST does. Row level security (see
deploy/supabase/migrations) then confines every statement to that user's rows, so a bug in
service code still cannot cross tenants. Background workers use `as_service(pool)`, which runs
as `service_role` (BYPASSRLS).

Nothing here relies on session state outside a transaction, so the same code runs through
Supabase's transaction pooler (port 6543) given `statement_cache_size=0`.

asyncpg errors that callers can expect are translated into the shared error model
(services/common/errors.py) when they leave `as_user`/`as_service`/`translated_errors`; messages
are generic because they reach API clients, and the constraint name goes into the metadata.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KotaError,
    PermissionDenied,
    Unavailable,
)

# Connection is what as_user/as_service yield: a pooled connection inside their transaction.
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]
else:  # the runtime class is not subscriptable; only the stubs are generic
    Connection = PoolConnectionProxy

# Seconds a client should wait before retrying after a transient database failure.
UNAVAILABLE_RETRY_AFTER = 1.0
CONFLICT_RETRY_AFTER = 0.05


class PoolSettings(Protocol):
    """PoolSettings is the part of CommonSettings (services/common/settings.py) a pool needs."""

    @property
    def database_url(self) -> str: ...

    @property
    def db_pool_min(self) -> int: ...

    @property
    def db_pool_max(self) -> int: ...

    @property
    def db_statement_cache_size(self) -> int: ...


async def create_pool(
    dsn: str | PoolSettings,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_cache_size: int | None = None,
    connect_timeout: float | None = None,
    application_name: str = "kotadb",
) -> asyncpg.Pool:
    """create_pool opens an asyncpg pool from a DSN or from CommonSettings.

    Keyword arguments override the settings; without settings the defaults are 1..10
    connections and asyncpg's statement cache (pass `statement_cache_size=0` behind a
    transaction pooler).
    """
    if isinstance(dsn, str):
        url = dsn
        defaults = (1, 10, 100)
        timeout: float = 5.0
    else:
        url = dsn.database_url
        defaults = (dsn.db_pool_min, dsn.db_pool_max, dsn.db_statement_cache_size)
        timeout = float(getattr(dsn, "db_connect_timeout", 5.0))
    if not url:
        raise ValueError("no database URL: set KOTADB_DATABASE_URL")
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url,
        min_size=defaults[0] if min_size is None else min_size,
        max_size=defaults[1] if max_size is None else max_size,
        statement_cache_size=defaults[2] if statement_cache_size is None else statement_cache_size,
        timeout=connect_timeout if connect_timeout is not None else timeout,
        # Startup parameters are per connection, not session state a pooler could leak.
        server_settings={"application_name": application_name},
    )
    return pool


def user_claims(user_id: uuid.UUID | str, claims: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """user_claims builds the JWT claims document for a user: extras plus sub and role."""
    subject = str(uuid.UUID(str(user_id)))
    return {**(claims or {}), "sub": subject, "role": "authenticated"}


@contextlib.asynccontextmanager
async def as_user(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    claims: Mapping[str, Any] | None = None,
) -> AsyncIterator[Connection]:
    """as_user yields a connection inside one transaction running as `user_id` under RLS.

    The role is `authenticated` and `request.jwt.claims` holds `claims` plus `sub` and `role`;
    both revert when the transaction ends. The legacy per-claim setting is blanked in the same
    transaction so a stale session value can never override the sub claim in `auth.uid()`.
    """
    payload = json.dumps(user_claims(user_id, claims))
    with translated_errors():
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "select set_config('role', 'authenticated', true),"
                " set_config('request.jwt.claims', $1, true),"
                " set_config('request.jwt.claim.sub', '', true)",
                payload,
            )
            yield conn


@contextlib.asynccontextmanager
async def as_service(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """as_service yields a connection inside one transaction running as `service_role`."""
    payload = json.dumps({"role": "service_role"})
    with translated_errors():
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "select set_config('role', 'service_role', true),"
                " set_config('request.jwt.claims', $1, true),"
                " set_config('request.jwt.claim.sub', '', true)",
                payload,
            )
            yield conn


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """translated_errors re-raises expected asyncpg errors as KotaError subclasses."""
    try:
        yield
    # OSError covers refused/reset connections and TimeoutError (asyncio's too, since 3.11).
    except (asyncpg.PostgresError, OSError) as exc:
        translated = translate_error(exc)
        if translated is None:
            raise
        raise translated from exc


def translate_error(exc: BaseException) -> KotaError | None:
    """translate_error maps an asyncpg (or connection) error to the shared error model.

    It returns None for errors that are not expected in normal operation; those propagate
    unchanged and become INTERNAL at the gRPC boundary.
    """
    constraint = getattr(exc, "constraint_name", None)
    metadata = {"constraint": constraint} if constraint else {}
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists(
            "a resource with the same unique key already exists", reason="ALREADY_EXISTS", metadata=metadata
        )
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return FailedPrecondition(
            "a referenced resource does not exist or belongs to someone else",
            reason="REFERENCED_RESOURCE_MISSING",
            metadata=metadata,
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        rls = "row-level security" in str(exc)
        return PermissionDenied(
            "the caller may not perform this operation on this data",
            reason="ROW_LEVEL_SECURITY" if rls else "DATABASE_PERMISSION_DENIED",
            metadata=metadata,
        )
    if isinstance(
        exc,
        asyncpg.CheckViolationError
        | asyncpg.NotNullViolationError
        | asyncpg.ExclusionViolationError
        | asyncpg.DataError,
    ):
        return InvalidArgument(
            "a value is not acceptable for this resource", reason="CONSTRAINT_VIOLATION", metadata=metadata
        )
    if isinstance(
        exc, asyncpg.SerializationError | asyncpg.DeadlockDetectedError | asyncpg.LockNotAvailableError
    ):
        return Aborted(
            "the operation conflicted with a concurrent one; retry it",
            retry_after=CONFLICT_RETRY_AFTER,
            reason="TRANSACTION_CONFLICT",
        )
    if isinstance(exc, asyncpg.QueryCanceledError):
        return DeadlineExceeded("the database query was cancelled or timed out", reason="DATABASE_TIMEOUT")
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | OSError,
    ):
        return Unavailable(
            "the database is unavailable; retry shortly",
            retry_after=UNAVAILABLE_RETRY_AFTER,
            reason="DATABASE_UNAVAILABLE",
        )
    return None
