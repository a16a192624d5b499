"""Helpers of the job and worker tests: real git repositories, repository rows, workers, waiting.

* `SourceRepo` is a git repository in a temporary directory that the tests commit to, reached
  by workers through a `file://` URL (KOTADB_INGEST_ALLOW_LOCAL_URLS).
* `make_repository` inserts a repository row (as the database owner), optionally with an
  access token sealed the way services/ingest/repositories.py opens it.
* `running_worker` runs an in-process `Worker` in polling mode; `wait_job` waits for a job's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from services.ingest import events, queue
from services.ingest.config import IngestSettings
from services.ingest.documents import DocumentWriter
from services.ingest.repositories import secret_context
from services.ingest.secretbox import SecretBox, generate_key_spec
from services.ingest.worker import Worker, source_loader

SECRET_KEYS = generate_key_spec("test")
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.test",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.test",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


class SourceRepo:
    """SourceRepo is a git repository on branch main that tests write, commit and rewrite."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "--quiet", "--initial-branch=main")
        # Serve partial fetches as GitHub does, so workers fetch commits and trees first and the
        # blobs only when they check a commit out.
        self.git("config", "uploadpack.allowFilter", "true")
        self.git("config", "uploadpack.allowAnySHA1InWant", "true")

    @property
    def url(self) -> str:
        """url is the repository's file:// URL."""
        return self.path.resolve().as_uri()

    def git(self, *args: str) -> str:
        """git runs a git command in the repository and returns its output."""
        env = {**os.environ, **_GIT_ENV}
        done = subprocess.run(["git", *args], cwd=self.path, env=env, check=True, capture_output=True)
        return done.stdout.decode("utf-8", "replace").strip()

    def write(self, path: str, content: str | bytes) -> None:
        """write creates or replaces a file (parents included)."""
        target = self.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)

    def symlink(self, path: str, points_to: str) -> None:
        """symlink creates a symbolic link at `path` pointing at `points_to`."""
        target = self.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(points_to, target)

    def commit(self, message: str = "change") -> str:
        """commit stages everything and commits; returns the new head."""
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        """head is the sha of the branch head."""
        return self.git("rev-parse", "HEAD")

    def tree(self) -> dict[str, bytes]:
        """tree maps every regular file of the head commit to its content."""
        files: dict[str, bytes] = {}
        for path in self.git("ls-files").splitlines():
            full = self.path / path
            if full.is_file() and not full.is_symlink():
                files[path] = full.read_bytes()
        return files


async def make_repository(
    pool: asyncpg.Pool, user_id: uuid.UUID, url: str, *, token: str | None = None, branch: str = "main"
) -> uuid.UUID:
    """make_repository inserts a repository row for `user_id` and returns its id."""
    repository_id: uuid.UUID = await pool.fetchval(
        "insert into public.repositories (user_id, full_name, url, default_branch) values ($1, $2, $3, $4)"
        " returning id",
        user_id,
        f"org/repo-{secrets.token_hex(4)}",
        url,
        branch,
    )
    if token is not None:
        sealed = SecretBox.parse(SECRET_KEYS).encrypt(
            token.encode(), context=secret_context(repository_id, "access_token")
        )
        await pool.execute(
            "update public.repositories set access_token_encrypted = $2 where id = $1", repository_id, sealed
        )
    return repository_id


def worker_settings(database_url: str, work_dir: Path, **overrides: Any) -> IngestSettings:
    """worker_settings are settings for test workers: local URLs allowed, short polls and leases."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "work_dir": str(work_dir),
        "allow_local_urls": True,
        "poll_interval": 0.05,
        "job_lease": 6.0,
        "retry_base": 0.1,
        "retry_max": 0.5,
        "secret_keys": SECRET_KEYS,
        "sync_batch_files": 3,
        "sync_max_file_bytes": 4096,
        "symbol_workers": 1,
    }
    values.update(overrides)
    return IngestSettings(**values)


async def clean_queue(pool: asyncpg.Pool) -> None:
    """clean_queue ends every job left runnable by earlier tests, so workers see only this test's."""
    await pool.execute(
        "update public.indexing_jobs set state = 'cancelled', finished_at = now(), locked_by = null"
        " where state in ('queued', 'running')"
    )


@contextlib.asynccontextmanager
async def running_worker(
    pool: asyncpg.Pool, settings: IngestSettings, writer: DocumentWriter, *, concurrency: int = 1
) -> AsyncIterator[Worker]:
    """running_worker runs an in-process worker (polling, no LISTEN) for the block."""
    wakeups = events.Wakeups(settings.listen_database_url, poll_interval=settings.poll_interval)
    worker = Worker(lambda: pool, settings, writer, wakeups, source_loader(settings), concurrency=concurrency)
    wakeups.start()
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop(10.0)
        await wakeups.close()


async def enqueue(
    pool: asyncpg.Pool, user_id: uuid.UUID, repository_id: uuid.UUID, kind: str = "sync", **params: Any
) -> queue.JobRecord:
    """enqueue queues (or folds) a job as the service role."""
    from services.common import db

    async with db.as_service(pool) as conn:
        return await queue.enqueue(
            conn, user_id=user_id, repository_id=repository_id, kind=kind, params=params
        )


async def wait_job(pool: asyncpg.Pool, job_id: uuid.UUID, limit: float = 120.0) -> queue.JobRecord:
    """wait_job polls until the job is final and returns it (TimeoutError after `limit` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        row = await pool.fetchrow("select * from public.indexing_jobs where id = $1", job_id)
        assert row is not None
        job = queue.JobRecord.from_row(row)
        if job.final:
            return job
        if loop.time() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state} after {limit}s: {job.progress}")
        await asyncio.sleep(0.05)


async def live_documents(pool: asyncpg.Pool, repository_id: uuid.UUID) -> dict[str, tuple[str, int]]:
    """live_documents maps each live document path of a repository to (content_hash, revision)."""
    rows = await pool.fetch(
        "select path, content_hash, revision from public.documents"
        " where repository_id = $1 and deleted_at is null",
        repository_id,
    )
    return {row["path"]: (row["content_hash"], row["revision"]) for row in rows}


async def event_kinds(pool: asyncpg.Pool, job_id: uuid.UUID) -> list[str]:
    """event_kinds lists a job's event kinds in order."""
    rows = await pool.fetch(
        "select kind from public.indexing_job_events where job_id = $1 order by seq", job_id
    )
    return [row["kind"] for row in rows]
