"""The change-feed tailer: applies document changes to open tenant indexes without ever missing one.

Wake-ups. A dedicated connection (`listen_url`, a direct or session URL) LISTENs on channel
`document_changes`, whose payload is the tenant's user id; a notification marks that tenant
dirty and wakes the loop at once. Notifications are hints only: every `poll_interval` every open
tenant is polled, and after any (re)connect everything is, so a lost notification or a pooler
that cannot LISTEN (Supabase port 6543: leave `listen_url` empty) costs latency, never a change.

The covered revision. Revisions are taken from a sequence before their transactions commit, so
a reader that saw revision 12 may later see 11 appear. Each tenant index keeps `covered`: every
change of the tenant with revision <= covered that will ever commit is in the index. Searches
with `min_revision` wait for it. Document writers announce their tenant: before drawing a
revision, the documents triggers take a shared transaction-level advisory lock keyed by the
tenant (migration 20261207100000), held until the writer commits or rolls back. Each poll:

1. Reads L, the sequence's last value (non-transactional), THEN from pg_locks the running
   writers: each with the tenant keys it holds, whether it holds a write lock on
   public.documents, and its xid if assigned (`SearchStore.revision_watermark`).
2. Then, in a new snapshot S, reads the tenant's feed rows above its covered revision and
   applies every visible one at once (fresh results never wait for the rule).
3. A writer W is a blocker for tenant t if it holds t's key, or holds the documents lock without
   any key yet (a database without the migration, or a statement before its trigger ran) —
   unless its xid is known and finished in S. W carries a lower bound lb(W, t): the revisions it
   draws for t are above it. A pair first seen in poll k+1 was absent in poll k, so W took the
   lock after poll k read pg_locks, after it read L_k: lb = L_k. Pairs seen by the first poll
   get lb = 0.
4. G_t = min(L, min over t's blockers of lb); covered_t := max(covered_t, G_t) once the rows up
   to G_t read in S are applied.

Proof that no change of t at or below G_t is missed. Take a row of t with revision r <= G_t of a
transaction T that commits. T drew r in a documents trigger, after taking t's key (and the
documents lock), which it keeps until it ends. If T did not hold the key when pg_locks was
read, it took it afterwards (a T that held and released it had ended, so its row is visible in
the later S), so r was drawn after L was read: r > L >= G_t, impossible. So T held the key. If
T had finished by S, its row is visible in S and applied (aborted rows never appear). If T was
still running it is a blocker and r > lb(T, t) >= G_t, impossible. A rebuild reads its watermark
before its stream's snapshot, so the same holds for the revision it starts tailing from.

Consequences: only a running writer of the same tenant holds a tenant back. A long transaction
elsewhere — another tenant's bulk write, a report, an idle transaction holding an xid — never
stalls it, unlike the plain `xact_id < pg_snapshot_xmin` rule (DESIGN §8), which waits for the
oldest transaction in the whole database. Tenant keys are 32-bit hashes, so a collision only
makes two tenants wait for each other. While writers run the tailer re-polls quickly (from
10 ms, doubling up to `poll_interval`), so a writer that just committed is passed as soon as
its locks are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from services.search.store import SearchStore, Snapshot, Watermark, Writer

log = logging.getLogger(__name__)

CHANNEL = "document_changes"
_FAST_POLL = 0.01


class RevisionRule:
    """RevisionRule keeps the writers' lower bounds across polls and computes a tenant's safe revision G."""

    def __init__(self) -> None:
        # (vxid, tenant key) -> lower bound; tenant key None: a writer that announced no tenant yet.
        self._bounds: dict[tuple[str, int | None], int] = {}
        self._lock = asyncio.Lock()
        self._last_sequence: int | None = None
        self.watermark: Watermark | None = None
        """watermark is the most recent watermark observed (its `sequence` is the database head)."""

    async def read(self, store: SearchStore) -> Watermark:
        """read reads a watermark and observes it; reads are serialised so observations stay in order."""
        async with self._lock:
            watermark = await store.revision_watermark()
            self.observe(watermark)
            return watermark

    def observe(self, watermark: Watermark) -> None:
        """observe records a watermark: new (writer, tenant) pairs get the previous sequence as bound.

        Watermarks must be observed in the order they were read (`read` ensures it).
        """
        previous = 0 if self._last_sequence is None else self._last_sequence
        bounds: dict[tuple[str, int | None], int] = {}
        for writer in watermark.writers:
            for key in _roles(writer):
                bounds[(writer.vxid, key)] = self._bounds.get((writer.vxid, key), previous)
        self._bounds = bounds
        self._last_sequence = watermark.sequence
        self.watermark = watermark

    def safe(self, watermark: Watermark, snapshot: Snapshot, tenant_key: int) -> int:
        """safe is G for the tenant with `tenant_key`, for a feed read in `snapshot` after `watermark`."""
        safe = watermark.sequence
        for writer in watermark.writers:
            if writer.xid is not None and not snapshot.running(writer.xid):
                continue
            for key in _roles(writer):
                if key is None or key == tenant_key:
                    safe = min(safe, self._bounds.get((writer.vxid, key), 0))
        return safe

    def blocked(self, watermark: Watermark) -> bool:
        """blocked tells whether some writer may hold a tenant's G below the sequence's value."""
        return bool(watermark.writers)


def _roles(writer: Writer) -> tuple[int | None, ...]:
    """_roles are the tenant keys a writer may still draw revisions for (None: any tenant)."""
    if writer.tenants:
        return tuple(sorted(writer.tenants))
    return (None,) if writer.documents else ()


class Tailer:
    """Tailer runs the poll loop and the LISTEN connection; `request` asks for a tenant's sync now."""

    def __init__(
        self,
        store: SearchStore,
        rule: RevisionRule,
        *,
        listen_url: str,
        poll_interval: float,
        tenants: Callable[[], Sequence[uuid.UUID]],
        sync: Callable[[uuid.UUID, Watermark], Awaitable[None]],
    ) -> None:
        self._store = store
        self._rule = rule
        self._listen_url = listen_url
        self._poll_interval = poll_interval
        self._tenants = tenants
        self._sync = sync
        self._dirty: set[uuid.UUID] = set()
        self._all = True
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False
        """connected tells whether the last poll reached the database."""
        self.last_poll = 0.0
        """last_poll is the monotonic time of the last successful poll."""

    def start(self) -> None:
        """start launches the poll loop and, with a listen URL, the listener."""
        self._tasks.append(asyncio.create_task(self._loop(), name="search-tailer"))
        if self._listen_url:
            self._tasks.append(asyncio.create_task(self._listen(), name="search-listener"))

    async def stop(self) -> None:
        """stop cancels the loop and the listener and waits for them."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def request(self, tenant: uuid.UUID | None = None) -> None:
        """request asks for a poll of `tenant` (None: every open tenant) as soon as possible."""
        if tenant is None:
            self._all = True
        else:
            self._dirty.add(tenant)
        self._wake.set()

    async def _loop(self) -> None:
        delay = self._poll_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            timed_out = not self._dirty and not self._all
            wanted = set(self._dirty)
            everyone = self._all or timed_out
            self._dirty.clear()
            self._all = False
            try:
                watermark = await self._rule.read(self._store)
                open_now = list(self._tenants())
                targets = open_now if everyone else [t for t in open_now if t in wanted]
                for tenant in targets:
                    await self._sync(tenant, watermark)
                self.connected = True
                self.last_poll = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be down: keep serving, retry
                if self.connected:
                    log.warning("change feed poll failed: %s", exc)
                self.connected = False
                self._all = True
                delay = self._poll_interval
                continue
            if self._rule.blocked(watermark):
                # Writers in flight hold G back; look again soon rather than at the next notify.
                self._all = True
                delay = min(self._poll_interval, _FAST_POLL if delay >= self._poll_interval else delay * 2)
            else:
                delay = self._poll_interval

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._listen_url, server_settings={"application_name": "kotadb-search-listen"}
                )

                def on_notify(_c: object, _pid: int, _channel: str, payload: object) -> None:
                    try:
                        self.request(uuid.UUID(str(payload)))
                    except ValueError:
                        self.request()

                await conn.add_listener(CHANNEL, on_notify)
                # Anything committed while we were not listening is found by a full poll.
                self.request()
                backoff = 0.1
                while not conn.is_closed():
                    await asyncio.sleep(self._poll_interval)
                    await conn.fetchval("select 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("change feed listener lost its connection: %s", exc)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=1.0)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
