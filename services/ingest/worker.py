"""The indexing worker: claims jobs from the queue and brings repositories to their newest head.

A `Worker` runs `concurrency` jobs at once in one process: inside the ingest service
(KOTADB_INGEST_WORKERS) or alone (`kotadb serve ingest-worker`), any number of them on any
number of machines against the same database; the queue (services/ingest/queue.py) makes each
claim exclusive and rescues the jobs of workers that died once their lease runs out.

One job (`Sync.run`):

1. `fetching`: the repository's record and access token (services/ingest/repositories.py),
   then `git fetch` of its branch into this machine's checkout (services/ingest/gitfetch.py).
2. `diffing`: an incremental job diffs the last synced commit against the new head (renames
   included); when that commit is missing or not an ancestor of the head (force push, rebase),
   or the job asks for it, the sync is full: the whole tree is walked (services/ingest/walk.py)
   and documents whose paths no longer exist are deleted.
3. `progress`: files are read (no symlinks followed, binary/non-UTF-8/oversize skipped with a
   reason recorded on the job) and written in batches through `DocumentWriter.upsert`, the
   same code path as UpsertDocuments, each batch in one transaction that first checks this
   worker still holds the lease (so a worker that lost its job cannot write over its
   successor) and whether a cancel was requested (the checkpoint).
4. `finished`: the repository's last synced commit, the job's end, and its indexing volume in
   `token_usage`, in one transaction.

Running a job twice leaves the same documents: unchanged files are no-ops, and the last synced
commit moves only when everything before it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from services.common import db
from services.common.db import Connection
from services.common.errors import Aborted, DeadlineExceeded, KotaError, Unavailable
from services.ingest import events, gitfetch, queue, walk
from services.ingest.config import IngestSettings
from services.ingest.documents import DocumentInput, DocumentWriter
from services.ingest.repositories import decrypt_access_token, repository_for_worker
from services.ingest.secretbox import SecretBox
from services.ingest.urlpolicy import check_url

log = logging.getLogger("kotadb.ingest.worker")

# Seconds between prunes of finished jobs by one worker process.
PRUNE_EVERY = 600.0
# token_usage unit: one indexing token per started KiB of document content written.
TOKEN_BYTES = 1024
_RETRYABLE = (Unavailable, Aborted, DeadlineExceeded)


@dataclasses.dataclass(frozen=True)
class SyncSource:
    """SyncSource is what a sync needs to know about its repository (the token never printed)."""

    repository_id: uuid.UUID
    user_id: uuid.UUID
    url: str
    branch: str
    last_synced_commit: str | None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_file_bytes: int | None = None
    token: str | None = dataclasses.field(default=None, repr=False)


SourceLoader = Callable[[Connection, uuid.UUID], Awaitable[SyncSource]]


def source_loader(settings: IngestSettings) -> SourceLoader:
    """source_loader reads a repository for a sync (services/ingest/repositories.py), token opened."""

    async def load(conn: Connection, repository_id: uuid.UUID) -> SyncSource:
        record = await repository_for_worker(conn, repository_id)
        token = None
        if record.has_access_token:
            token = decrypt_access_token(record, box=SecretBox.from_settings(settings))
        return SyncSource(
            repository_id=record.id,
            user_id=record.user_id,
            url=record.url,
            branch=record.branch,
            last_synced_commit=record.last_synced_commit,
            include=tuple(record.include_globs),
            exclude=tuple(record.exclude_globs),
            max_file_bytes=record.max_file_bytes or None,
            token=token,
        )

    return load


class JobCancelled(Exception):
    """JobCancelled stops a sync at a checkpoint after CancelJob."""


def new_worker_id() -> str:
    """new_worker_id names one worker process: host, pid and a random suffix."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Worker claims and runs jobs, `concurrency` at a time, until stopped."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        settings: IngestSettings,
        writer: DocumentWriter,
        wakeups: events.Wakeups,
        load_source: SourceLoader,
        *,
        concurrency: int,
        worker_id: str | None = None,
    ) -> None:
        self._pool = pool
        self.settings = settings
        self.writer = writer
        self.wakeups = wakeups
        self.load_source = load_source
        self.concurrency = concurrency
        self.worker_id = worker_id or new_worker_id()
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.processed = 0

    @property
    def pool(self) -> asyncpg.Pool:
        """pool is the database pool (Unavailable until the service has connected it)."""
        return self._pool()

    def start(self) -> None:
        """start launches the claim loop (idempotent); it waits for the database by itself."""
        if self._loop_task is None and self.concurrency > 0:
            self._loop_task = asyncio.create_task(self._claim_loop(), name=f"ingest-worker-{self.worker_id}")

    async def stop(self, grace: float) -> None:
        """stop claims nothing more and gives running jobs `grace` seconds before cancelling them.

        A cancelled job keeps its lease until it expires, then another worker claims it again.
        """
        self._stopping = True
        self.wakeups.nudge()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _claim_loop(self) -> None:
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            free = self.concurrency - len(self._running)
            claimed: list[queue.JobRecord] = []
            try:
                pool = self.pool
                if free > 0:
                    async with db.as_service(pool) as conn:
                        claimed = await queue.claim(
                            conn, self.worker_id, limit=free, lease=self.settings.job_lease
                        )
                if loop.time() - last_prune > PRUNE_EVERY:
                    last_prune = loop.time()
                    async with db.as_service(pool) as conn:
                        await queue.prune(conn, retention=self.settings.retention)
                    await self.prune_checkouts()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claim failed", extra={"fields": {"error": type(exc).__name__}})
            for job in claimed:
                task = asyncio.create_task(self._run(job), name=f"ingest-job-{job.id}")
                self._running[job.id] = task
            if claimed and len(claimed) == free:
                continue  # there may be more; a full round costs one query
            await self.wakeups.wait_jobs()

    async def prune_checkouts(self) -> int:
        """prune_checkouts removes this machine's checkouts of repositories that no longer exist.

        Returns how many were removed. A checkout in use is locked and left for the next round.
        """
        root = gitfetch.work_dir(self.settings.work_dir)
        names = await asyncio.to_thread(
            lambda: sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        )
        ids = []
        for name in names:
            with contextlib.suppress(ValueError):
                ids.append(uuid.UUID(name))
        if not ids:
            return 0
        async with db.as_service(self.pool) as conn:
            rows = await conn.fetch("select id from public.repositories where id = any($1::uuid[])", ids)
        gone = set(ids) - {row["id"] for row in rows}
        removed = 0
        for repository_id in sorted(gone):
            directory = root / str(repository_id)
            try:
                async with gitfetch.locked(directory):
                    await asyncio.to_thread(shutil.rmtree, directory, True)
                removed += 1
            except gitfetch.GitError:
                continue  # busy: a job still holds it
            directory.with_name(directory.name + ".lock").unlink(missing_ok=True)
        return removed

    async def _run(self, job: queue.JobRecord) -> None:
        sync = Sync(self, job)
        try:
            await sync.run()
        finally:
            self._running.pop(job.id, None)
            self.processed += 1
            self.wakeups.nudge()


