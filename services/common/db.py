"""Database access shared by every service: the asyncpg pool, tenant-scoped transactions, errors.

Work done on behalf of a user runs inside `as_user(pool, user_id)`: one transaction in which the
role is `authenticated` and the JWT claims carry the user's id, both set transaction-locally with
`set_config(..., true)` exactly as PostgREST does. Row level security (see
deploy/supabase/migrations) then confines every statement to that user's rows, so a bug in
service code still cannot cross tenants. Background workers use `as_service(pool)`, which runs
as `service_role` (BYPASSRLS).

Nothing here relies on session state outside a transaction, so the same code runs through
Supabase's transaction pooler (port 6543) given `statement_cache_size=0`.

Every wait on the database is bounded, so a database that hangs (a stopped postmaster, a frozen
disk) fails calls promptly with UNAVAILABLE instead of holding them until Envoy's 2 s ext_authz
timeout answers an empty 503 for us:

* opening a connection: `KOTADB_DB_CONNECT_TIMEOUT`;
* taking a pooled connection (which may open one): `KOTADB_DB_ACQUIRE_TIMEOUT`, the default of
  every `acquire()` on the pools made here (`BoundedPool`); the same budget bounds the release;
* every query: `KOTADB_DB_STATEMENT_TIMEOUT`, as asyncpg's `command_timeout` (the client gives
  up and cancels, even when the server does not answer at all) and, inside `as_user`/
  `as_service`, as the server's `statement_timeout`, set transaction-locally like the role so it
  passes through a transaction pooler and stops the server's work even if the cancel is lost.

The pool counts its timeouts in `kotadb_db_timeouts_total{service,kind}` and `ServiceServer`
exports its size (services/common/metrics.py).

asyncpg errors that callers can expect are translated into the shared error model
(services/common/errors.py) when they leave `as_user`/`as_service`/`translated_errors`; messages
are generic because they reach API clients, and the constraint name goes into the metadata.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from services.common import metrics
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KotaError,
    PermissionDenied,
    Unavailable,
)

# Connection is what as_user/as_service yield: a pooled connection inside their transaction.
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    _AcquireContext: TypeAlias = PoolAcquireContext[asyncpg.Record]
else:  # the runtime classes are not subscriptable; only the stubs are generic
    Connection = PoolConnectionProxy
    _AcquireContext = PoolAcquireContext

# Seconds a client should wait before retrying after a transient database failure.
UNAVAILABLE_RETRY_AFTER = 1.0
CONFLICT_RETRY_AFTER = 0.05
# Timeouts of create_pool given a bare DSN (the CLI's commands, benchmarks, test fixtures): no
# gateway waits on them, so they are generous, but still bounded. Services pass CommonSettings.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_STATEMENT_TIMEOUT = 60.0
DEFAULT_ACQUIRE_TIMEOUT = 10.0

DB_TIMEOUTS = metrics.counter(
    "kotadb_db_timeouts_total",
    "Database waits that ran out of time, by kind: connect, acquire (a pooled connection) or"
    " statement (a query, client- or server-side).",
    ("service", "kind"),
)


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

    @property
    def db_connect_timeout(self) -> float: ...

    @property
    def db_statement_timeout(self) -> float: ...

    @property
    def db_acquire_timeout(self) -> float: ...


class BoundedPool(asyncpg.Pool):
    """BoundedPool is an asyncpg pool whose `acquire()` waits at most `acquire_timeout` by default.

    asyncpg's own pool waits forever for a free connection unless each caller passes a timeout,
    and `pool.fetch(...)` passes none; here the default covers every path. It also counts, for
    `service`, the acquires that timed out and the `async with pool.acquire()` blocks (which
    `pool.fetch`, `as_user` and `as_service` are) that ended in a statement timeout.
    """

    def __init__(
        self, *args: Any, acquire_timeout: float, statement_timeout: float, service: str, **kwargs: Any
    ) -> None:
        super().__init__(*args, command_timeout=statement_timeout, **kwargs)
        self.acquire_timeout = acquire_timeout
        self.statement_timeout = statement_timeout
        self.service = service

    def acquire(self, *, timeout: float | None = None) -> _AcquireContext:
        """acquire takes a connection, waiting at most `timeout` (default: the acquire timeout)."""
        return _CountedAcquire(self, self.acquire_timeout if timeout is None else timeout)

    def count_timeout(self, kind: str) -> None:
        """count_timeout records one timeout of `kind` for this pool's service."""
        DB_TIMEOUTS.labels(service=self.service, kind=kind).inc()


class _CountedAcquire(_AcquireContext):
    """_CountedAcquire is asyncpg's acquire context: it counts acquires that timed out and drops
    a connection whose block ended in a timeout (see `drop_on_timeout`)."""

    __slots__ = ()

    async def __aenter__(self) -> Connection:
        try:
            return await super().__aenter__()
        except TimeoutError:
            _count(self.pool, "acquire")
            raise

    async def __aexit__(self, *exc: object) -> None:
        error = exc[1] if len(exc) > 1 else None
        if isinstance(error, TimeoutError | asyncpg.QueryCanceledError):
            # Counted here rather than by a query logger: no cost on calls that succeed.
            _count(self.pool, "statement")
            if isinstance(error, TimeoutError) and self.connection is not None:
                drop_on_timeout(self.connection)
        await super().__aexit__(*exc)

    def __await__(self) -> Generator[Any, None, Connection]:
        try:
            return (yield from super().__await__())
        except TimeoutError:
            _count(self.pool, "acquire")
            raise


