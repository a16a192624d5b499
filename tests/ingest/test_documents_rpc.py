"""The document RPCs over real gRPC against an in-process ingest server and the real database.

Calls carry identities signed as the gateway's Check signs them (tests/ingest/conftest.py).
Every refusal is checked for its status, reason and field, and for having written nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from kotadb.v1 import document_pb2, ingest_pb2

from services.common import metrics
from tests.conftest import UserFactory
from tests.ingest.conftest import IngestServer, RepositoryFactory, caller_metadata
from tests.runtime.rpc import status_details, unpack_details

MiB = 1024 * 1024


def _doc(path: str, text: str = "x = 1\n", **fields: object) -> document_pb2.Document:
    return document_pb2.Document(path=path, text=text, **fields)  # type: ignore[arg-type]


async def _count(pool: asyncpg.Pool, user: uuid.UUID, table: str = "documents") -> int:
    return int(await pool.fetchval(f"select count(*) from public.{table} where user_id = $1", user))


async def _refused(call: object, code: grpc.StatusCode, reason: str) -> dict[str, object]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value
    details = unpack_details(status_details(caught.value))
    assert details["ErrorInfo"].reason == reason, details
    return details


async def test_batch_upsert_answers_bad_items_and_commits_the_rest(
    ingest_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    stub = ingest_server.stub()
    request = ingest_pb2.UpsertDocumentsRequest(
        documents=[
            _doc(
                "src/app.py", "def run():\n    pass\n", tags=["core"], title="App", metadata={"commit": "c1"}
            ),
            _doc("../escape.py"),
            document_pb2.Document(path="logo.png", content_bytes=b"\x89PNG\r\n\x1a\n\x00\x00"),
            document_pb2.Document(path="latin.txt", content_bytes="ol\xe9".encode("latin-1")),
            document_pb2.Document(path="huge.txt", content_bytes=b"a" * (10 * MiB + 1)),
            _doc("C:\\win.py"),
            document_pb2.Document(path="ok.txt", content_bytes="fine é\n".encode()),
        ]
    )
    response = await stub.UpsertDocuments(request, metadata=ingest_server.caller(user), timeout=60)
    results = list(response.results)
    assert [r.index for r in results] == list(range(7))
    assert [[(v.field, v.reason) for v in r.field_violations] for r in results] == [
        [],
        [("documents[1].path", "PATH_TRAVERSAL")],
        [("documents[2].content_bytes", "CONTENT_BINARY")],
        [("documents[3].content_bytes", "CONTENT_NOT_UTF8")],
        [("documents[4].content_bytes", "CONTENT_TOO_LARGE")],
        [("documents[5].path", "PATH_BACKSLASH")],
        [],
    ]
    app, ok = results[0], results[6]
    assert app.created and app.index_state == document_pb2.Document.INDEXABLE and app.id
    assert all(not r.id and r.revision == 0 for r in results[1:6])
    assert response.revision == max(app.revision, ok.revision)
    stored = await pool.fetch("select path from public.documents where user_id = $1 order by path", user)
    assert [r["path"] for r in stored] == ["ok.txt", "src/app.py"]
    assert await _count(pool, user, "symbols") == 1  # run()

    got = await stub.GetDocument(
        ingest_pb2.GetDocumentRequest(id=app.id), metadata=ingest_server.caller(user)
    )
    assert got.text == "def run():\n    pass\n" and got.language == "python"
    assert list(got.tags) == ["core"] and got.title == "App" and dict(got.metadata) == {"commit": "c1"}
    assert got.revision == app.revision and got.content_hash == app.content_hash
    assert got.index_state == document_pb2.Document.INDEXABLE


async def test_whole_request_limits_write_nothing(
    ingest_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    stub = ingest_server.stub()
    too_many = ingest_pb2.UpsertDocumentsRequest(documents=[_doc(f"f{i}.py") for i in range(1001)])
    details = await _refused(
        stub.UpsertDocuments(too_many, metadata=ingest_server.caller(user)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_DOCUMENTS",
    )
    assert [v.field for v in details["BadRequest"].field_violations] == ["documents"]  # type: ignore[attr-defined]
    too_big = ingest_pb2.UpsertDocumentsRequest(
        documents=[document_pb2.Document(path=f"b{i}.txt", content_bytes=b"b" * (5 * MiB)) for i in range(3)]
    )
    await _refused(
        stub.UpsertDocuments(too_big, metadata=ingest_server.caller(user), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_TOO_LARGE",
    )
    assert await _count(pool, user) == 0


async def test_unchanged_content_and_retried_request_ids_write_nothing_new(
    ingest_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    stub = ingest_server.stub()
    caller = ingest_server.caller(user)
    first = await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(documents=[_doc("a.py")]), metadata=caller
    )
    again = await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(documents=[_doc("a.py")]), metadata=caller
    )
    assert again.results[0].unchanged and not again.results[0].created
    assert again.results[0].revision == first.results[0].revision == again.revision
    feed = await _count(pool, user, "document_changes")
    assert feed == 1

    request = ingest_pb2.UpsertDocumentsRequest(
        documents=[_doc("b.py", "b = 2\n"), _doc("/abs.py")], request_id="retry-1"
    )
    answers = await asyncio.gather(*(stub.UpsertDocuments(request, metadata=caller) for _ in range(3)))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0].results[0].created and answers[0].results[1].field_violations
    assert await _count(pool, user, "document_changes") == feed + 1
    # Later retries, even after the document changed, return the first answer and write nothing.
    await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(documents=[_doc("b.py", "b = 3\n")]), metadata=caller
    )
    replay = await stub.UpsertDocuments(request, metadata=caller)
    assert replay == answers[0]
    assert await _count(pool, user, "document_changes") == feed + 2

    reused = ingest_pb2.UpsertDocumentsRequest(documents=[_doc("c.py")], request_id="retry-1")
    await _refused(
        stub.UpsertDocuments(reused, metadata=caller), grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"
    )
    # Request ids are per tenant: another user's identical id is a new request.
    other = await user_factory()
    theirs = await stub.UpsertDocuments(request, metadata=ingest_server.caller(other))
    assert theirs.results[0].created and theirs.results[0].id != answers[0].results[0].id
    assert await _count(pool, user, "document_changes") == feed + 2


async def test_stream_commits_in_batches_while_it_reads(
    ingest_server: IngestServer, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    """With three documents per batch, the first batch is visible before the stream ends."""
    user = await user_factory()
    stub = ingest_server.stub()
    first_batch_seen = asyncio.Event()

    async def messages() -> AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest]:
        for i in range(3):
            yield ingest_pb2.StreamUpsertDocumentsRequest(document=_doc(f"s/{i}.py"), request_id="stream-1")
        await asyncio.wait_for(first_batch_seen.wait(), timeout=60)
        yield ingest_pb2.StreamUpsertDocumentsRequest(document=_doc("s/../bad.py"))
        for i in range(3, 8):
            yield ingest_pb2.StreamUpsertDocumentsRequest(document=_doc(f"s/{i}.py"))

    async def watch() -> None:
        # The database is what is watched: there is no event to wait on but the rows appearing.
        while await _count(pool, user) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        first_batch_seen.set()

    watcher = asyncio.create_task(watch())
    response = await stub.StreamUpsertDocuments(messages(), metadata=ingest_server.caller(user), timeout=120)
    await watcher
    assert response.document_count == 9 and response.batch_count == 3
    assert (response.created_count, response.rejected_count, response.unchanged_count) == (8, 1, 0)
    assert [r.index for r in response.results] == list(range(9))
    assert [v.field for v in response.results[3].field_violations] == ["documents[3].path"]
    assert response.revision == max(r.revision for r in response.results)
    assert await _count(pool, user) == 8

    # The same stream again (same request id): every batch replays, nothing new is written.
    feed = await _count(pool, user, "document_changes")
    first_batch_seen.set()
    replay = await stub.StreamUpsertDocuments(messages(), metadata=ingest_server.caller(user), timeout=120)
    assert list(replay.results) == list(response.results) and replay.created_count == 8
    assert await _count(pool, user, "document_changes") == feed


async def test_a_failed_stream_batch_stops_the_batches_after_it_and_phases_are_recorded(
    ingest_server: IngestServer,
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batches are extracted ahead, but none commits after a failed one; every batch is timed."""
    user = await user_factory()
    stub = ingest_server.stub()
    caller = ingest_server.caller(user)

    def sample(phase: str) -> float:
        value = metrics.REGISTRY.get_sample_value("kotadb_ingest_batch_phase_seconds_count", {"phase": phase})
        return value or 0.0

    def stream(texts: list[str]) -> AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest]:
        async def messages() -> AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest]:
            for i, text in enumerate(texts):
                yield ingest_pb2.StreamUpsertDocumentsRequest(
                    document=_doc(f"p/{i}.py", text), request_id="pipe-1"
                )

        return messages()

    before = {phase: sample(phase) for phase in ("receive", "extract", "documents", "symbols", "commit")}
    with caplog.at_level(logging.DEBUG, logger="kotadb.ingest.batches"):
        first = await stub.StreamUpsertDocuments(
            stream([f"def f{i}():\n    pass\n" for i in range(6)]), metadata=caller, timeout=120
        )
    assert first.batch_count == 2 and first.created_count == 6
    assert all(sample(phase) == before[phase] + 2 for phase in before)
    lines = [r for r in caplog.records if r.getMessage() == "ingest batch"]
    assert [(r.fields["documents"], r.fields["written"], r.fields["symbols"]) for r in lines] == [  # type: ignore[attr-defined]
        (3, 3, 3),
        (3, 3, 3),
    ]

    # The same request id with another second batch: the first replays, the second is refused
    # as a reused id, and the third (new paths, already read and extracted) never commits.
    texts = [f"def f{i}():\n    pass\n" for i in range(3)] + [f"g{i} = 1\n" for i in range(3, 30)]
    await _refused(
        stub.StreamUpsertDocuments(stream(texts), metadata=caller, timeout=120),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert await _count(pool, user) == 6
    changed = await pool.fetchval(
        "select count(*) from public.documents where user_id = $1 and content like 'g%'", user
    )
    assert changed == 0


async def test_get_list_and_delete_with_filters_masks_and_stable_pages(
    ingest_server: IngestServer,
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    repository_factory: RepositoryFactory,
) -> None:
    user = await user_factory()
    repo = await repository_factory(user, "octo/hello")
    stub = ingest_server.stub()
    caller = ingest_server.caller(user)
    documents = [
        _doc(f"lib/m{i}.py", f"v = {i}\n", repository_id=str(repo), tags=["even"] if i % 2 == 0 else [])
        for i in range(6)
    ]
    documents += [_doc("docs/guide.md", "# Guide\n", repository_id=str(repo)), _doc("notes.txt", "pushed\n")]
    written = await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(documents=documents), metadata=caller
    )
    ids = {r.path: r.id for r in written.results}

    async def listing(**fields: object) -> ingest_pb2.ListDocumentsResponse:
        return await stub.ListDocuments(ingest_pb2.ListDocumentsRequest(**fields), metadata=caller)  # type: ignore[arg-type]

    every = await listing()
    assert [d.path for d in every.documents] == [
        "docs/guide.md",
        *(f"lib/m{i}.py" for i in range(6)),
        "notes.txt",
    ]
    assert all(not d.text for d in every.documents)  # BASIC by default
    assert every.documents[0].repository_name == "octo/hello"
    assert [
        d.path for d in (await listing(repository_id=str(repo), path_prefix="lib/", tag="even")).documents
    ] == [
        "lib/m0.py",
        "lib/m2.py",
        "lib/m4.py",
    ]
    assert [d.path for d in (await listing(language="markdown")).documents] == ["docs/guide.md"]
    full = await listing(path_prefix="notes", view=ingest_pb2.DOCUMENT_VIEW_FULL)
    assert full.documents[0].text == "pushed\n"

    masked = await listing(
        path_prefix="lib/m1", read_mask=field_mask_pb2.FieldMask(paths=["path", "content_hash"])
    )
    assert masked.documents[0] == document_pb2.Document(
        path="lib/m1.py", content_hash=written.results[1].content_hash
    )
    await _refused(
        listing(read_mask=field_mask_pb2.FieldMask(paths=["path", "secret"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "READ_MASK_INVALID",
    )

    # Pages of two while others write before and after the cursor: no repeats, nothing skipped.
    seen: list[str] = []
    page = await listing(page_size=2, path_prefix="lib/")
    while True:
        seen.extend(d.path for d in page.documents)
        await stub.UpsertDocuments(
            ingest_pb2.UpsertDocumentsRequest(
                documents=[_doc(f"lib/a{len(seen)}.py"), _doc(f"lib/z{len(seen)}.py")]
            ),
            metadata=caller,
        )
        if not page.next_page_token:
            break
        page = await listing(page_size=2, path_prefix="lib/", page_token=page.next_page_token)
    originals = [f"lib/m{i}.py" for i in range(6)]
    assert [p for p in seen if p.startswith("lib/m")] == originals
    assert len(seen) == len(set(seen))
    token = (await listing(page_size=2, path_prefix="lib/")).next_page_token
    await _refused(
        listing(page_size=2, path_prefix="docs/", page_token=token),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
    await _refused(listing(page_token="garbage!"), grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID")

    basic = await stub.GetDocument(
        ingest_pb2.GetDocumentRequest(id=ids["notes.txt"], view=ingest_pb2.DOCUMENT_VIEW_BASIC),
        metadata=caller,
    )
    assert basic.path == "notes.txt" and not basic.text and basic.size == len("pushed\n")

    deleted = await stub.DeleteDocument(
        ingest_pb2.DeleteDocumentRequest(id=ids["notes.txt"]), metadata=caller
    )
    assert deleted.revision > written.revision
    tombstone = await pool.fetchrow(
        "select op, path from public.document_changes where revision = $1", deleted.revision
    )
    assert tombstone is not None and (tombstone["op"], tombstone["path"]) == ("delete", "notes.txt")
    gone = await stub.GetDocument(ingest_pb2.GetDocumentRequest(id=ids["notes.txt"]), metadata=caller)
    assert (
        gone.index_state == document_pb2.Document.DELETED and gone.HasField("delete_time") and not gone.text
    )
    assert "notes.txt" not in [d.path for d in (await listing()).documents]
    assert "notes.txt" in [d.path for d in (await listing(show_deleted=True)).documents]
    await _refused(
        stub.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=ids["notes.txt"]), metadata=caller),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    await _refused(
        stub.GetDocument(ingest_pb2.GetDocumentRequest(id="not-a-uuid"), metadata=caller),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_tenants_cannot_reach_each_others_documents_over_grpc(
    ingest_server: IngestServer,
    pool: asyncpg.Pool,
    user_factory: UserFactory,
    repository_factory: RepositoryFactory,
) -> None:
    alice, bob = await user_factory(), await user_factory()
    alice_repo = await repository_factory(alice)
    stub = ingest_server.stub()
    mine = await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(
            documents=[_doc("secret.py", "KEY = 1\n", repository_id=str(alice_repo))]
        ),
        metadata=ingest_server.caller(alice),
    )
    doc_id = mine.results[0].id
    as_bob = ingest_server.caller(bob)
    await _refused(
        stub.GetDocument(ingest_pb2.GetDocumentRequest(id=doc_id), metadata=as_bob),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    await _refused(
        stub.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=doc_id), metadata=as_bob),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    listed = await stub.ListDocuments(ingest_pb2.ListDocumentsRequest(show_deleted=True), metadata=as_bob)
    assert list(listed.documents) == []
    by_repo = await stub.ListDocuments(
        ingest_pb2.ListDocumentsRequest(repository_id=str(alice_repo)), metadata=as_bob
    )
    assert list(by_repo.documents) == []
    # Writing into Alice's repository, or over her path, never touches her document.
    into = await stub.UpsertDocuments(
        ingest_pb2.UpsertDocumentsRequest(
            documents=[_doc("secret.py", "stolen\n", repository_id=str(alice_repo))]
        ),
        metadata=as_bob,
    )
    assert [(v.field, v.reason) for v in into.results[0].field_violations] == [
        ("documents[0].repository_id", "REPOSITORY_NOT_FOUND")
    ]
    assert await _count(pool, bob) == 0
    row = await pool.fetchrow(
        "select content, deleted_at, revision from public.documents where id = $1", uuid.UUID(doc_id)
    )
    assert row is not None and row["content"] == "KEY = 1\n" and row["deleted_at"] is None
    assert row["revision"] == mine.results[0].revision

    # A read-only caller cannot write or delete; a caller with no tenant cannot use documents at all.
    reader = ingest_server.caller(alice, permissions=("read",))
    await _refused(
        stub.UpsertDocuments(ingest_pb2.UpsertDocumentsRequest(documents=[_doc("r.py")]), metadata=reader),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_PERMISSION",
    )
    await _refused(
        stub.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=doc_id), metadata=reader),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_PERMISSION",
    )
    assert (
        await stub.GetDocument(ingest_pb2.GetDocumentRequest(id=doc_id), metadata=reader)
    ).path == "secret.py"
    await _refused(
        # A service-role identity acting for nobody: no tenant to list for.
        stub.ListDocuments(
            ingest_pb2.ListDocumentsRequest(), metadata=caller_metadata(None, ("read",), "service")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "TENANT_REQUIRED",
    )
