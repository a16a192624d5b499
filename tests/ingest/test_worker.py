"""The sync worker on real git repositories and real PostgreSQL, in polling mode (no LISTEN)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.common import db
from services.ingest import gitfetch, queue
from services.ingest.documents import DocumentWriter
from tests.ingest.jobhelpers import (
    SourceRepo,
    clean_queue,
    enqueue,
    event_kinds,
    live_documents,
    make_repository,
    running_worker,
    wait_job,
    worker_settings,
)

APP_PY = "def hello():\n    return 1\n\n\nclass Greeter:\n    def greet(self):\n        return 'hi'\n"
UTIL_GO = "package util\n\nfunc Add(a, b int) int { return a + b }\n"


@pytest.fixture
async def fresh_queue(pool: asyncpg.Pool) -> None:
    """fresh_queue ends jobs other tests left runnable, so this test's worker sees only its own."""
    await clean_queue(pool)


def _base_tree(repo: SourceRepo) -> None:
    repo.write("src/app.py", APP_PY)
    repo.write("src/util.go", UTIL_GO)
    repo.write("README.md", "# demo\n")
    repo.write("lib/a.py", "A = 1\n")
    repo.write("lib/b.py", "B = 2\n")


async def test_full_sync_indexes_the_tree_and_records_every_skip(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    repo = SourceRepo(tmp_path / "src")
    _base_tree(repo)
    repo.write("bin/blob.bin", b"\x7fELF\x00\x01\x02binary")
    repo.write("latin1.txt", b"caf\xe9 au lait\n")
    repo.write("huge.txt", "x" * 5000)  # over the test limit of 4096 bytes
    repo.write("node_modules/dep/index.js", "module.exports = 1;\n")
    repo.write("weird\\..\\name.py", "x = 1\n")
    repo.write("package-lock.json", "{}\n")
    repo.symlink("link_out", "/etc/passwd")
    repo.symlink("docs/link_in", "../src/app.py")
    head = repo.commit("first")
    user = await user_factory()
    repository_id = await make_repository(pool, user, repo.url)
    job = await enqueue(pool, user, repository_id, "sync")
    settings = worker_settings(database_url, tmp_path / "work")
    async with running_worker(pool, settings, document_writer):
        done = await wait_job(pool, job.id)
    assert done.state == "succeeded", done.error
    docs = await live_documents(pool, repository_id)
    assert set(docs) == {"src/app.py", "src/util.go", "README.md", "lib/a.py", "lib/b.py"}
    symbols = {
        row["name"]
        for row in await pool.fetch(
            "select s.name from public.symbols s join public.documents d on d.id = s.document_id"
            " where d.repository_id = $1 and d.path = 'src/app.py'",
            repository_id,
        )
    }
    assert {"hello", "Greeter", "greet"} <= symbols
    reasons = {skip["path"]: skip["reason"] for skip in done.skips}
    assert reasons == {
        "bin/blob.bin": "binary",
        "latin1.txt": "not_utf8",
        "huge.txt": "too_large",
        "node_modules/": "skipped_dir",
        "weird\\..\\name.py": "bad_path",
        "package-lock.json": "generated",
        "link_out": "symlink",
        "docs/link_in": "symlink",
    }
    assert done.progress["files_skipped"] == 8 and done.progress["files_indexed"] == 5
    assert done.progress["skipped_by_reason"]["symlink"] == 2
    assert done.progress["symbols_extracted"] == await pool.fetchval(
        "select count(*) from public.symbols s join public.documents d on d.id = s.document_id"
        " where d.repository_id = $1",
        repository_id,
    )
    assert done.progress["symbols_extracted"] >= 4
    assert done.progress["commit_sha"] == head
    row = await pool.fetchrow(
        "select last_synced_commit, state from public.repositories where id = $1", repository_id
    )
    assert row is not None and (row["last_synced_commit"], row["state"]) == (head, "ready")
    kinds = await event_kinds(pool, job.id)
    assert kinds[:4] == ["queued", "claimed", "fetching", "diffing"]
    assert kinds[-1] == "finished" and kinds.count("progress") >= 2  # 5 files in batches of 3
    usage = await pool.fetchval(
        "select sum(tokens) from public.token_usage where user_id = $1 and purpose = 'indexing'", user
    )
    expected_bytes = sum(len(repo.tree()[p]) for p in docs)
    assert usage == -(-expected_bytes // 1024)


async def test_incremental_sync_changes_only_the_pushed_paths_and_force_push_resyncs(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    repo = SourceRepo(tmp_path / "src")
    _base_tree(repo)
    first = repo.commit("first")
    user = await user_factory()
    repository_id = await make_repository(pool, user, repo.url)
    settings = worker_settings(database_url, tmp_path / "work")
    async with running_worker(pool, settings, document_writer):
        assert (
            await wait_job(pool, (await enqueue(pool, user, repository_id, "sync")).id)
        ).state == "succeeded"
        before = await live_documents(pool, repository_id)
        high_water = await pool.fetchval("select max(revision) from public.document_changes")
        # One commit that adds, modifies, renames and removes files.
        repo.write("new.py", "def fresh():\n    pass\n")
        repo.write("README.md", "# demo, edited\n")
        repo.git("mv", "src/util.go", "src/utils.go")
        repo.git("rm", "--quiet", "src/app.py")
        second = repo.commit("second")
        job = await enqueue(pool, user, repository_id, "webhook_push", commit_sha=second)
        done = await wait_job(pool, job.id)
        assert done.state == "succeeded", done.error
        after = await live_documents(pool, repository_id)
        assert set(after) == {"README.md", "lib/a.py", "lib/b.py", "new.py", "src/utils.go"}
        assert after["lib/a.py"] == before["lib/a.py"] and after["lib/b.py"] == before["lib/b.py"]
        changes = await pool.fetch(
            "select path, op from public.document_changes where repository_id = $1 and revision > $2",
            repository_id,
            high_water,
        )
        assert sorted((row["path"], row["op"]) for row in changes) == [
            ("README.md", "upsert"),
            ("new.py", "upsert"),
            ("src/app.py", "delete"),
            ("src/util.go", "delete"),
            ("src/utils.go", "upsert"),
        ]
        messages = await pool.fetch(
            "select message from public.indexing_job_events where job_id = $1 and kind = 'diffing'", job.id
        )
        assert messages[0]["message"].startswith(f"incremental from {first[:12]}")
        # A force push: the synced commit is no longer an ancestor of the head.
        repo.git("reset", "--quiet", "--hard", first)
        repo.write("lib/a.py", "A = 'rewritten'\n")
        repo.write("other.txt", "after the force push\n")
        rewritten = repo.commit("rewritten history")
        forced = await wait_job(pool, (await enqueue(pool, user, repository_id, "webhook_push")).id)
        assert forced.state == "succeeded", forced.error
        diffing = await pool.fetchval(
            "select message from public.indexing_job_events where job_id = $1 and kind = 'diffing'", forced.id
        )
        assert diffing.startswith("full sync")
        # The end state equals a fresh sync of the same head into a new repository record.
        fresh_id = await make_repository(pool, user, repo.url)
        fresh = await wait_job(pool, (await enqueue(pool, user, fresh_id, "sync")).id)
        assert fresh.progress["commit_sha"] == forced.progress["commit_sha"] == rewritten
    forced_docs = {p: h for p, (h, _) in (await live_documents(pool, repository_id)).items()}
    fresh_docs = {p: h for p, (h, _) in (await live_documents(pool, fresh_id)).items()}
    assert forced_docs == fresh_docs
    assert set(fresh_docs) == {"README.md", "lib/a.py", "lib/b.py", "other.txt", "src/app.py", "src/util.go"}


async def test_a_burst_of_pushes_is_one_job_and_a_rerun_changes_nothing(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    repo = SourceRepo(tmp_path / "src")
    _base_tree(repo)
    repo.commit("first")
    user = await user_factory()
    repository_id = await make_repository(pool, user, repo.url)
    jobs = set()
    for index in range(20):
        repo.write(f"burst/file{index}.py", f"N = {index}\n")
        if index % 3 == 0 and index:
            repo.git("rm", "--quiet", f"burst/file{index - 1}.py")
        jobs.add(
            (
                await enqueue(
                    pool, user, repository_id, "webhook_push", commit_sha=repo.commit(f"push {index}")
                )
            ).id
        )
    assert len(jobs) == 1
    settings = worker_settings(database_url, tmp_path / "work")
    async with running_worker(pool, settings, document_writer):
        done = await wait_job(pool, jobs.pop())
        assert done.state == "succeeded" and done.params["folded"] == 19
        docs = await live_documents(pool, repository_id)
        assert set(docs) == set(repo.tree())
        # Running the same sync again leaves every document as it was.
        again = await wait_job(pool, (await enqueue(pool, user, repository_id, "sync")).id)
        assert again.state == "succeeded"
    assert await live_documents(pool, repository_id) == docs
    assert await pool.fetchval(
        "select count(*) from public.documents where repository_id = $1", repository_id
    ) == len(docs)  # one row per path: nothing duplicated, and files removed within the burst never written


async def test_cancel_stops_a_running_sync_at_a_checkpoint(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    repo = SourceRepo(tmp_path / "src")
    for index in range(150):
        repo.write(f"many/f{index:03}.py", f"def f{index}():\n    return {index}\n")
    repo.commit("many files")
    user = await user_factory()
    repository_id = await make_repository(pool, user, repo.url)
    job = await enqueue(pool, user, repository_id, "sync")
    settings = worker_settings(database_url, tmp_path / "work", sync_batch_files=1)
    async with running_worker(pool, settings, document_writer):
        for _ in range(6000):  # until the first batch committed
            if "progress" in await event_kinds(pool, job.id):
                break
            await asyncio.sleep(0.02)
        async with db.as_service(pool) as conn:
            await queue.cancel(conn, job.id, user_id=user)
        done = await wait_job(pool, job.id)
    assert done.state == "cancelled"
    assert 0 < done.progress["files_indexed"] < 150
    assert (await event_kinds(pool, job.id))[-2:] == ["cancel_requested", "cancelled"]
    assert (
        await pool.fetchval("select last_synced_commit from public.repositories where id = $1", repository_id)
        is None
    )


async def test_a_missing_remote_fails_after_its_attempts_with_the_error(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    user = await user_factory()
    token = "ghp_" + uuid.uuid4().hex
    repository_id = await make_repository(pool, user, (tmp_path / "nowhere").as_uri(), token=token)
    job = await enqueue(pool, user, repository_id, "sync")
    await pool.execute("update public.indexing_jobs set max_attempts = 2 where id = $1", job.id)
    async with running_worker(pool, worker_settings(database_url, tmp_path / "work"), document_writer):
        done = await wait_job(pool, job.id)
    assert done.state == "failed" and done.attempt == 2
    assert (
        done.error is not None
        and done.error["code"] == "UNAVAILABLE"
        and "git fetch failed" in done.error["message"]
    )
    assert await event_kinds(pool, job.id) == [
        "queued",
        "claimed",
        "fetching",
        "retrying",
        "claimed",
        "fetching",
        "failed",
    ]
    assert (
        await pool.fetchval("select state from public.repositories where id = $1", repository_id) == "error"
    )


async def test_an_access_token_never_shows_in_command_lines_events_errors_or_logs(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "ghp_" + uuid.uuid4().hex
    # The credential helper hands git the token from the environment when a remote asks for it.
    probe = gitfetch.GitRepository(tmp_path, url="", timeout=30, allow_local=False)
    _, answer = await probe.run(
        "credential", "fill", token=token, stdin=b"protocol=https\nhost=git.example.test\n\n"
    )
    assert f"password={token}".encode() in answer
    repo = SourceRepo(tmp_path / "src")
    for index in range(60):
        repo.write(f"pkg/m{index}.py", f"V = {index}\n" * 20)
    repo.commit("files")
    user = await user_factory()
    repository_id = await make_repository(pool, user, repo.url, token=token)
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        own = str(os.getpid())
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == own:
                    continue
                try:
                    line = (
                        Path(f"/proc/{pid}/cmdline")
                        .read_bytes()
                        .replace(b"\x00", b" ")
                        .decode("utf-8", "replace")
                    )
                except OSError:
                    continue
                if "git" in line:
                    seen.append(line)

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    caplog.set_level(logging.DEBUG)
    try:
        async with running_worker(pool, worker_settings(database_url, tmp_path / "work"), document_writer):
            done = await wait_job(pool, (await enqueue(pool, user, repository_id, "sync")).id)
            failing_id = await make_repository(pool, user, (tmp_path / "gone").as_uri(), token=token)
            failing = await enqueue(pool, user, failing_id, "sync")
            await pool.execute("update public.indexing_jobs set max_attempts = 1 where id = $1", failing.id)
            failed = await wait_job(pool, failing.id)
    finally:
        stop.set()
        scanner.join()
    assert done.state == "succeeded" and failed.state == "failed"
    assert any(" fetch " in line for line in seen), "the scan saw no git process"
    assert not [line for line in seen if token in line]
    stored = await pool.fetch(
        "select j.error::text as error, j.progress::text as progress, j.params::text as params,"
        " e.message, e.data::text as data from public.indexing_jobs j"
        " join public.indexing_job_events e on e.job_id = j.id where j.id = any($1::uuid[])",
        [done.id, failed.id],
    )
    assert stored and not [row for row in stored if token in str(dict(row))]
    assert token not in caplog.text


async def test_https_fetches_connect_only_to_the_checked_addresses(tmp_path: Path) -> None:
    connections: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[0])
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        # The name does not resolve; git reaches the listener only through the pinned address.
        repo = gitfetch.GitRepository(
            tmp_path / "pinned",
            url=f"https://git.invalid.example:{port}/org/repo.git",
            timeout=30,
            allow_local=False,
            pinned=("git.invalid.example", port, ["127.0.0.1"]),
        )
        with pytest.raises(gitfetch.GitError):
            await repo.fetch("main", token=None)
    finally:
        listener.close()
        await listener.wait_closed()
    assert connections and set(connections) == {"127.0.0.1"}


async def test_checkouts_of_deleted_repositories_are_removed(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory,
    document_writer: DocumentWriter,
    tmp_path: Path,
    fresh_queue,
) -> None:
    repo = SourceRepo(tmp_path / "src")
    _base_tree(repo)
    repo.commit("first")
    user = await user_factory()
    kept_id = await make_repository(pool, user, repo.url)
    dropped_id = await make_repository(pool, user, repo.url)
    settings = worker_settings(database_url, tmp_path / "work")
    async with running_worker(pool, settings, document_writer) as worker:
        for repository_id in (kept_id, dropped_id):
            assert (await wait_job(pool, (await enqueue(pool, user, repository_id)).id)).state == "succeeded"
        assert (tmp_path / "work" / str(dropped_id)).is_dir()
        await pool.execute("delete from public.repositories where id = $1", dropped_id)
        assert await worker.prune_checkouts() == 1
    assert not (tmp_path / "work" / str(dropped_id)).exists()
    assert (tmp_path / "work" / str(kept_id) / ".git").is_dir()
