"""The sync worker on real git repositories and real PostgreSQL, in polling mode (no LISTEN)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.common import db
from services.ingest import gitfetch, queue
from services.ingest.documents import DocumentWriter
from services.ingest.worker import Worker
from tests.conftest import UserFactory
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


@dataclass
class Sync:
    """Sync is one test's setup: a git repository to sync, its owner, and a worker to run.

    The queue is cleaned first (jobs other tests left runnable are ended), so the worker sees
    only this test's jobs; checkouts go to `work`.
    """

    pool: asyncpg.Pool
    database_url: str
    writer: DocumentWriter
    repo: SourceRepo
    user: uuid.UUID
    work: Path

    async def repository(self, url: str | None = None, *, token: str | None = None) -> uuid.UUID:
        """repository registers a repository of this user (by default `repo`) and returns its id."""
        return await make_repository(self.pool, self.user, url or self.repo.url, token=token)

    async def enqueue(self, repository_id: uuid.UUID, kind: str = "sync", **params: Any) -> queue.JobRecord:
        """enqueue queues (or folds) a job for `repository_id`."""
        return await enqueue(self.pool, self.user, repository_id, kind, **params)

    async def run(self, repository_id: uuid.UUID, kind: str = "sync", **params: Any) -> queue.JobRecord:
        """run queues a job and waits until it ends (a worker must be running)."""
        return await wait_job(self.pool, (await self.enqueue(repository_id, kind, **params)).id)

    def worker(self, **overrides: Any) -> AbstractAsyncContextManager[Worker]:
        """worker runs a worker with the test settings and `overrides` for the block."""
        return running_worker(
            self.pool, worker_settings(self.database_url, self.work, **overrides), self.writer
        )


@pytest.fixture
async def sync(
    pool: asyncpg.Pool,
    database_url: str,
    user_factory: UserFactory,
    document_writer: DocumentWriter,
    tmp_path: Path,
) -> Sync:
    """sync is this test's Sync, on a fresh queue, with its repository under tmp_path/src."""
    await clean_queue(pool)
    user = await user_factory()
    return Sync(pool, database_url, document_writer, SourceRepo(tmp_path / "src"), user, tmp_path / "work")


def _base_tree(repo: SourceRepo) -> None:
    repo.write("src/app.py", APP_PY)
    repo.write("src/util.go", UTIL_GO)
    repo.write("README.md", "# demo\n")
    repo.write("lib/a.py", "A = 1\n")
    repo.write("lib/b.py", "B = 2\n")


