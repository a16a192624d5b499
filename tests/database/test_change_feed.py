"""The document change feed: revisions, tombstones, NOTIFY and the safe tailing horizon."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg

from services.common import db
from tests.conftest import UserFactory

# The rule the migration documents for tailers: only revisions whose writers are certainly
# finished may be consumed, so a revision committed later with a smaller number is never skipped.
SAFE_CHANGES = """
    select revision, op, path from public.document_changes
     where user_id = $1 and xact_id < pg_snapshot_xmin(pg_current_snapshot())
     order by revision
"""


async def _changes(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "select revision, op, path from public.document_changes where user_id = $1 order by revision", user_id
    )
    return [(row["revision"], row["op"], row["path"]) for row in rows]


async def test_every_write_takes_a_new_revision_and_deletes_leave_tombstones(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    async with db.as_user(pool, user_id) as conn:
        inserted = await conn.fetchrow(
            "insert into public.documents (user_id, path, content) values ($1, 'a.py', 'one')"
            " returning id, revision",
            user_id,
        )
    assert inserted is not None
    doc_id, r1 = inserted["id"], inserted["revision"]
    async with db.as_user(pool, user_id) as conn:
        r2 = await conn.fetchval(
            "update public.documents set content = 'two' where id = $1 returning revision", doc_id
        )
    async with db.as_user(pool, user_id) as conn:
        r3 = await conn.fetchval(
            "update public.documents set deleted_at = now() where id = $1 returning revision", doc_id
        )
    async with db.as_user(pool, user_id) as conn:
        await conn.execute("delete from public.documents where id = $1", doc_id)
    changes = await _changes(pool, user_id)
    assert [c[0] for c in changes][:3] == [r1, r2, r3]
    assert r1 < r2 < r3 < changes[3][0]
    assert [(op, path) for _, op, path in changes] == [
        ("upsert", "a.py"),
        ("upsert", "a.py"),
        ("delete", "a.py"),
        ("delete", "a.py"),
    ]
    assert await pool.fetchval("select count(*) from public.documents where id = $1", doc_id) == 0


async def test_documents_are_stamped_with_hash_size_and_updated_at(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    content = "déjà vu\n"
    async with db.as_user(pool, user_id) as conn:
        row = await conn.fetchrow(
            "insert into public.documents (user_id, path, content) values ($1, 'u.txt', $2)"
            " returning id, size, content_hash, created_at, updated_at",
            user_id,
            content,
        )
    assert row is not None
    assert row["size"] == len(content.encode())
    assert row["content_hash"] == hashlib.sha256(content.encode()).hexdigest()
    assert row["updated_at"] == row["created_at"]
    async with db.as_user(pool, user_id) as conn:
        updated = await conn.fetchrow(
            "update public.documents set content = 'x' where id = $1 returning content_hash, updated_at",
            row["id"],
        )
    assert updated is not None
    assert updated["content_hash"] == hashlib.sha256(b"x").hexdigest()
    assert updated["updated_at"] > row["updated_at"]


async def test_commit_sends_a_notification_naming_the_tenant(
    pool: asyncpg.Pool, database_url: str, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener("document_changes", lambda *args: received.put_nowait(args[3]))
        async with db.as_user(pool, user_id) as conn:
            for path in ("n1.py", "n2.py", "n3.py"):
                await conn.execute(
                    "insert into public.documents (user_id, path) values ($1, $2)", user_id, path
                )
        assert await asyncio.wait_for(received.get(), timeout=30) == str(user_id)
        # A marker written afterwards is the next notification: the batch folded into one.
        other = await user_factory()
        async with db.as_user(pool, other) as conn:
            await conn.execute("insert into public.documents (user_id, path) values ($1, 'marker.py')", other)
        assert await asyncio.wait_for(received.get(), timeout=30) == str(other)
    finally:
        await listener.close()


async def test_safe_horizon_holds_back_revisions_behind_an_open_transaction(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    async with pool.acquire() as slow, pool.acquire() as fast:
        slow_tx = slow.transaction()
        await slow_tx.start()
        try:
            early = await slow.fetchval(
                "insert into public.documents (user_id, path) values ($1, 'slow.py') returning revision",
                user_id,
            )
            async with fast.transaction():
                late = await fast.fetchval(
                    "insert into public.documents (user_id, path) values ($1, 'fast.py') returning revision",
                    user_id,
                )
            assert early < late
            # The later revision is committed and visible, but not yet safe to consume: the
            # earlier one may still commit.
            assert [path for _, _, path in await _changes(pool, user_id)] == ["fast.py"]
            assert await pool.fetch(SAFE_CHANGES, user_id) == []
        finally:
            await slow_tx.commit()
    safe = [(row["revision"], row["path"]) for row in await pool.fetch(SAFE_CHANGES, user_id)]
    assert safe == [(early, "slow.py"), (late, "fast.py")]


async def test_users_write_documents_without_rights_on_the_feed_itself(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    async with db.as_user(pool, user_id) as conn:
        assert not await conn.fetchval(
            "select has_sequence_privilege('public.document_revision_seq', 'USAGE')"
        )
        assert not await conn.fetchval("select has_table_privilege('public.document_changes', 'INSERT')")
        await conn.execute("insert into public.documents (user_id, path) values ($1, 'ok.py')", user_id)
        assert await conn.fetchval("select count(*) from public.document_changes") == 1


async def test_upsert_by_path_takes_a_new_revision_and_revives_a_tombstone(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    # The statement ingest uses: one row per (user, repository or none, path).
    upsert = """
        insert into public.documents (user_id, repository_id, path, content) values ($1, null, 'u.py', $2)
        on conflict (user_id, repository_id, path)
        do update set content = excluded.content, deleted_at = null
        returning id, revision
    """
    user_id = await user_factory()
    async with db.as_user(pool, user_id) as conn:
        first = await conn.fetchrow(upsert, user_id, "v1")
        await conn.execute("update public.documents set deleted_at = now() where user_id = $1", user_id)
        second = await conn.fetchrow(upsert, user_id, "v2")
    assert first is not None and second is not None
    assert second["id"] == first["id"]
    assert second["revision"] > first["revision"]
    assert [op for _, op, _ in await _changes(pool, user_id)] == ["upsert", "delete", "upsert"]
    assert await pool.fetchval("select count(*) from public.documents where user_id = $1", user_id) == 1
