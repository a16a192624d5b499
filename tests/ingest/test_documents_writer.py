"""DocumentWriter against the real database: the one write path of UpsertDocuments and the workers.

Each test writes inside `db.as_user` (as the RPCs do) or `db.as_service` (as workers do) and then
reads the tables as the database owner: documents, symbols and change-feed rows must be exactly
what the writer answered, refused items must leave nothing behind, and an unchanged document
must not take a new revision.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import uuid
from collections.abc import Sequence

import asyncpg

from services.common import db
from services.common.server import LazyPool
from services.common.settings import CommonSettings
from services.ingest.config import IngestSettings
from services.ingest.documents import DocumentInput, DocumentWriter, ItemResult
from services.ingest.documentservice import DocumentService
from services.ingest.symbolizer import Analysis, Symbolizer
from tests.conftest import UserFactory
from tests.ingest.conftest import RepositoryFactory

PYTHON = b'''"""A module."""


class Greeter:
    def greet(self, name: str) -> str:
        return f"hello {name}"


def main() -> None:
    print(Greeter().greet("world"))
'''


async def _changes(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "select revision, path, op from public.document_changes where user_id = $1 order by revision", user_id
    )
    return [(r["revision"], r["path"], r["op"]) for r in rows]


async def test_upsert_writes_documents_symbols_and_feed_rows(
    pool: asyncpg.Pool, user_factory: UserFactory, document_writer: DocumentWriter
) -> None:
    user = await user_factory()
    items = [
        DocumentInput(
            "src/greet.py", PYTHON, title="Greeter", tags=("b", "a", "a"), metadata={"commit": "abc"}
        ),
        DocumentInput("README", "plain words\n", language="text"),
    ]
    async with db.as_user(pool, user) as conn:
        outcome = await document_writer.upsert(conn, user, items)

    first, second = outcome.results
    assert [r.index for r in outcome.results] == [0, 1]
    assert first.created and not first.unchanged and not first.rejected
    assert first.content_hash == hashlib.sha256(PYTHON).hexdigest()
    assert outcome.revision == max(first.revision, second.revision) > 0
    row = await pool.fetchrow("select * from public.documents where id = $1", first.id)
    assert row is not None
    assert row["user_id"] == user and row["path"] == "src/greet.py"
    assert row["language"] == "python"  # detected from the path
    assert row["title"] == "Greeter" and list(row["tags"]) == ["a", "b"]
    assert row["revision"] == first.revision and row["content_hash"] == first.content_hash
    assert row["index_skip"] is None

    symbols = await pool.fetch(
        "select name, kind, qualified_name, parent, start_line, start_column, signature, name_start_byte,"
        " name_end_byte from public.symbols where document_id = $1 order by start_line",
        first.id,
    )
    by_name = {s["name"]: s for s in symbols}
    assert set(by_name) == {"Greeter", "greet", "main"}
    assert by_name["greet"]["kind"] == "method" and by_name["greet"]["qualified_name"] == "Greeter.greet"
    assert by_name["greet"]["parent"] == "Greeter"
    assert by_name["greet"]["signature"] == "def greet(self, name: str) -> str:"
    start, end = by_name["greet"]["name_start_byte"], by_name["greet"]["name_end_byte"]
    assert PYTHON[start:end] == b"greet"
    assert by_name["main"]["start_line"] == 9 and by_name["main"]["start_column"] == 4

    changes = await _changes(pool, user)
    assert sorted((rev, path) for rev, path, _ in changes) == sorted(
        [(first.revision, "src/greet.py"), (second.revision, "README")]
    )
    assert {op for _, _, op in changes} == {"upsert"}


async def test_unchanged_content_is_a_no_op_with_the_stored_revision(
    pool: asyncpg.Pool, user_factory: UserFactory, document_writer: DocumentWriter
) -> None:
    user = await user_factory()
    item = DocumentInput("a.py", "x = 1\n", metadata={"k": "v"}, tags=("t",))
    async with db.as_user(pool, user) as conn:
        first = (await document_writer.upsert(conn, user, [item])).results[0]
    async with db.as_user(pool, user) as conn:
        again = await document_writer.upsert(conn, user, [item])
    assert again.results[0].unchanged and not again.results[0].created
    assert again.results[0].revision == first.revision == again.revision
    assert again.results[0].id == first.id
    assert len(await _changes(pool, user)) == 1

    # Metadata, tags, title or language changes are changes, even with the same content.
    for changed in (
        DocumentInput("a.py", "x = 1\n", metadata={"k": "w"}, tags=("t",)),
        DocumentInput("a.py", "x = 1\n", metadata={"k": "w"}, tags=("t", "u")),
        DocumentInput("a.py", "x = 1\n", metadata={"k": "w"}, tags=("t", "u"), title="A"),
        DocumentInput("a.py", "x = 1\n", metadata={"k": "w"}, tags=("t", "u"), title="A", language="text"),
    ):
        async with db.as_user(pool, user) as conn:
            result = (await document_writer.upsert(conn, user, [changed])).results[0]
        assert not result.unchanged and not result.created and result.revision > first.revision
    assert len(await _changes(pool, user)) == 5


async def test_bad_items_are_refused_per_item_and_the_rest_is_written(
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    repository_factory: RepositoryFactory,
    document_writer: DocumentWriter,
) -> None:
    user, stranger = await user_factory(), await user_factory()
    theirs = await repository_factory(stranger)
    cases: list[tuple[DocumentInput, str, str]] = [
        (DocumentInput("", "x"), "path", "PATH_EMPTY"),
        (DocumentInput("/etc/passwd", "x"), "path", "PATH_ABSOLUTE"),
        (DocumentInput("a/../../b", "x"), "path", "PATH_TRAVERSAL"),
        (DocumentInput("..", "x"), "path", "PATH_TRAVERSAL"),
        (DocumentInput("a\\b.py", "x"), "path", "PATH_BACKSLASH"),
        (DocumentInput("a\nb.py", "x"), "path", "PATH_CONTROL_CHARACTER"),
        (DocumentInput("a\0b.py", "x"), "path", "PATH_CONTROL_CHARACTER"),
        (DocumentInput("a//b.py", "x"), "path", "PATH_NOT_CANONICAL"),
        (DocumentInput("bin.dat", b"\x7fELF\x00\x01"), "content_bytes", "CONTENT_BINARY"),
        (DocumentInput("nul.txt", "a\0b"), "text", "CONTENT_BINARY"),
        (DocumentInput("latin1.txt", "caf\xe9".encode("latin-1")), "content_bytes", "CONTENT_NOT_UTF8"),
        (DocumentInput("big.txt", b"x" * (10 * 1024 * 1024 + 1)), "content_bytes", "CONTENT_TOO_LARGE"),
        (DocumentInput("tags.txt", "x", tags=tuple(f"t{i}" for i in range(33))), "tags", "TOO_MANY_TAGS"),
        (DocumentInput("meta.txt", "x", metadata={"k": "v" * 20_000}), "metadata", "METADATA_TOO_LARGE"),
        (DocumentInput("lang.txt", "x", language="klingon"), "language", "LANGUAGE_UNKNOWN"),
        (DocumentInput("theirs.py", "x", repository_id=theirs), "repository_id", "REPOSITORY_NOT_FOUND"),
        (
            DocumentInput("nowhere.py", "x", repository_id=uuid.uuid4()),
            "repository_id",
            "REPOSITORY_NOT_FOUND",
        ),
    ]
    items = [DocumentInput("good.py", "ok = True\n"), *(case for case, _, _ in cases)]
    items.append(DocumentInput("good.py", "again\n"))  # the same path twice in one batch
    async with db.as_user(pool, user) as conn:
        outcome = await document_writer.upsert(conn, user, items)

    good, *refused, duplicate = outcome.results
    assert good.created and not good.rejected
    for index, (result, (_, name, reason)) in enumerate(zip(refused, cases, strict=True), start=1):
        assert result.rejected and result.id is None and result.revision == 0, result
        assert [(v.field, v.reason) for v in result.violations] == [(f"documents[{index}].{name}", reason)]
    assert [(v.field, v.reason) for v in duplicate.violations] == [
        (f"documents[{len(items) - 1}].path", "DUPLICATE_PATH")
    ]
    paths = await pool.fetch("select path, content from public.documents where user_id = $1", user)
    assert [(r["path"], r["content"]) for r in paths] == [("good.py", "ok = True\n")]
    assert await pool.fetchval("select count(*) from public.documents where user_id = $1", stranger) == 0
    assert outcome.revision == good.revision


async def test_content_the_engine_skips_is_stored_with_its_reason(
    pool: asyncpg.Pool, user_factory: UserFactory, document_writer: DocumentWriter
) -> None:
    user = await user_factory()
    big = ("line of text\n" * 90_000).encode()  # ~1.1 MiB: over the engine's 1 MiB, under the hard limit
    dense = "".join(chr(0x4E00 + i) for i in range(20_000)).encode()
    items = [DocumentInput("big.txt", big), DocumentInput("dense.txt", dense), DocumentInput("empty.py", "")]
    async with db.as_user(pool, user) as conn:
        outcome = await document_writer.upsert(conn, user, items)
    assert [r.index_skip for r in outcome.results] == ["too_large", "too_many_trigrams", "empty"]
    rows = await pool.fetch(
        "select path, size, index_skip from public.documents where user_id = $1 order by path", user
    )
    assert [(r["path"], r["size"], r["index_skip"]) for r in rows] == [
        ("big.txt", len(big), "too_large"),
        ("dense.txt", len(dense), "too_many_trigrams"),
        ("empty.py", 0, "empty"),
    ]


async def test_repository_documents_delete_paths_and_existing_hashes(
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    repository_factory: RepositoryFactory,
    document_writer: DocumentWriter,
) -> None:
    """A worker's view: as the service role, a repository's documents, hashes and deletions."""
    user = await user_factory()
    repo = await repository_factory(user)
    items = [DocumentInput(p, f"# {p}\n", repository_id=repo) for p in ("a.py", "b.py", "c/d.py")]
    async with db.as_service(pool) as conn:
        written = await document_writer.upsert(conn, user, items)
        pushed = await document_writer.upsert(conn, user, [DocumentInput("a.py", "pushed\n")])
    assert all(r.created for r in written.results) and pushed.results[0].created

    async with db.as_service(pool) as conn:
        hashes = await document_writer.existing_hashes(conn, user, repo)
        pushed_hashes = await document_writer.existing_hashes(conn, user, None)
    assert hashes == {i.path: hashlib.sha256(str(i.content).encode()).hexdigest() for i in items}
    assert pushed_hashes == {"a.py": hashlib.sha256(b"pushed\n").hexdigest()}

    async with db.as_service(pool) as conn:
        revision = await document_writer.delete_paths(conn, user, repo, ["a.py", "c/d.py", "missing.py"])
        again = await document_writer.delete_paths(conn, user, repo, ["a.py"])
    assert revision > written.revision and again == 0
    async with db.as_service(pool) as conn:
        assert await document_writer.existing_hashes(conn, user, repo) == {"b.py": hashes["b.py"]}
        assert await document_writer.existing_hashes(conn, user, None) == pushed_hashes
    tombstones = await pool.fetch(
        "select path, op from public.document_changes where user_id = $1 and op = 'delete' order by path",
        user,
    )
    assert [(t["path"], t["op"]) for t in tombstones] == [("a.py", "delete"), ("c/d.py", "delete")]
    assert (
        await pool.fetchval(
            "select count(*) from public.symbols s join public.documents d on d.id = s.document_id"
            " where d.user_id = $1 and d.deleted_at is not null",
            user,
        )
        == 0
    )

    # Writing a deleted path again revives it with a new revision, even with the same content.
    async with db.as_service(pool) as conn:
        revived = await document_writer.upsert(conn, user, [items[0]])
    assert not revived.results[0].unchanged and revived.results[0].revision > revision


async def test_concurrent_identical_writes_take_one_revision(
    pool: asyncpg.Pool, user_factory: UserFactory, document_writer: DocumentWriter
) -> None:
    """Two transactions racing to write the same new document: one writes, the other is unchanged."""
    user = await user_factory()
    item = DocumentInput("race.py", "def race():\n    pass\n")

    async def write() -> ItemResult:
        async with db.as_user(pool, user) as conn:
            return (await document_writer.upsert(conn, user, [item])).results[0]

    first, second = await asyncio.gather(write(), write())
    assert first.id == second.id and first.revision == second.revision
    assert sorted([first.unchanged, second.unchanged]) == [False, True]
    assert len(await _changes(pool, user)) == 1
    assert await pool.fetchval("select count(*) from public.symbols where document_id = $1", first.id) == 1


async def test_a_dead_symbol_worker_is_replaced(pool: asyncpg.Pool) -> None:
    """Killing the worker process breaks the pool; the next batch runs on a new one, symbols intact."""
    symbolizer = Symbolizer(1)
    try:
        before = await symbolizer.analyze_many([(PYTHON, "python")])
        assert {s.name for s in before[0].symbols} == {"Greeter", "greet", "main"}
        executor = symbolizer._pool
        assert executor is not None
        for process in list(executor._processes.values()):
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        after = await symbolizer.analyze_many([(PYTHON, "python"), (b"", "text")])
        assert after[0] == before[0] and after[1].index_skip == "empty"
        assert symbolizer.restarts == 1
    finally:
        symbolizer.close()


async def test_request_ids_expire_after_the_retention(
    pool: asyncpg.Pool, user_factory: UserFactory, database_url: str
) -> None:
    """A request id older than the retention is forgotten: the same id is then a new request."""
    user = await user_factory()
    lazy = LazyPool(CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=2))
    await lazy.connect()
    service = DocumentService(lazy, IngestSettings(database_url=database_url, symbol_workers=1))
    try:
        first = await service.upsert(user, [DocumentInput("r.py", "r = 1\n")], request_id="keep-1")
        await service.upsert(user, [DocumentInput("r.py", "r = 2\n")])
        replay = await service.upsert(user, [DocumentInput("r.py", "r = 1\n")], request_id="keep-1")
        assert replay == first
        await pool.execute(
            "update public.ingest_requests set created_at = now() - interval '2 days' where user_id = $1",
            user,
        )
        fresh = await service.upsert(user, [DocumentInput("r.py", "r = 1\n")], request_id="keep-1")
        assert fresh.results[0].revision > first.results[0].revision and not fresh.results[0].unchanged
        rows = await pool.fetchval("select count(*) from public.ingest_requests where user_id = $1", user)
        assert rows == 1
    finally:
        await asyncio.to_thread(service.close)
        await lazy.close(wait=5)


class _NoExtraction(Symbolizer):
    """_NoExtraction is a symbolizer that fails the test if anything asks it to extract."""

    async def analyze_many(self, items: Sequence[tuple[bytes, str]]) -> list[Analysis]:
        raise AssertionError(f"extraction inside the write step ({len(items)} items)")


async def test_prepare_extracts_before_the_transaction_and_write_only_writes(
    pool: asyncpg.Pool, user_factory: UserFactory, document_writer: DocumentWriter
) -> None:
    # The services prepare (check and extract) with no connection held, then write in a short
    # transaction: the write step must use the prepared symbols and never extract.
    user = await user_factory()
    items = [DocumentInput("src/greet.py", PYTHON), DocumentInput("../bad.py", "x = 1\n")]
    prepared = await document_writer.prepare(items, first_index=3)
    writer = DocumentWriter(_NoExtraction(1))
    async with db.as_user(pool, user) as conn:
        outcome = await writer.write(conn, user, prepared)

    good, bad = outcome.results
    assert [good.index, bad.index] == [3, 4]
    assert good.created and not good.rejected
    assert bad.rejected and bad.violations[0].field == "documents[4].path"
    rows = await pool.fetch(
        "select qualified_name, kind from public.symbols where document_id = $1 order by start_line", good.id
    )
    assert [(r["qualified_name"], r["kind"]) for r in rows] == [
        ("Greeter", "class"),
        ("Greeter.greet", "method"),
        ("main", "function"),
    ]
    assert [(path, op) for _, path, op in await _changes(pool, user)] == [("src/greet.py", "upsert")]


async def test_ingest_transactions_take_the_ingest_statement_timeout(
    database_url: str, user_factory: UserFactory
) -> None:
    """Batch writes run under KOTADB_INGEST_DB_STATEMENT_TIMEOUT, not the 1.5 s tuned for auth's checks."""
    user = await user_factory()
    settings = IngestSettings(database_url=database_url, db_pool_min=1, db_pool_max=2)
    assert settings.db_statement_timeout > CommonSettings(database_url=database_url).db_statement_timeout
    lazy = LazyPool(settings)  # as services/ingest/server.py gives it to DocumentService
    await lazy.connect()
    try:
        async with db.as_user(lazy.get(), user) as conn:
            assert await conn.fetchval("show statement_timeout") == f"{settings.db_statement_timeout:.0f}s"
    finally:
        await lazy.close(wait=5)
