"""AuthStore: the auth service's key-management queries (asyncpg), run under RLS as the caller.

Every statement on behalf of a user runs inside `as_user` (role `authenticated`, RLS confining
it to that user's rows); the service role uses `as_service`. The api_keys grants keep limits,
quota, permissions and expiry out of reach of `authenticated` (so nobody raises their own quota
through PostgREST). When the auth service, having checked the caller's rights, changes those
columns, it does so in the same transaction, right after RLS proved the row is the caller's:
`_elevated` switches the transaction-local role to `service_role` for that one statement and
back. The row id it writes was read under RLS a statement earlier, so RLS still decides which
row is touched.

Revocations, rotations and updates send `pg_notify('api_key_changes', <key id>)` in the same
transaction, so every auth replica's key cache (services/auth Check) hears of the change when,
and only when, it commits.

Rate-limit and quota counting live in their own modules; this store reads their tables only
for GetUsage. Database errors are translated into services.common.errors by the db helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import asyncpg

from services.common.db import Connection, as_service, as_user, translated_errors
from services.common.errors import NotFound, Unauthenticated, Unavailable
from services.common.identity import Identity
from services.common.server import LazyPool, require_tables

# The tables the auth service reads and writes; readiness fails until migrations created them.
TABLES: tuple[str, ...] = ("public.api_keys", "public.usage_metrics", "public.rate_limit_windows")

T = TypeVar("T")

# Database work abandoned by `bounded`, kept referenced until it ends (cancelled) in the background.
_ABANDONED: set[asyncio.Future[Any]] = set()

# CHANGES_CHANNEL is the NOTIFY channel auth replicas listen on to drop cached keys.
CHANGES_CHANNEL = "api_key_changes"

# REQUEST_ID_INDEX is the unique index that makes creates with a request_id idempotent.
REQUEST_ID_INDEX = "api_keys_user_id_request_id_key"

_COLUMNS = """
  k.id, k.user_id, k.name, k.key_prefix, k.permissions, k.rate_limit, k.monthly_quota,
  k.usage_count, k.usage_period, k.last_used_at, k.expires_at, k.revoked_at, k.rotated_from,
  k.grace_until, k.created_at, k.updated_at, k.metadata,
  (select n.id from public.api_keys n where n.rotated_from = k.id
    order by n.created_at desc limit 1) as rotated_to
"""


@dataclasses.dataclass(frozen=True)
class ApiKeyRecord:
    """ApiKeyRecord is one api_keys row as the auth service sees it: never the hash or the secret.

    It is the one type of a key row: key management reads it under RLS, Check's key cache
    (services/auth/keycache.py) reads it by hash, and `key_state` decides from it whether the
    key works.
    """

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    prefix: str
    permissions: frozenset[str]
    rate_limit: int
    monthly_quota: int
    usage_count: int
    usage_period: dt.date
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    rotated_from: uuid.UUID | None
    rotated_to: uuid.UUID | None
    grace_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    request_id: str | None = None

    def state(self, now: dt.datetime) -> str:
        """state is the key's ApiKey.State name at `now`: ACTIVE, ROTATING, REVOKED or EXPIRED.

        It is `key_state` with a rotated-out key shown as REVOKED: it never works again.
        """
        state = key_state(self, now)
        return "REVOKED" if state == ROTATED else state

    def revoke_time(self, now: dt.datetime) -> dt.datetime | None:
        """revoke_time is when the key stopped working for good: revoked, or its rotation grace ended."""
        if self.revoked_at is not None:
            return self.revoked_at
        if self.grace_until is not None and self.grace_until <= now:
            return self.grace_until
        return None

    def month_usage(self, now: dt.datetime) -> int:
        """month_usage is the usage counted in `now`'s calendar month (0 if the counter is older)."""
        return self.usage_count if self.usage_period >= month_start(now).date() else 0


@dataclasses.dataclass(frozen=True)
class NewKey:
    """NewKey is the row a create or rotation inserts: everything but the generated columns."""

    user_id: uuid.UUID
    name: str
    prefix: str
    key_hash: str
    permissions: frozenset[str]
    rate_limit: int
    monthly_quota: int
    expires_at: dt.datetime | None
    request_id: str | None
    rotated_from: uuid.UUID | None = None
    usage_count: int = 0
    usage_period: dt.date | None = None


