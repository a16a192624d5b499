"""Row level security on every user-scoped table, through the real `as_user` / `as_service` helpers.

For each table in USER_TABLES: user A (role `authenticated` with A's claims) cannot select,
insert, update or delete user B's rows; `anon` sees nothing; the service role sees everything.
Positive controls (A can use its own rows where the grants allow it) keep the negative checks
honest. `test_every_public_table_is_covered` fails when a table is added to schema public
without RLS, without policies carrying USING and WITH CHECK, or without an entry here.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from services.common import db
from services.common.errors import FailedPrecondition, PermissionDenied


@dataclass(frozen=True)
class Tenant:
    """Tenant holds one test user and the ids of the parent rows seeded for it."""

    user_id: uuid.UUID
    key_id: uuid.UUID
    repository_id: uuid.UUID
    job_id: uuid.UUID
    document_id: uuid.UUID


@dataclass(frozen=True)
class TableSpec:
    """TableSpec says how to write a row of a table for a tenant and what users may do."""

    # insert: SQL whose $1 is the row's user_id, and a function giving the remaining arguments.
    insert: str
    insert_args: Callable[[Tenant], list[Any]]
    # update: a SET clause that changes nothing but still needs UPDATE privilege.
    update: str
    # granted: what `authenticated` may do to its own rows.
    granted: frozenset[str]


def _rand() -> str:
    return secrets.token_hex(6)


ALL = frozenset({"select", "insert", "update", "delete"})
READ = frozenset({"select"})

USER_TABLES: dict[str, TableSpec] = {
    "api_keys": TableSpec(
        "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions)"
        " values ($1, 'test key', 'kdb_test', $2, '{read,write}')",
        lambda t: [secrets.token_hex(32)],
        "name = name",
        frozenset({"select", "insert", "update"}),
    ),
    "usage_metrics": TableSpec(
        "insert into public.usage_metrics (user_id, key_id, endpoint, method, status_code, response_time_ms)"
        " values ($1, $2, '/v1/code:search', 'POST', 200, 3)",
        lambda t: [t.key_id],
        "endpoint = endpoint",
        READ,
    ),
    "token_usage": TableSpec(
        "insert into public.token_usage (user_id, key_id, tokens, model) values ($1, $2, 42, 'test')",
        lambda t: [t.key_id],
        "tokens = tokens",
        READ,
    ),
    "rate_limit_windows": TableSpec(
        "insert into public.rate_limit_windows (user_id, key_id, window_start, count)"
        " values ($1, $2, date_trunc('minute', now()) - make_interval(mins => $3), 1)",
        lambda t: [t.key_id, secrets.randbelow(10**6)],
        "count = count",
        READ,
    ),
    "admission_leases": TableSpec(
        "insert into public.admission_leases (user_id, key_id, window_start, holder, tokens, expires_at)"
        " values ($1, $2, date_trunc('minute', now()), $3, 5, now() + interval '1 second')",
        lambda t: [t.key_id, f"test-holder-{_rand()}"],
        "tokens = tokens",
        READ,
    ),
    "repositories": TableSpec(
        "insert into public.repositories (user_id, full_name, url) values ($1, $2, 'https://example.test/r')",
        lambda t: [f"org/repo-{_rand()}"],
        "default_branch = default_branch",
        ALL,
    ),
    "indexing_jobs": TableSpec(
        # Not the seeded repository: it already has its one queued job (20261207000300_ingest_jobs.sql).
        "insert into public.indexing_jobs (user_id, kind, params) values ($1, 'reindex', $2::jsonb)",
        lambda t: ["{}"],
        "cancel_requested_at = cancel_requested_at",
        frozenset({"select", "insert", "update"}),
    ),
    "indexing_job_events": TableSpec(
        "insert into public.indexing_job_events (user_id, job_id, seq, state, message)"
        " values ($1, $2, $3, 'queued', 'test')",
        lambda t: [t.job_id, 1 + secrets.randbelow(10**9)],
        "message = message",
        READ,
    ),
    "webhook_deliveries": TableSpec(
        "insert into public.webhook_deliveries (user_id, repository_id, delivery_id, event, signature_valid)"
        " values ($1, $2, $3, 'push', true)",
        lambda t: [t.repository_id, _rand()],
        "event = event",
        READ,
    ),
    "documents": TableSpec(
        "insert into public.documents (user_id, path, language, content) values ($1, $2, 'python', 'x = 1')",
        lambda t: [f"src/{_rand()}.py"],
        "language = language",
        ALL,
    ),
    "document_changes": TableSpec(
        "insert into public.document_changes (user_id, revision, document_id, path, op)"
        " values ($1, $2, $3, 'forged.py', 'upsert')",
        lambda t: [10**12 + secrets.randbelow(10**9), t.document_id],
        "path = path",
        READ,
    ),
    "ingest_requests": TableSpec(
        "insert into public.ingest_requests (user_id, method, request_id, fingerprint, response)"
        " values ($1, 'UpsertDocuments', $2, 'f', '{}')",
        lambda t: [_rand()],
        "fingerprint = fingerprint",
        ALL,
    ),
    "symbols": TableSpec(
        "insert into public.symbols (user_id, document_id, name, kind, start_line, end_line)"
        " values ($1, $2, 'main', 'function', 1, 3)",
        lambda t: [t.document_id],
        "name = name",
        ALL,
    ),
}
TABLES = sorted(USER_TABLES)


class _Rollback(Exception):
    """_Rollback ends an as_user block so that its transaction is rolled back."""


async def _seed_tenant(pool: asyncpg.Pool) -> Tenant:
    """_seed_tenant creates a user with one row in every user-scoped table (as superuser)."""
    user_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "insert into auth.users (id, email) values ($1, $2)",
            user_id,
            f"rls-{user_id.hex[:8]}@example.test",
        )
        key_id = await conn.fetchval(
            "insert into public.api_keys (user_id, name, key_prefix, key_hash)"
            " values ($1, 'seed', 'kdb_seed', $2) returning id",
            user_id,
            secrets.token_hex(32),
        )
        repository_id = await conn.fetchval(
            "insert into public.repositories (user_id, full_name, url) values ($1, $2, 'https://example.test')"
            " returning id",
            user_id,
            f"org/seed-{_rand()}",
        )
        job_id = await conn.fetchval(
            "insert into public.indexing_jobs (user_id, repository_id, kind)"
            " values ($1, $2, 'sync') returning id",
            user_id,
            repository_id,
        )
        document_id = await conn.fetchval(
            "insert into public.documents (user_id, repository_id, path, content)"
            " values ($1, $2, 'seed.py', 'print(1)') returning id",
            user_id,
            repository_id,
        )
        tenant = Tenant(user_id, key_id, repository_id, job_id, document_id)
        for name, spec in USER_TABLES.items():
            if name in ("api_keys", "repositories", "indexing_jobs", "documents", "document_changes"):
                continue  # seeded above (document_changes by the documents trigger)
            await conn.execute(spec.insert, user_id, *spec.insert_args(tenant))
    return tenant


@pytest.fixture(scope="module")
async def tenants(pool: asyncpg.Pool) -> tuple[Tenant, Tenant]:
    """tenants seeds users A and B, each owning rows in every user-scoped table."""
    return await _seed_tenant(pool), await _seed_tenant(pool)


async def _count(pool: asyncpg.Pool, table: str, user_id: uuid.UUID) -> int:
    """_count counts a user's rows as superuser (RLS does not apply)."""
    value = await pool.fetchval(f"select count(*) from public.{table} where user_id = $1", user_id)
    return int(value)