class Sync:
    """Sync is one attempt at one job, with its heartbeat, progress and skip records."""

    def __init__(self, worker: Worker, job: queue.JobRecord) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.job = job
        self.progress: dict[str, Any] = {
            "files_total": 0,
            "files_processed": 0,
            "files_indexed": 0,
            "files_skipped": 0,
            "files_deleted": 0,
            "bytes_processed": 0,
            "symbols_extracted": 0,
            "skipped_by_reason": {},
        }
        self.pending_skips: list[dict[str, str]] = []
        self.recorded_skips = 0
        self.bytes_written = 0
        self.cancel_requested = job.cancel_requested_at is not None
        self.lease_lost = False

    @property
    def pool(self) -> asyncpg.Pool:
        """pool is the worker's database pool."""
        return self.worker.pool

    async def run(self) -> None:
        """run processes the job and records how it ended: succeeded, retrying, failed or cancelled."""
        body = asyncio.create_task(self._process())
        beat = asyncio.create_task(self._heartbeat(body))
        worker_id = self.worker.worker_id
        try:
            await body
        except (queue.LeaseLost, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not self.lease_lost:
                raise
            log.warning("lease lost", extra={"fields": {"job_id": str(self.job.id)}})
        except JobCancelled:
            async with db.as_service(self.pool) as conn:
                await queue.cancelled(conn, self.job, worker_id, progress=self.progress)
        except Exception as exc:
            retryable = isinstance(exc, _RETRYABLE) or not isinstance(exc, KotaError)
            log.warning(
                "job attempt failed",
                extra={"fields": {"job_id": str(self.job.id), "error": queue.error_document(exc)}},
            )
            try:
                async with db.as_service(self.pool) as conn:
                    await self._flush_skips(conn)
                    failed = await queue.fail(
                        conn,
                        self.job,
                        worker_id,
                        exc,
                        retryable=retryable,
                        base=self.settings.retry_base,
                        cap=self.settings.retry_max,
                        progress=self.progress,
                    )
                    if failed is not None and failed.state == "failed" and self.job.repository_id:
                        await conn.execute(
                            "update public.repositories set state = 'error', error = $2::jsonb where id = $1",
                            self.job.repository_id,
                            json.dumps(failed.error),
                        )
            except Exception as record_exc:
                # The lease runs out and another attempt starts; nothing else to do from here.
                log.warning(
                    "could not record the failed attempt",
                    extra={"fields": {"job_id": str(self.job.id), "error": type(record_exc).__name__}},
                )
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self, body: asyncio.Task[None]) -> None:
        interval = self.settings.job_lease / 3.0
        while not body.done():
            await asyncio.sleep(interval)
            try:
                async with db.as_service(self.pool) as conn:
                    lease = await queue.heartbeat(
                        conn, self.job.id, self.worker.worker_id, lease=self.settings.job_lease
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # the next beat retries; the lease has two more thirds to go
            if not lease.held:
                self.lease_lost = True
                body.cancel()
                return
            self.cancel_requested = self.cancel_requested or lease.cancel_requested

    async def _event(self, kind: str, message: str) -> None:
        async with db.as_service(self.pool) as conn:
            lease = await queue.fence(
                conn,
                self.job.id,
                self.worker.worker_id,
                lease=self.settings.job_lease,
                progress=self.progress,
            )
            self._checkpoint(lease)
            await events.append_event(
                conn, self.job.id, kind, "running", message, progress=self._public_progress()
            )

    def _checkpoint(self, lease: queue.Lease) -> None:
        if lease.cancel_requested or self.cancel_requested:
            raise JobCancelled()

    def _public_progress(self) -> dict[str, Any]:
        return {k: v for k, v in self.progress.items() if k != "skipped_by_reason"}

    async def _process(self) -> None:
        job = self.job
        if job.repository_id is None:
            raise KotaError(
                f"job kind {job.kind!r} without a repository is not supported", reason="JOB_KIND_UNSUPPORTED"
            )
        async with db.as_service(self.pool) as conn:
            source = await self.worker.load_source(conn, job.repository_id)
            await conn.execute(
                "update public.repositories set state = 'syncing' where id = $1 and state <> 'deleting'",
                source.repository_id,
            )
        if job.kind == "delete":
            await self._delete_everything(source)
            return
        rules = walk.rules_for(
            max_file_bytes=min(
                source.max_file_bytes or self.settings.sync_max_file_bytes, self.settings.max_document_bytes
            ),
            skip_dirs=walk.split_dirs(self.settings.skip_dirs),
            include=source.include,
            exclude=source.exclude,
        )
        await self._event("fetching", f"fetching branch {source.branch or '(the remote default)'}")
        # Checked again at every fetch: a host's DNS may point somewhere else since it was registered.
        checked = await check_url(source.url, allow_local=self.settings.allow_local_urls)
        https = checked.kind == "https" and checked.addresses
        directory = gitfetch.work_dir(self.settings.work_dir) / str(source.repository_id)
        repo = gitfetch.GitRepository(
            directory,
            url=source.url,
            timeout=self.settings.git_timeout,
            allow_local=self.settings.allow_local_urls,
            pinned=(checked.host, checked.port, checked.addresses) if https else None,
        )
        async with gitfetch.locked(directory):
            branch = source.branch or await repo.remote_default_branch(token=source.token)
            head = await repo.fetch(branch, token=source.token)
            target = head
            wanted = str(job.params.get("commit_sha") or "")
            if job.kind in ("sync", "reindex") and wanted:
                if not await repo.has_commit(wanted):
                    raise KotaError(
                        f"commit {wanted[:12]} is not on branch {branch}", reason="COMMIT_NOT_FOUND"
                    )
                target = wanted
            old = source.last_synced_commit
            full = job.kind in ("sync", "reindex") or not old
            if not full and old and not (await repo.has_commit(old) and await repo.is_ancestor(old, target)):
                full = True
            mode = "full" if full else f"incremental from {old[:12] if old else ''}"
            await self._event("diffing", f"{mode} sync to {target[:12]}")
            await repo.checkout(target, token=source.token)
            if full:
                await self._full(source, directory, rules)
            else:
                assert old is not None
                await self._incremental(source, directory, rules, await repo.diff(old, target))
        await self._finish(source, branch, target, mode)

    async def _full(self, source: SyncSource, directory: Path, rules: walk.WalkRules) -> None:
        found = await asyncio.to_thread(lambda: list(walk.walk(directory, rules)))
        async with db.as_service(self.pool) as conn:
            existing = await self.worker.writer.existing_hashes(conn, source.user_id, source.repository_id)
        files = [entry.path for entry in found if isinstance(entry, walk.FileEntry)]
        for skip in found:
            if isinstance(skip, walk.Skip):
                self._skip(skip)
        kept = await self._write(source, directory, rules, files, existing)
        await self._delete(source, sorted(set(existing) - kept))

    async def _incremental(
        self, source: SyncSource, directory: Path, rules: walk.WalkRules, changes: Sequence[gitfetch.Change]
    ) -> None:
        upserts = sorted({c.path for c in changes if c.status != "D"})
        removed = {c.path for c in changes if c.status == "D"} | {
            c.old_path for c in changes if c.status == "R" and c.old_path
        }
        kept = await self._write(source, directory, rules, upserts, {})
        # A changed path that is now skipped (became binary, too large, excluded) goes too.
        await self._delete(source, sorted((removed | set(upserts)) - kept))

    async def _write(
        self,
        source: SyncSource,
        directory: Path,
        rules: walk.WalkRules,
        paths: Sequence[str],
        existing: dict[str, str],
    ) -> set[str]:
        """_write reads and writes `paths` in batches; returns the paths that are now documents."""
        self.progress["files_total"] += len(paths)
        kept: set[str] = set()
        batch: list[DocumentInput] = []
        batch_bytes = 0
        for path in paths:
            content = await asyncio.to_thread(walk.read_file, directory, path, rules)
            self.progress["files_processed"] += 1
            if isinstance(content, walk.Skip):
                self._skip(content)
                continue
            self.progress["bytes_processed"] += len(content)
            kept.add(path)
            if existing.get(path) == hashlib.sha256(content).hexdigest():
                continue  # unchanged: nothing to write
            batch.append(DocumentInput(path=path, content=content, repository_id=source.repository_id))
            batch_bytes += len(content)
            if len(batch) >= self.settings.sync_batch_files or batch_bytes >= self.settings.sync_batch_bytes:
                kept -= await self._commit_batch(source, batch)
                batch, batch_bytes = [], 0
        if batch:
            kept -= await self._commit_batch(source, batch)
        return kept

    async def _commit_batch(self, source: SyncSource, batch: Sequence[DocumentInput]) -> set[str]:
        """_commit_batch writes one batch with the job's bookkeeping; returns the paths refused."""
        refused: set[str] = set()
        prepared = await self.worker.writer.prepare(batch)  # symbols, before the transaction opens
        async with db.as_service(self.pool) as conn:
            lease = await queue.fence(conn, self.job.id, self.worker.worker_id, lease=self.settings.job_lease)
            self._checkpoint(lease)
            outcome = await self.worker.writer.write(conn, source.user_id, prepared)
            written: list[uuid.UUID] = []
            for item, result in zip(batch, outcome.results, strict=True):
                if result.rejected:
                    refused.add(item.path)
                    detail = "; ".join(v.description for v in result.violations)
                    self._skip(walk.Skip(item.path, "rejected", detail))
                else:
                    self.progress["files_indexed"] += 1
                    if not result.unchanged and result.id is not None:
                        self.bytes_written += item.content_size()
                        written.append(result.id)
            if written:
                self.progress["symbols_extracted"] += await conn.fetchval(
                    "select count(*) from public.symbols where document_id = any($1::uuid[])", written
                )
            await self._flush_skips(conn)
            await queue.fence(
                conn,
                self.job.id,
                self.worker.worker_id,
                lease=self.settings.job_lease,
                progress=self.progress,
            )
            await events.append_event(
                conn,
                self.job.id,
                "progress",
                "running",
                f"{self.progress['files_processed']}/{self.progress['files_total']} files",
                progress=self._public_progress(),
            )
        prepared.timer.record()  # the batch's phases (services/ingest/batchtiming.py); no commit phase
        return refused

    async def _delete(self, source: SyncSource, paths: Sequence[str]) -> None:
        step = self.settings.sync_batch_files
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            async with db.as_service(self.pool) as conn:
                lease = await queue.fence(
                    conn, self.job.id, self.worker.worker_id, lease=self.settings.job_lease
                )
                self._checkpoint(lease)
                before = await conn.fetchval(
                    "select count(*) from public.documents where user_id = $1 and repository_id = $2"
                    " and path = any($3::text[]) and deleted_at is null",
                    source.user_id,
                    source.repository_id,
                    list(chunk),
                )
                await self.worker.writer.delete_paths(conn, source.user_id, source.repository_id, chunk)
                self.progress["files_deleted"] += int(before)
                await queue.fence(
                    conn,
                    self.job.id,
                    self.worker.worker_id,
                    lease=self.settings.job_lease,
                    progress=self.progress,
                )

    async def _delete_everything(self, source: SyncSource) -> None:
        async with db.as_service(self.pool) as conn:
            existing = await self.worker.writer.existing_hashes(conn, source.user_id, source.repository_id)
        await self._delete(source, sorted(existing))
        async with db.as_service(self.pool) as conn:
            await queue.succeed(
                conn,
                self.job,
                self.worker.worker_id,
                progress=self._public_progress(),
                message="repository documents deleted",
            )

    def _skip(self, skip: walk.Skip) -> None:
        self.progress["files_skipped"] += 1
        reasons = self.progress["skipped_by_reason"]
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
        if self.recorded_skips + len(self.pending_skips) < self.settings.max_recorded_skips:
            self.pending_skips.append(skip.to_json())

    async def _flush_skips(self, conn: Connection) -> None:
        if self.pending_skips:
            await queue.record_skips(
                conn, self.job.id, self.pending_skips, cap=self.settings.max_recorded_skips
            )
            self.recorded_skips += len(self.pending_skips)
            self.pending_skips = []

    async def _finish(self, source: SyncSource, branch: str, commit: str, mode: str) -> None:
        async with db.as_service(self.pool) as conn:
            lease = await queue.fence(conn, self.job.id, self.worker.worker_id, lease=self.settings.job_lease)
            self._checkpoint(lease)
            await self._flush_skips(conn)
            await conn.execute(
                "update public.repositories set last_synced_commit = $2, last_synced_at = now(),"
                " default_branch = $3, state = case when state = 'deleting' then state else 'ready' end,"
                " error = null where id = $1",
                source.repository_id,
                commit,
                branch,
            )
            tokens = -(-self.bytes_written // TOKEN_BYTES)
            if tokens:
                await conn.execute(
                    "insert into public.token_usage (user_id, key_id, tokens, purpose)"
                    " values ($1, $2, $3, 'indexing')",
                    source.user_id,
                    self.job.key_id,
                    tokens,
                )
            self.progress["indexing_tokens"] = tokens
            await queue.succeed(
                conn,
                dataclasses.replace(self.job, params={**self.job.params, "commit_sha": commit}),
                self.worker.worker_id,
                progress={**self.progress, "commit_sha": commit},
                message=f"{mode} sync to {commit[:12]} finished",
            )