def drop_on_timeout(connection: Connection) -> None:
    """drop_on_timeout closes a connection whose query timed out instead of returning it to the pool.

    asyncpg would first wait for its cancel request to reach the server, then reset the connection
    (and a transaction would first roll back), each bounded only by the timeouts again: against a
    hung server that turned one 1.5 s statement timeout into 2.5 s and more for the caller. A
    new connection costs a few milliseconds once the database answers again. A connection
    already dropped (and so released) is left alone.
    """
    with contextlib.suppress(asyncpg.InterfaceError):
        connection.terminate()


def _count(pool: object, kind: str) -> None:
    if isinstance(pool, BoundedPool):
        pool.count_timeout(kind)


async def create_pool(
    dsn: str | PoolSettings,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_cache_size: int | None = None,
    connect_timeout: float | None = None,
    statement_timeout: float | None = None,
    acquire_timeout: float | None = None,
    application_name: str = "kotadb",
    service: str = "kotadb",
) -> BoundedPool:
    """create_pool opens a BoundedPool from a DSN or from CommonSettings.

    Keyword arguments override the settings; without settings the defaults are 1..10
    connections, asyncpg's statement cache (pass `statement_cache_size=0` behind a transaction
    pooler) and the DEFAULT_*_TIMEOUT values. `service` labels the pool's metrics.
    """
    if isinstance(dsn, str):
        url = dsn
        defaults = (1, 10, 100)
        timeouts = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT, DEFAULT_ACQUIRE_TIMEOUT)
    else:
        url = dsn.database_url
        defaults = (dsn.db_pool_min, dsn.db_pool_max, dsn.db_statement_cache_size)
        timeouts = (dsn.db_connect_timeout, dsn.db_statement_timeout, dsn.db_acquire_timeout)
    if not url:
        raise ValueError("no database URL: set KOTADB_DATABASE_URL")
    connect = timeouts[0] if connect_timeout is None else connect_timeout

    pool = BoundedPool(
        url,
        acquire_timeout=timeouts[2] if acquire_timeout is None else acquire_timeout,
        statement_timeout=timeouts[1] if statement_timeout is None else statement_timeout,
        service=service,
        min_size=defaults[0] if min_size is None else min_size,
        max_size=defaults[1] if max_size is None else max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        init=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        statement_cache_size=defaults[2] if statement_cache_size is None else statement_cache_size,
        timeout=connect,
        # Startup parameters are per connection, not session state a pooler could leak.
        server_settings={"application_name": application_name},
    )
    try:
        await pool
    except TimeoutError:
        pool.count_timeout("connect")
        raise
    return pool


def user_claims(user_id: uuid.UUID | str, claims: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """user_claims builds the JWT claims document for a user: extras plus sub and role."""
    subject = str(uuid.UUID(str(user_id)))
    return {**(claims or {}), "sub": subject, "role": "authenticated"}


# One statement sets the role, the claims and (when known) the statement timeout, all
# transaction-locally: one round trip, and nothing survives into a pooler's next client.
_AS_ROLE = (
    "select set_config('role', $1, true),"
    " set_config('request.jwt.claims', $2, true),"
    " set_config('request.jwt.claim.sub', '', true)"
)
_AS_ROLE_TIMED = _AS_ROLE + ", set_config('statement_timeout', $3, true)"


@contextlib.asynccontextmanager
async def as_user(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    claims: Mapping[str, Any] | None = None,
    *,
    statement_timeout: float | None = None,
) -> AsyncIterator[Connection]:
    """as_user yields a connection inside one transaction running as `user_id` under RLS.

    The role is `authenticated` and `request.jwt.claims` holds `claims` plus `sub` and `role`;
    both revert when the transaction ends. The legacy per-claim setting is blanked in the same
    transaction so a stale session value can never override the sub claim in `auth.uid()`.
    `statement_timeout` (seconds) overrides the pool's for this transaction's statements on the
    server; a longer one also needs `timeout=` on each asyncpg call, whose default is the pool's.
    """
    payload = json.dumps(user_claims(user_id, claims))
    async with _as_role(pool, "authenticated", payload, statement_timeout) as conn:
        yield conn


@contextlib.asynccontextmanager
async def as_service(
    pool: asyncpg.Pool, *, statement_timeout: float | None = None
) -> AsyncIterator[Connection]:
    """as_service yields a connection inside one transaction running as `service_role`.

    `statement_timeout` is as for `as_user`.
    """
    payload = json.dumps({"role": "service_role"})
    async with _as_role(pool, "service_role", payload, statement_timeout) as conn:
        yield conn


@contextlib.asynccontextmanager
async def _as_role(
    pool: asyncpg.Pool, role: str, claims: str, statement_timeout: float | None
) -> AsyncIterator[Connection]:
    if statement_timeout is None and isinstance(pool, BoundedPool):
        statement_timeout = pool.statement_timeout
    with translated_errors():
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                if statement_timeout is None:
                    await conn.execute(_AS_ROLE, role, claims)
                else:
                    await conn.execute(_AS_ROLE_TIMED, role, claims, _milliseconds(statement_timeout))
                yield conn
            except TimeoutError:
                drop_on_timeout(conn)  # no ROLLBACK: it would wait on the hung server again
                raise
            except BaseException:
                await transaction.rollback()
                raise
            await transaction.commit()


def _milliseconds(seconds: float) -> str:
    # statement_timeout takes milliseconds; 0 would mean "no limit", so round up to 1 ms.
    return str(max(1, round(seconds * 1000)))


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
    if isinstance(exc, asyncpg.QueryCanceledError | TimeoutError):
        # A statement timeout (the server's, or asyncpg's when the server does not answer) means a
        # database too slow or hung to serve this call now: retryable, like an unreachable one.
        return Unavailable(
            "the database did not answer in time; retry shortly",
            retry_after=UNAVAILABLE_RETRY_AFTER,
            reason="DATABASE_UNAVAILABLE",
            metadata={"cause": "timeout"},
        )
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