@dataclasses.dataclass(frozen=True)
class PageCursor:
    """PageCursor is where a list page ends: the last key's creation time and id (newest first)."""

    created_at: dt.datetime
    id: uuid.UUID


@dataclasses.dataclass(frozen=True)
class EndpointTotals:
    """EndpointTotals is one endpoint's request count, errors and mean latency in a range."""

    endpoint: str
    method: str
    request_count: int
    error_count: int
    mean_response_ms: float


# The states `key_state` names, in the order it tests them (see there).
ACTIVE, ROTATING, REVOKED, EXPIRED, ROTATED = "ACTIVE", "ROTATING", "REVOKED", "EXPIRED", "ROTATED"


def key_state(record: ApiKeyRecord, now: dt.datetime) -> str:
    """key_state is the one rule for whether a key works at `now`, used by Check, KeyManager and the API.

    One order, first match wins: REVOKED (revoked_at set: an explicit, final act), EXPIRED
    (expires_at passed), ROTATED (rotated and its grace period over), ROTATING (rotated, still in
    grace), ACTIVE. Expiry comes before rotation because a rotation's successor inherits the
    expiry: for a key both expired and rotated out, "use the new key" would send the client to
    a key that has expired too, while "expired" says what to fix.
    """
    if record.revoked_at is not None:
        return REVOKED
    if record.expires_at is not None and record.expires_at <= now:
        return EXPIRED
    if record.grace_until is not None:
        return ROTATED if record.grace_until <= now else ROTATING
    return ACTIVE


def check_usable(record: ApiKeyRecord, now: dt.datetime) -> None:
    """check_usable raises Unauthenticated unless the key authenticates requests at `now` (`key_state`)."""
    state = key_state(record, now)
    if state == REVOKED:
        raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
    if state == EXPIRED:
        raise Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
    if state == ROTATED:
        raise Unauthenticated(
            "the API key was rotated and its grace period is over; use the new key", reason="API_KEY_ROTATED"
        )