async def _as_anon(pool: asyncpg.Pool, sql: str, *args: Any) -> Any:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('role', 'anon', true)")
        return await conn.fetch(sql, *args)


@pytest.mark.parametrize("table", TABLES)
async def test_user_selects_only_own_rows(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, b = tenants
    async with db.as_user(pool, a.user_id) as conn:
        owners = {row["user_id"] for row in await conn.fetch(f"select user_id from public.{table}")}
        assert await conn.fetchval(f"select count(*) from public.{table} where user_id = $1", b.user_id) == 0
    assert owners == {a.user_id}


@pytest.mark.parametrize("table", TABLES)
async def test_user_cannot_insert_rows_for_another_user(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, b = tenants
    spec = USER_TABLES[table]
    before = await _count(pool, table, b.user_id)
    with pytest.raises(PermissionDenied):
        async with db.as_user(pool, a.user_id) as conn:
            await conn.execute(spec.insert, b.user_id, *spec.insert_args(b))
    assert await _count(pool, table, b.user_id) == before
    if "insert" in spec.granted:
        with pytest.raises(_Rollback):
            async with db.as_user(pool, a.user_id) as conn:
                await conn.execute(spec.insert, a.user_id, *spec.insert_args(a))
                raise _Rollback
    else:
        with pytest.raises(PermissionDenied):
            async with db.as_user(pool, a.user_id) as conn:
                await conn.execute(spec.insert, a.user_id, *spec.insert_args(a))


@pytest.mark.parametrize("table", TABLES)
async def test_user_cannot_update_another_users_rows(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, b = tenants
    spec = USER_TABLES[table]
    snapshot = await pool.fetch(f"select * from public.{table} where user_id = $1 order by 1", b.user_id)
    if "update" in spec.granted:
        async with db.as_user(pool, a.user_id) as conn:
            assert await conn.execute(
                f"update public.{table} set {spec.update} where user_id = $1", b.user_id
            ) == ("UPDATE 0")
        with pytest.raises(_Rollback):
            async with db.as_user(pool, a.user_id) as conn:
                status = await conn.execute(
                    f"update public.{table} set {spec.update} where user_id = $1", a.user_id
                )
                assert status != "UPDATE 0"
                raise _Rollback
    else:
        with pytest.raises(PermissionDenied):
            async with db.as_user(pool, a.user_id) as conn:
                await conn.execute(f"update public.{table} set {spec.update} where user_id = $1", b.user_id)
    # Moving one's own row into another tenant is refused (WITH CHECK, or no privilege at all).
    with pytest.raises(PermissionDenied):
        async with db.as_user(pool, a.user_id) as conn:
            await conn.execute(
                f"update public.{table} set user_id = $1 where user_id = $2", b.user_id, a.user_id
            )
    assert (
        await pool.fetch(f"select * from public.{table} where user_id = $1 order by 1", b.user_id) == snapshot
    )


@pytest.mark.parametrize("table", TABLES)
async def test_user_cannot_delete_another_users_rows(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, b = tenants
    spec = USER_TABLES[table]
    before = await _count(pool, table, b.user_id)
    assert before > 0
    if "delete" in spec.granted:
        async with db.as_user(pool, a.user_id) as conn:
            assert (
                await conn.execute(f"delete from public.{table} where user_id = $1", b.user_id) == "DELETE 0"
            )
        with pytest.raises(_Rollback):
            async with db.as_user(pool, a.user_id) as conn:
                status = await conn.execute(f"delete from public.{table} where user_id = $1", a.user_id)
                assert status != "DELETE 0"
                raise _Rollback
    else:
        with pytest.raises(PermissionDenied):
            async with db.as_user(pool, a.user_id) as conn:
                await conn.execute(f"delete from public.{table} where user_id = $1", b.user_id)
    assert await _count(pool, table, b.user_id) == before


@pytest.mark.parametrize("table", TABLES)
async def test_anon_sees_and_writes_nothing(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, _ = tenants
    spec = USER_TABLES[table]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_anon(pool, f"select * from public.{table}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_anon(pool, spec.insert, a.user_id, *spec.insert_args(a))


@pytest.mark.parametrize("table", TABLES)
async def test_service_role_sees_every_tenant(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], table: str
) -> None:
    a, b = tenants
    total = await pool.fetchval(f"select count(*) from public.{table}")
    async with db.as_service(pool) as conn:
        assert await conn.fetchval("select current_user") == "service_role"
        owners = {row["user_id"] for row in await conn.fetch(f"select user_id from public.{table}")}
        assert await conn.fetchval(f"select count(*) from public.{table}") == total
    assert {a.user_id, b.user_id} <= owners


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        (
            "insert into public.documents (user_id, repository_id, path) values ($1, $2, 'stolen.py')",
            lambda a, b: [a.user_id, b.repository_id],
        ),
        (
            "insert into public.indexing_jobs (user_id, repository_id, kind) values ($1, $2, 'sync')",
            lambda a, b: [a.user_id, b.repository_id],
        ),
        (
            "insert into public.symbols (user_id, document_id, name, kind, start_line, end_line)"
            " values ($1, $2, 'x', 'function', 1, 1)",
            lambda a, b: [a.user_id, b.document_id],
        ),
    ],
)
async def test_rows_cannot_point_at_another_tenants_parent(
    pool: asyncpg.Pool, tenants: tuple[Tenant, Tenant], sql: str, args: Callable[[Tenant, Tenant], list[Any]]
) -> None:
    # Foreign keys bypass RLS, so the composite (parent_id, user_id) keys are what stop A from
    # attaching rows to B's repository or document.
    a, b = tenants
    with pytest.raises(FailedPrecondition):
        async with db.as_user(pool, a.user_id) as conn:
            await conn.execute(sql, *args(a, b))


async def test_every_public_table_is_covered(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """
        select c.relname, c.relrowsecurity,
               coalesce(json_agg(json_build_object(
                 'name', p.polname, 'cmd', p.polcmd,
                 'roles', (select array_agg(r::regrole::text) from unnest(p.polroles) r),
                 'using', p.polqual is not null, 'check', p.polwithcheck is not null))
                 filter (where p.oid is not null), '[]') as policies
          from pg_class c
          left join pg_policy p on p.polrelid = c.oid
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
         group by c.relname, c.relrowsecurity
        """
    )
    assert {row["relname"] for row in rows} == set(USER_TABLES), "every public table needs an RLS test entry"
    for row in rows:
        table = row["relname"]
        assert row["relrowsecurity"], f"{table}: row level security is not enabled"
        policies = json.loads(row["policies"])
        assert policies, f"{table}: no policies"
        for policy in policies:
            assert policy["roles"] == ["authenticated"], (
                f"{table}.{policy['name']}: not scoped to authenticated"
            )
            assert policy["using"] and policy["check"], (
                f"{table}.{policy['name']}: needs USING and WITH CHECK"
            )


@pytest.mark.parametrize("table", TABLES)
async def test_grants_match_the_table_spec(pool: asyncpg.Pool, table: str) -> None:
    privileges = {}
    for role in ("anon", "authenticated", "service_role"):
        privileges[role] = {
            op
            for op in ("select", "insert", "update", "delete")
            if await pool.fetchval("select has_table_privilege($1, $2, $3)", role, f"public.{table}", op)
            or (
                op != "delete"  # DELETE exists only as a table privilege
                and await pool.fetchval(
                    "select has_any_column_privilege($1, $2, $3)", role, f"public.{table}", op
                )
            )
        }
    assert privileges["anon"] == set()
    assert privileges["authenticated"] == set(USER_TABLES[table].granted)
    assert privileges["service_role"] == set(ALL)


async def test_every_public_table_follows_the_conventions(pool: asyncpg.Pool) -> None:
    # Comments on every table; an updated_at trigger wherever there is an updated_at column.
    rows = await pool.fetch(
        """
        select c.relname,
               obj_description(c.oid, 'pg_class') as comment,
               exists (select 1 from pg_attribute a
                        where a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped)
                 as has_updated_at,
               exists (select 1 from pg_trigger t
                        where t.tgrelid = c.oid and t.tgfoid = 'public.set_updated_at()'::regprocedure)
                 as has_updated_at_trigger
          from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
        """
    )
    for row in rows:
        assert row["comment"], f"{row['relname']}: missing comment on table"
        assert row["has_updated_at"] == row["has_updated_at_trigger"], f"{row['relname']}: updated_at trigger"
    definers = await pool.fetch(
        """
        select p.oid::regprocedure::text as name, p.proconfig
          from pg_proc p
         where p.pronamespace = 'public'::regnamespace and p.prosecdef
        """
    )
    for definer in definers:
        assert 'search_path=""' in (definer["proconfig"] or []), f"{definer['name']}: set search_path = ''"
