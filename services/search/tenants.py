"""tenants holds the per-tenant indexes: opening, building, tailing, evicting and rebuilding them.

Each tenant has its own directory on the search volume (rebuild.py describes the layout), so a
query can only open its own tenant's segments; the tenant is always the verified caller's.
`TenantManager.get` opens a tenant's index, verifying its manifest and checksums the first
time this process opens it, and builds it from Postgres when it is missing, corrupt or of an
old format. At most `max_open_tenants` are open (least recently used closed first); a disk
budget deletes the least recently used closed tenants' directories, which are rebuilt on next
use. Open tenants are tailed (tailer.py); a reopened tenant catches up from its state file.

Engine work runs in two thread pools, never on the event loop: `search_threads` threads for
searches (verification releases the GIL in the engine's C extension) and two for index writes
(applying changes, merging, building), so searches, the tailer and health checks do not starve
each other.

The engine surface used by the service, all in this package: `engine.index.Index`,
`engine.writer.IndexWriter`, `engine.searcher.Searcher` / `SearchRequest`, `engine.model`
(`SourceDocument`, `Symbol`), `engine.results` (`SearchResult`, `SearchMode`, `LimitReason`),
`engine.symsearch` (`search_symbols`, `SymbolCandidate`), and the error tree `engine.errors`
that engine_errors.py maps; streams.py adds `Searcher.stream` (`engine.stream.MatchStream`),
`engine.searchrun.Run.check` and `engine.hits.file_match`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.common.errors import Unavailable
from services.search.config import SearchSettings
from services.search.engine.index.format import IndexFileError
from services.search.engine.index.index import Index, manifest_name
from services.search.engine.index.writer import IndexWriter
from services.search.engine.search.searcher import Searcher
from services.search.pins import PagePins, load_cursor_secret, tenant_cursor_key
from services.search.rebuild import (
    INDEX_DIR,
    Built,
    TenantState,
    build_tenant,
    clean_leftovers,
    source_document,
    swap_in,
)
from services.search.store import Change, SearchStore, Watermark
from services.search.tailer import RevisionRule, Tailer

log = logging.getLogger(__name__)

T = TypeVar("T")

READY, BUILDING, REBUILDING, ERROR = "READY", "BUILDING", "REBUILDING", "ERROR"
# Segments above which a tenant's writer merges after applying changes.
MERGE_ABOVE = 8
# Seconds a caller is told to wait before retrying a search whose tenant index is being built.
BUILD_RETRY_SECONDS = 2.0
# Seconds of a caller's budget kept back from waiting for an opening, to answer in time.
OPEN_RESERVE = 0.02
# What touching a tenant directory deleted or made unreadable under us raises (TenantManager.lost).
LOST_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, PermissionError)
# What makes a tenant's files unusable: a failed check, or a lost directory.
UNUSABLE_ERRORS: tuple[type[Exception], ...] = (IndexFileError, *LOST_ERRORS)


class TenantLostError(Exception):
    """TenantLostError reports that a tenant's directory could not be read or written (LOST_ERRORS)."""


@dataclass
class TenantIndex:
    """TenantIndex is one open tenant: its index, writer, searcher and how far it has caught up.

    `covered` is the revision up to which every change of the tenant is in the index
    (tailer.py); `applied` holds revisions above it already applied. `lock` serialises writes.
    """

    tenant: uuid.UUID
    key: int
    directory: Path
    index: Index
    writer: IndexWriter
    searcher: Searcher
    covered: int
    rebuilt_at: float
    applied: set[int]
    lock: asyncio.Lock
    advanced: asyncio.Event
    state: str = READY
    update_time: float | None = None
    message: str = ""

    def advance(self, revision: int) -> None:
        """advance raises the covered revision and wakes everyone waiting for it."""
        if revision > self.covered:
            self.covered = revision
            self.applied = {r for r in self.applied if r > revision}
        self.advanced.set()
        self.advanced = asyncio.Event()