async def test_full_sync_indexes_the_tree_and_records_every_skip(
    sync: Sync,
) -> None:
    repo, pool = sync.repo, sync.pool
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
    repository_id = await sync.repository()
    job = await sync.enqueue(repository_id, "sync")
    async with sync.worker():
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
        "select sum(tokens) from public.token_usage where user_id = $1 and purpose = 'indexing'", sync.user
    )
    expected_bytes = sum(len(repo.tree()[p]) for p in docs)
    assert usage == -(-expected_bytes // 1024)


async def test_incremental_sync_changes_only_the_pushed_paths_and_force_push_resyncs(
    sync: Sync,
) -> None:
    repo, pool = sync.repo, sync.pool
    _base_tree(repo)
    first = repo.commit("first")
    repository_id = await sync.repository()
    async with sync.worker():
        assert (await sync.run(repository_id, "sync")).state == "succeeded"
        before = await live_documents(pool, repository_id)
        high_water = await pool.fetchval("select max(revision) from public.document_changes")
        # One commit that adds, modifies, renames and removes files.
        repo.write("new.py", "def fresh():\n    pass\n")
        repo.write("README.md", "# demo, edited\n")
        repo.git("mv", "src/util.go", "src/utils.go")
        repo.git("rm", "--quiet", "src/app.py")
        second = repo.commit("second")
        job = await sync.enqueue(repository_id, "webhook_push", commit_sha=second)
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
        forced = await sync.run(repository_id, "webhook_push")
        assert forced.state == "succeeded", forced.error
        diffing = await pool.fetchval(
            "select message from public.indexing_job_events where job_id = $1 and kind = 'diffing'", forced.id
        )
        assert diffing.startswith("full sync")
        # The end state equals a fresh sync of the same head into a new repository record.
        fresh_id = await sync.repository(repo.url)
        fresh = await sync.run(fresh_id, "sync")
        assert fresh.progress["commit_sha"] == forced.progress["commit_sha"] == rewritten
    forced_docs = {p: h for p, (h, _) in (await live_documents(pool, repository_id)).items()}
    fresh_docs = {p: h for p, (h, _) in (await live_documents(pool, fresh_id)).items()}
    assert forced_docs == fresh_docs
    assert set(fresh_docs) == {"README.md", "lib/a.py", "lib/b.py", "other.txt", "src/app.py", "src/util.go"}


async def test_a_burst_of_pushes_is_one_job_and_a_rerun_changes_nothing(
    sync: Sync,
) -> None:
    repo, pool = sync.repo, sync.pool
    _base_tree(repo)
    repo.commit("first")
    repository_id = await sync.repository()
    jobs = set()
    for index in range(20):
        repo.write(f"burst/file{index}.py", f"N = {index}\n")
        if index % 3 == 0 and index:
            repo.git("rm", "--quiet", f"burst/file{index - 1}.py")
        jobs.add(
            (await sync.enqueue(repository_id, "webhook_push", commit_sha=repo.commit(f"push {index}"))).id
        )
    assert len(jobs) == 1
    async with sync.worker():
        done = await wait_job(pool, jobs.pop())
        assert done.state == "succeeded" and done.params["folded"] == 19
        docs = await live_documents(pool, repository_id)
        assert set(docs) == set(repo.tree())
        # Running the same sync again leaves every document as it was.
        again = await sync.run(repository_id, "sync")
        assert again.state == "succeeded"
    assert await live_documents(pool, repository_id) == docs
    assert await pool.fetchval(
        "select count(*) from public.documents where repository_id = $1", repository_id
    ) == len(docs)  # one row per path: nothing duplicated, and files removed within the burst never written


async def test_cancel_stops_a_running_sync_at_a_checkpoint(
    sync: Sync,
) -> None:
    repo, pool = sync.repo, sync.pool
    for index in range(150):
        repo.write(f"many/f{index:03}.py", f"def f{index}():\n    return {index}\n")
    repo.commit("many files")
    repository_id = await sync.repository()
    job = await sync.enqueue(repository_id, "sync")
    async with sync.worker(sync_batch_files=1):
        for _ in range(6000):  # until the first batch committed
            if "progress" in await event_kinds(pool, job.id):
                break
            await asyncio.sleep(0.02)
        async with db.as_service(pool) as conn:
            await queue.cancel(conn, job.id, user_id=sync.user)
        done = await wait_job(pool, job.id)
    assert done.state == "cancelled"
    assert 0 < done.progress["files_indexed"] < 150
    assert (await event_kinds(pool, job.id))[-2:] == ["cancel_requested", "cancelled"]
    assert (
        await pool.fetchval("select last_synced_commit from public.repositories where id = $1", repository_id)
        is None
    )


async def test_a_missing_remote_fails_after_its_attempts_with_the_error(
    sync: Sync,
) -> None:
    pool, token = sync.pool, "ghp_" + uuid.uuid4().hex
    repository_id = await sync.repository((sync.work.parent / "nowhere").as_uri(), token=token)
    job = await sync.enqueue(repository_id, "sync")
    await pool.execute("update public.indexing_jobs set max_attempts = 2 where id = $1", job.id)
    async with sync.worker():
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
    sync: Sync,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "ghp_" + uuid.uuid4().hex
    # The credential helper hands git the token from the environment when a remote asks for it.
    probe = gitfetch.GitRepository(tmp_path, url="", timeout=30, allow_local=False)
    _, answer = await probe.run(
        "credential", "fill", token=token, stdin=b"protocol=https\nhost=git.example.test\n\n"
    )
    assert f"password={token}".encode() in answer
    repo, pool = sync.repo, sync.pool
    for index in range(60):
        repo.write(f"pkg/m{index}.py", f"V = {index}\n" * 20)
    repo.commit("files")
    repository_id = await sync.repository(repo.url, token=token)
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
        async with sync.worker():
            done = await sync.run(repository_id, "sync")
            failing_id = await sync.repository((tmp_path / "gone").as_uri(), token=token)
            failing = await sync.enqueue(failing_id, "sync")
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
    sync: Sync,
) -> None:
    repo, pool = sync.repo, sync.pool
    _base_tree(repo)
    repo.commit("first")
    kept_id = await sync.repository(repo.url)
    dropped_id = await sync.repository(repo.url)
    async with sync.worker() as worker:
        for repository_id in (kept_id, dropped_id):
            assert (await sync.run(repository_id)).state == "succeeded"
        assert (sync.work / str(dropped_id)).is_dir()
        await pool.execute("delete from public.repositories where id = $1", dropped_id)
        assert await worker.prune_checkouts() == 1
    assert not (sync.work / str(dropped_id)).exists()
    assert (sync.work / str(kept_id) / ".git").is_dir()