def month_start(now: dt.datetime) -> dt.datetime:
    """month_start is 00:00 UTC on the first day of `now`'s month."""
    utc = now.astimezone(dt.UTC)
    return utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _record(row: asyncpg.Record) -> ApiKeyRecord:
    metadata = row["metadata"]
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
    return ApiKeyRecord(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        prefix=row["key_prefix"],
        permissions=frozenset(row["permissions"]),
        rate_limit=row["rate_limit"],
        monthly_quota=row["monthly_quota"],
        usage_count=row["usage_count"],
        usage_period=row["usage_period"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        rotated_from=row["rotated_from"],
        rotated_to=row["rotated_to"],
        grace_until=row["grace_until"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        request_id=request_id if isinstance(request_id, str) else None,
    )


async def bounded(work: Awaitable[T], seconds: float) -> T:
    """bounded awaits database `work` for at most `seconds`, else raises Unavailable(DATABASE_UNAVAILABLE).

    Check runs under Envoy's 2 s ext_authz timeout: a database that hangs (no error, no answer)
    must give a prompt, explicit 503 rather than Envoy's empty one. On timeout the work is
    cancelled but not awaited, because a cancelled asyncpg call may itself wait on the hung
    server to clean up; it ends in the background.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_forget)
    raise Unavailable(
        f"the database did not answer within {seconds:g} s; retry shortly",
        reason="DATABASE_UNAVAILABLE",
        retry_after=1.0,
    )


def _forget(task: asyncio.Future[Any]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def find_by_hash(conn: Connection, key_hash: str) -> ApiKeyRecord | None:
    """find_by_hash returns the key whose secret hashes to `key_hash` (on a service-role connection)."""
    row = await conn.fetchrow(f"select {_COLUMNS} from public.api_keys k where k.key_hash = $1", key_hash)
    return None if row is None else _record(row)


@contextlib.asynccontextmanager
async def _elevated(conn: Connection) -> AsyncIterator[None]:
    """_elevated runs the enclosed statements as service_role, then returns to the caller's role."""
    previous = await conn.fetchval("select current_setting('role')")
    await conn.execute("select set_config('role', 'service_role', true)")
    try:
        yield
    finally:
        await conn.execute("select set_config('role', $1, true)", previous)


class AuthStore:
    """AuthStore runs the auth service's key-management queries on the shared pool."""

    def __init__(self, pool: LazyPool | asyncpg.Pool) -> None:
        self._pool = pool

    def _get(self) -> asyncpg.Pool:
        return self._pool.get() if isinstance(self._pool, LazyPool) else self._pool

    async def check_ready(self) -> None:
        """check_ready raises unless every auth table exists."""
        if isinstance(self._pool, LazyPool):
            await require_tables(self._pool, TABLES)

    @contextlib.asynccontextmanager
    async def transaction(self, principal: Identity) -> AsyncIterator[Connection]:
        """transaction is one transaction as `principal`: RLS as its user, or the service role."""
        if principal.is_service:
            async with as_service(self._get()) as conn:
                yield conn
        else:
            assert principal.user_id is not None  # Identity guarantees it for non-service kinds
            async with as_user(self._get(), principal.user_id) as conn:
                yield conn

    # Reads ---------------------------------------------------------------------------------

    async def get(self, conn: Connection, key_id: uuid.UUID, *, lock: bool = False) -> ApiKeyRecord:
        """get returns a key the transaction may see, or raises NotFound (RLS hides others' keys)."""
        suffix = " for update of k" if lock else ""
        row = await conn.fetchrow(f"select {_COLUMNS} from public.api_keys k where k.id = $1{suffix}", key_id)
        if row is None:
            raise NotFound(
                f"API key {key_id} does not exist",
                resource_type="kotadb.v1.ApiKey",
                resource_name=str(key_id),
                reason="API_KEY_NOT_FOUND",
            )
        return _record(row)

    async def find_by_request_id(
        self, conn: Connection, user_id: uuid.UUID, request_id: str
    ) -> ApiKeyRecord | None:
        """find_by_request_id returns the key an earlier create or rotation with `request_id` made."""
        row = await conn.fetchrow(
            f"select {_COLUMNS} from public.api_keys k"
            " where k.user_id = $1 and k.metadata ->> 'request_id' = $2",
            user_id,
            request_id,
        )
        return None if row is None else _record(row)

    async def find_by_hash(self, conn: Connection, key_hash: str) -> ApiKeyRecord | None:
        """find_by_hash returns the key whose secret hashes to `key_hash` (service role: any tenant)."""
        return await find_by_hash(conn, key_hash)

    async def list(
        self,
        conn: Connection,
        *,
        user_id: uuid.UUID | None,
        now: dt.datetime,
        include_inactive: bool,
        after: PageCursor | None,
        limit: int,
    ) -> list[ApiKeyRecord]:
        """list returns up to `limit` keys, newest first (created_at desc, id desc), after `after`.

        `user_id` narrows to one owner (RLS narrows further for users); without
        `include_inactive`, revoked, expired and rotated-out keys are left out.
        """
        rows = await conn.fetch(
            f"select {_COLUMNS} from public.api_keys k"
            " where ($1::uuid is null or k.user_id = $1)"
            "   and ($3 or (k.revoked_at is null"
            "        and (k.expires_at is null or k.expires_at > $2)"
            "        and (k.grace_until is null or k.grace_until > $2)))"
            "   and ($4::timestamptz is null or (k.created_at, k.id) < ($4, $5::uuid))"
            " order by k.created_at desc, k.id desc limit $6",
            user_id,
            now,
            include_inactive,
            after.created_at if after else None,
            after.id if after else None,
            limit,
        )
        return [_record(row) for row in rows]

    # Writes --------------------------------------------------------------------------------

    async def insert(self, conn: Connection, key: NewKey) -> uuid.UUID:
        """insert adds a key: owner-writable columns under RLS, then limits and counters elevated."""
        metadata = json.dumps({"request_id": key.request_id} if key.request_id else {})
        key_id: uuid.UUID = await conn.fetchval(
            "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions, expires_at,"
            " rotated_from, metadata) values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) returning id",
            key.user_id,
            key.name,
            key.prefix,
            key.key_hash,
            sorted(key.permissions),
            key.expires_at,
            key.rotated_from,
            metadata,
        )
        async with _elevated(conn):
            await conn.execute(
                "update public.api_keys set rate_limit = $2, monthly_quota = $3, usage_count = $4,"
                " usage_period = coalesce($5, usage_period) where id = $1",
                key_id,
                key.rate_limit,
                key.monthly_quota,
                key.usage_count,
                key.usage_period,
            )
        return key_id

    async def update(self, conn: Connection, key_id: uuid.UUID, changes: dict[str, Any]) -> None:
        """update sets columns of a key the transaction already read (and locked) under RLS."""
        allowed = ("name", "permissions", "rate_limit", "monthly_quota", "expires_at")
        unknown = set(changes) - set(allowed)
        if unknown:
            raise ValueError(f"update cannot set {sorted(unknown)}")
        if not changes:
            return
        columns = [column for column in allowed if column in changes]
        assignments = ", ".join(f"{column} = ${index + 2}" for index, column in enumerate(columns))
        values = [sorted(changes[c]) if c == "permissions" else changes[c] for c in columns]
        async with _elevated(conn):
            await conn.execute(f"update public.api_keys set {assignments} where id = $1", key_id, *values)
        await self.notify(conn, key_id)

    async def revoke(self, conn: Connection, key_id: uuid.UUID, now: dt.datetime) -> None:
        """revoke sets revoked_at (first revocation wins) and tells every replica, on commit."""
        await conn.execute(
            "update public.api_keys set revoked_at = coalesce(revoked_at, $2) where id = $1", key_id, now
        )
        await self.notify(conn, key_id)

    async def set_grace(self, conn: Connection, key_id: uuid.UUID, grace_until: dt.datetime) -> None:
        """set_grace limits a rotated key's remaining life to `grace_until` and tells every replica."""
        await conn.execute("update public.api_keys set grace_until = $2 where id = $1", key_id, grace_until)
        await self.notify(conn, key_id)

    async def notify(self, conn: Connection, key_id: uuid.UUID) -> None:
        """notify queues `pg_notify('api_key_changes', key_id)`, delivered when the transaction commits."""
        await conn.execute("select pg_notify($1, $2)", CHANGES_CHANNEL, str(key_id))

    # Usage ---------------------------------------------------------------------------------

    async def window_count(self, conn: Connection, key_id: uuid.UUID, window_start: dt.datetime) -> int:
        """window_count is the number of requests admitted for a key in the minute `window_start`."""
        count = await conn.fetchval(
            "select count from public.rate_limit_windows where key_id = $1 and window_start = $2",
            key_id,
            window_start,
        )
        return int(count or 0)

    async def endpoint_totals(
        self, conn: Connection, key_id: uuid.UUID, start: dt.datetime, end: dt.datetime
    ) -> Sequence[EndpointTotals]:
        """endpoint_totals sums a key's metered requests in [start, end) per endpoint and method.

        An error is an HTTP status >= 400 or, for gRPC answered with HTTP 200, a non-zero
        grpc-status.
        """
        rows = await conn.fetch(
            "select endpoint, method, count(*) as requests,"
            " count(*) filter (where status_code >= 400 or coalesce(grpc_status, 0) <> 0) as errors,"
            " coalesce(avg(response_time_ms), 0)::float8 as mean_ms"
            " from public.usage_metrics where key_id = $1 and occurred_at >= $2 and occurred_at < $3"
            " group by endpoint, method order by requests desc, endpoint, method",
            key_id,
            start,
            end,
        )
        return [
            EndpointTotals(
                endpoint=row["endpoint"],
                method=row["method"],
                request_count=row["requests"],
                error_count=row["errors"],
                mean_response_ms=row["mean_ms"],
            )
            for row in rows
        ]

    async def ensure_user(self, user_id: uuid.UUID) -> bool:
        """ensure_user adds an auth.users row for `user_id` if none exists (dev and tests only).

        On Supabase users come from its auth service; this exists for `kotadb keys create
        --user` against plain Postgres. It runs as the database login role (service_role has no
        rights on schema auth) and returns True when it created the user.
        """
        with translated_errors():
            created = await self._get().fetchval(
                "insert into auth.users (id, aud, role) values ($1, 'authenticated', 'authenticated')"
                " on conflict (id) do nothing returning true",
                user_id,
            )
        return bool(created)