class TenantManager:
    """TenantManager owns every open tenant index of this process and the tailer that feeds them."""

    def __init__(self, settings: SearchSettings, store: SearchStore) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir
        self.rule = RevisionRule()
        self.tailer = Tailer(
            store,
            self.rule,
            listen_url=settings.listen_url,
            poll_interval=settings.poll_interval,
            tenants=lambda: list(self._open),
            sync=self.sync,
        )
        self.search_pool = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="kotadb-search")
        self.write_pool = ThreadPoolExecutor(2, thread_name_prefix="kotadb-index-write")
        self._open: collections.OrderedDict[uuid.UUID, TenantIndex] = collections.OrderedDict()
        self._opening: dict[uuid.UUID, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._verified: set[uuid.UUID] = set()
        self._rebuilds: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._getting: dict[uuid.UUID, asyncio.Task[TenantIndex]] = {}
        self._startup: asyncio.Task[None] | None = None
        self._cursor_secret = b""
        self.pins = PagePins(ttl=settings.page_snapshot_ttl, per_tenant=settings.page_snapshots_per_tenant)
        """pins holds the snapshots that pages with a next page were computed on (pins.py)."""
        self._count_lock = threading.Lock()
        self.active_searches = 0
        """active_searches counts searches running in the search pool now."""
        self.cancelled_searches = 0
        """cancelled_searches counts searches whose caller went away while they ran."""

    # Lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """start prepares the volume, starts the tailer and reopens the tenants found on disk."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self._in(self.write_pool, clean_leftovers, self.data_dir)
        secret = self.settings.cursor_secret
        self._cursor_secret = await self._in(self.write_pool, load_cursor_secret, secret, self.data_dir)
        self.tailer.start()
        self._startup = asyncio.create_task(self._reopen_all(), name="search-startup")

    async def stop(self, _grace: float = 0.0) -> None:
        """stop ends the tailer, rebuilds and startup, then closes every tenant."""
        running = (self._startup, *self._rebuilds.values(), *self._getting.values())
        tasks = [t for t in running if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.tailer.stop()
        for tenant in list(self._open):
            await self._close(tenant)
        self.search_pool.shutdown(wait=False, cancel_futures=True)
        self.write_pool.shutdown(wait=True)

    async def _reopen_all(self) -> None:
        """_reopen_all checks and opens the tenants on disk, most recently used first, up to the cap."""
        found: list[tuple[float, uuid.UUID]] = []
        for entry in self.data_dir.iterdir():
            with contextlib.suppress(ValueError, OSError):
                tenant = uuid.UUID(entry.name)
                found.append(((entry / "state.json").stat().st_mtime, tenant))
        found.sort(reverse=True)
        for _, tenant in found[: self.settings.max_open_tenants]:
            while True:
                try:
                    await self.get(tenant)
                    break
                except Unavailable:
                    await asyncio.sleep(0.5)
                except Exception as exc:
                    log.warning("could not reopen tenant %s: %s", tenant, exc)
                    break

    # Opening ---------------------------------------------------------------------------------

    def rebuilding(self, tenant: uuid.UUID) -> bool:
        """rebuilding tells whether a rebuild of the tenant is running."""
        return tenant in self._rebuilds

    def is_open(self, tenant: uuid.UUID) -> bool:
        """is_open tells whether the tenant's index is open in this process."""
        return tenant in self._open

    async def get(self, tenant: uuid.UUID, deadline: float | None = None) -> TenantIndex:
        """get returns the tenant's open index, opening, verifying or building it first if needed.

        The opening runs as a task of its own that every caller waits for: a caller that goes
        away (a deadline, Envoy's route timeout) leaves it running, so a build longer than any
        one request (a large tenant) still finishes and the next request finds it open. A
        caller with a `deadline` (monotonic) waits for it until then only, and gets
        UNAVAILABLE (INDEX_BUILDING, with RetryInfo) instead of running out of time.
        """
        found = self._open.get(tenant)
        if found is not None:
            self._open.move_to_end(tenant)
            return found
        task = self._opening_task(tenant)
        if deadline is None:
            return await asyncio.shield(task)
        # asyncio.wait leaves the task running when the time is up or this caller is cancelled.
        await asyncio.wait((task,), timeout=max(0.0, deadline - time.monotonic() - OPEN_RESERVE))
        if task.done():
            return task.result()
        raise Unavailable(
            "the index of this tenant is being built (its first use on this replica, or a rebuild"
            " from Postgres); retry in a few seconds",
            reason="INDEX_BUILDING",
            retry_after=BUILD_RETRY_SECONDS,
        )

    def _opening_task(self, tenant: uuid.UUID) -> asyncio.Task[TenantIndex]:
        """_opening_task is the running opening of the tenant, started if there is none."""
        task = self._getting.get(tenant)
        if task is None:
            task = asyncio.create_task(self._get(tenant), name=f"search-open-{tenant}")
            self._getting[tenant] = task
            task.add_done_callback(lambda t: _retrieved(self._getting, tenant, t))
        return task

    async def _get(self, tenant: uuid.UUID) -> TenantIndex:
        async with self._opening[tenant]:
            found = self._open.get(tenant)
            if found is not None:
                return found
            opened = await self._open_or_build(tenant)
            self._open[tenant] = opened
            await self._evict_over_cap(keep=tenant)
        self.tailer.request(tenant)
        return opened

    async def _open_or_build(self, tenant: uuid.UUID) -> TenantIndex:
        directory = self.data_dir / str(tenant)
        state = TenantState.load(directory, tenant)
        if state is not None:
            try:
                return await self._open_dir(tenant, directory, state, verify=tenant not in self._verified)
            except UNUSABLE_ERRORS as exc:
                log.warning("index of tenant %s is unusable (%s); rebuilding from Postgres", tenant, exc)
        built = await self._build(tenant)
        mark = time.monotonic()
        await self._in(self.write_pool, swap_in, self.data_dir, tenant, built.path)
        opened = await self._open_dir(tenant, directory, built.state, verify=False)
        _log_serving(tenant, built, time.monotonic() - mark)
        await self._enforce_disk_budget(keep=tenant)
        return opened

    async def _build(self, tenant: uuid.UUID) -> Built:
        return await build_tenant(
            self.store.pool,
            self.rule,
            self.store,
            tenant,
            self.data_dir,
            self.write_pool,
            batch=self.settings.build_batch_rows,
            durable=self.settings.durable,
        )

    async def _open_dir(
        self, tenant: uuid.UUID, directory: Path, state: TenantState, *, verify: bool
    ) -> TenantIndex:
        durable = self.settings.durable

        def open_index() -> tuple[Index, IndexWriter]:
            index = Index.open(directory / INDEX_DIR, durable=durable)
            try:
                if verify:
                    with index.snapshot() as snap:
                        snap.verify()
                return index, IndexWriter(index)
            except BaseException:
                index.close()
                raise

        key = await self.store.tenant_key(tenant)
        index, writer = await self._in(self.write_pool, open_index)
        self._verified.add(tenant)
        searcher = Searcher(index, cursor_key=self.cursor_key(tenant))
        return TenantIndex(
            tenant,
            key,
            directory,
            index,
            writer,
            searcher,
            state.revision,
            state.rebuilt_at,
            set(),
            asyncio.Lock(),
            asyncio.Event(),
        )

    def cursor_key(self, tenant: uuid.UUID) -> bytes:
        """cursor_key keys the tenant's page tokens, so another tenant's token fails its check."""
        return tenant_cursor_key(self._cursor_secret, tenant)

    # Closing, eviction, disk budget ------------------------------------------------------------

    async def _close(self, tenant: uuid.UUID) -> None:
        opened = self._open.pop(tenant, None)
        if opened is None:
            return
        async with opened.lock:
            await self._in(self.write_pool, self.pins.drop, tenant)
            try:
                await self._in(self.write_pool, opened.writer.close)
            except UNUSABLE_ERRORS as exc:
                # A directory deleted under us: uncommitted changes are replayed from the feed.
                log.warning("closing the writer of tenant %s failed: %s", tenant, exc)
            opened.searcher.close()
            opened.index.close()

    async def _evict_over_cap(self, *, keep: uuid.UUID) -> None:
        while len(self._open) > self.settings.max_open_tenants:
            oldest = next(t for t in self._open if t != keep)
            log.info("closing least recently used tenant index %s", oldest)
            await self._close(oldest)

    async def _enforce_disk_budget(self, *, keep: uuid.UUID) -> None:
        budget = self.settings.disk_budget_bytes
        if budget <= 0:
            return
        sizes = await self._in(self.write_pool, _tenant_sizes, self.data_dir)
        total = sum(size for _, _, size in sizes)
        # Closed tenants first (least recently used first), then open ones, oldest first.
        order = [s for s in sizes if s[1] not in self._open] + [
            s for t in self._open for s in sizes if s[1] == t
        ]
        for _, tenant, size in order:
            if total <= budget:
                return
            if tenant == keep:
                continue
            await self._close(tenant)
            await self._in(self.write_pool, shutil.rmtree, self.data_dir / str(tenant), True)
            self._verified.discard(tenant)
            total -= size
            log.info("deleted tenant index %s to stay within the disk budget", tenant)

    # Tailing -----------------------------------------------------------------------------------

    async def sync(self, tenant: uuid.UUID, watermark: Watermark) -> None:
        """sync applies the tenant's visible feed rows in batches and advances its covered revision.

        A tenant whose directory is gone is dropped and rebuilt (`lost`), not retried forever:
        the other tenants' syncs in the same round go on.
        """
        opened = self._open.get(tenant)
        if opened is None:
            return
        try:
            await self._sync(opened, tenant, watermark)
        except TenantLostError as exc:
            await self.lost(opened, exc.__cause__ or exc)

    async def _sync(self, opened: TenantIndex, tenant: uuid.UUID, watermark: Watermark) -> None:
        merge = False
        async with opened.lock:
            if self._open.get(tenant) is not opened:
                return  # closed or replaced by a rebuild while we waited for the lock
            after = opened.covered
            safe: int | None = None
            while True:
                snapshot, changes = await self.store.feed_rows(tenant, after, self.settings.feed_batch_rows)
                if safe is None:
                    # G from the first snapshot only: every row at or below it is visible there, and
                    # the later batches read on from it. A later snapshot's G could cover rows that
                    # committed meanwhile below `after`, which these batches never read.
                    safe = self.rule.safe(watermark, snapshot, opened.key)
                fresh = [c for c in changes if c.revision not in opened.applied]
                if fresh:
                    await self._apply(opened, fresh)
                    merge = True
                opened.applied.update(c.revision for c in changes)
                full = len(changes) == self.settings.feed_batch_rows
                # A full batch only proves the rows read so far; the rest comes next round.
                reach = min(safe, changes[-1].revision) if full else safe
                if reach > opened.covered or fresh:
                    opened.advance(reach)
                    if fresh:
                        state = TenantState(tenant, opened.covered, opened.rebuilt_at)
                        await self._on_disk(state.save, opened.directory)
                if not full:
                    break
                after = changes[-1].revision
            if merge and len(opened.index.manifest.segments) > MERGE_ABOVE:
                await self._on_disk(opened.writer.merge)
                # The searcher caches per-segment facts by segment path; a fresh one drops those of
                # merged-away segments (searches in flight keep the old one).
                opened.searcher = Searcher(opened.index, cursor_key=self.cursor_key(tenant))

    async def _apply(self, opened: TenantIndex, changes: Sequence[Change]) -> None:
        ids = list(dict.fromkeys(c.document_id for c in changes))
        documents = await self.store.documents(opened.tenant, ids)
        writer = opened.writer

        def write() -> None:
            # The writer would recreate a deleted directory around its new segment, under a
            # manifest naming segments that are gone: a lost directory must stop it first.
            current = opened.index.path / manifest_name(opened.index.manifest.generation)
            if not current.is_file():
                raise FileNotFoundError(errno.ENOENT, "the index's current manifest is gone")
            for document_id in ids:
                row = documents.get(document_id)
                if row is None:
                    writer.delete(str(document_id))
                else:
                    writer.add(source_document(row))
            writer.commit(merge=False)

        await self._on_disk(write)
        opened.update_time = time.time()

    async def _on_disk(self, fn: Callable[..., T], *args: object) -> T:
        """_on_disk runs index writing in the write pool; a lost directory raises TenantLostError."""
        try:
            return await self._in(self.write_pool, fn, *args)
        except LOST_ERRORS as exc:
            raise TenantLostError(str(exc)) from exc

    async def wait_covered(self, opened: TenantIndex, revision: int, deadline: float) -> TenantIndex:
        """wait_covered waits until the tenant covers `revision`; returns its (maybe rebuilt) index.

        Raises Unavailable (with RetryInfo) when `deadline` (monotonic) passes first.
        """
        while opened.covered < revision:
            self.tailer.request(opened.tenant)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"the index covers revision {opened.covered}, not yet {revision}; retry shortly",
                    reason="INDEX_NOT_CAUGHT_UP",
                    retry_after=1.0,
                    metadata={"index_revision": str(opened.covered), "min_revision": str(revision)},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.advanced.wait(), timeout=min(remaining, 0.25))
            opened = self._open.get(opened.tenant) or await self.get(opened.tenant, deadline)
        return opened

    # Rebuilds ----------------------------------------------------------------------------------

    async def rebuild(self, tenant: uuid.UUID) -> TenantIndex:
        """rebuild starts rebuilding the tenant's index from Postgres; searches use the old one meanwhile."""
        opened = await self.get(tenant)
        if tenant not in self._rebuilds:
            opened.state = REBUILDING
            task = asyncio.create_task(self._rebuild(opened), name=f"search-rebuild-{tenant}")
            self._rebuilds[tenant] = task
            task.add_done_callback(lambda _t: self._rebuilds.pop(tenant, None))
        return opened

    async def _rebuild(self, opened: TenantIndex) -> None:
        tenant = opened.tenant
        try:
            # The old index keeps serving and tailing while the new one is built beside it.
            built = await self._build(tenant)
            async with self._opening[tenant], opened.lock:
                mark = time.monotonic()
                # Out of the table first, so that no new search picks the index being closed.
                self._open.pop(tenant, None)
                await self._in(self.write_pool, self.pins.drop, tenant)
                await self._in(self.write_pool, opened.writer.close)
                opened.searcher.close()
                opened.index.close()
                await self._in(self.write_pool, swap_in, self.data_dir, tenant, built.path)
                fresh = await self._open_dir(tenant, opened.directory, built.state, verify=False)
                fresh.update_time = opened.update_time
                self._open[tenant] = fresh
                opened.advance(built.state.revision)
                _log_serving(tenant, built, time.monotonic() - mark)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("rebuild of tenant %s failed", tenant)
            opened.state = ERROR
            opened.message = f"rebuild failed: {type(exc).__name__}"
            return
        self.tailer.request(tenant)

    async def corrupt(self, opened: TenantIndex, exc: BaseException) -> Unavailable:
        """corrupt starts a rebuild of a tenant whose files failed a check and returns the error to raise.

        A search that raced with a rebuild's swap or an eviction read a directory that was just
        replaced: that is no corruption, and the caller only needs to try again.
        """
        if self._open.get(opened.tenant) is not opened:
            return Unavailable(
                "the index was replaced during the search; retry", reason="INDEX_REPLACED", retry_after=0.1
            )
        log.warning("index of tenant %s failed a check (%s); rebuilding", opened.tenant, exc)
        with contextlib.suppress(Exception):
            await self.rebuild(opened.tenant)
        return Unavailable(
            "the index is being rebuilt; retry shortly", reason="INDEX_REBUILDING", retry_after=1.0
        )

    async def lost(self, opened: TenantIndex, exc: BaseException) -> Unavailable:
        """lost drops a tenant whose directory is missing or unreadable, starts its build, returns the error.

        The next search waits for that build (`get`); one that raced with a swap or an eviction
        only needs to try again (as in `corrupt`).
        """
        tenant = opened.tenant
        if self._open.get(tenant) is not opened:
            return await self.corrupt(opened, exc)
        log.warning("the directory of tenant %s is lost (%s); rebuilding from Postgres", tenant, exc)
        await self._close(tenant)
        self._verified.discard(tenant)
        self._opening_task(tenant)
        return Unavailable("the index is being rebuilt; retry soon", reason="INDEX_REBUILDING", retry_after=1)

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def run_search(self, fn: Callable[[threading.Event], T]) -> T:
        """run_search runs `fn(cancel)` in the search pool; if the caller goes away, `cancel` is set."""
        cancel = threading.Event()

        def call(event: threading.Event) -> T:
            with self._count_lock:
                self.active_searches += 1
            try:
                return fn(event)
            finally:
                with self._count_lock:
                    self.active_searches -= 1
                    if event.is_set():
                        self.cancelled_searches += 1

        future = asyncio.get_running_loop().run_in_executor(self.search_pool, call, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise


def _retrieved(
    getting: dict[uuid.UUID, asyncio.Task[TenantIndex]], tenant: uuid.UUID, task: asyncio.Task[TenantIndex]
) -> None:
    """_retrieved forgets a finished opening; its error was raised to its callers (if none, it is dropped)."""
    if getting.get(tenant) is task:
        del getting[tenant]
    if not task.cancelled():
        task.exception()


def _log_serving(tenant: uuid.UUID, built: Built, opening: float) -> None:
    """_log_serving logs a rebuild's phases once the new index serves (the bench reads these fields)."""
    fields = {"tenant": str(tenant), **built.stats.fields(), "open_s": round(opening, 3)}
    log.info(
        "the index of tenant %s serves: built in %.3f s, opened in %.3f s",
        tenant,
        built.stats.total,
        opening,
        extra={"fields": fields},
    )


def _tenant_sizes(data_dir: Path) -> list[tuple[float, uuid.UUID, int]]:
    """_tenant_sizes lists (last use, tenant, bytes) for every tenant directory, least recent first."""
    out = []
    for entry in data_dir.iterdir():
        try:
            tenant = uuid.UUID(entry.name)
        except ValueError:
            continue
        size = 0
        for root, _dirs, files in os.walk(entry):
            for name in files:
                with contextlib.suppress(OSError):
                    size += os.stat(os.path.join(root, name)).st_size
        used = 0.0
        with contextlib.suppress(OSError):
            used = (entry / "state.json").stat().st_mtime
        out.append((used, tenant, size))
    out.sort()
    return out
