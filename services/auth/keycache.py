"""KeyCache: API keys by hash, cached in the auth process and evicted on every change.

`Check` must not cost a database lookup per request just to learn a key's owner, permissions
and limits, yet a revoked, rotated or downgraded key must stop working on every auth replica
within a second. So:

* A lookup reads the whole row (`store.find_by_hash`, one service-role transaction, bounded by
  `db_timeout` so a hung database answers Unavailable) into the one key type,
  `store.ApiKeyRecord`, whose `key_state` Check applies.
* Lookups go through an in-process cache keyed by the key's SHA-256 (services/auth/keys.py):
  found keys for `key_cache_ttl` seconds, unknown hashes for `key_cache_negative_ttl`
  (so a flood of made-up keys costs one query per hash per interval), at most
  `key_cache_size` entries, least recently used evicted first.
* A listener holds one direct connection with `LISTEN api_key_changes`. The migration
  20261124100000_key_admission.sql fires that NOTIFY, with the key's id as payload, on every
  update that matters (revocation, rotation grace, permissions, limits, expiry) and on delete,
  whichever code made it; the listener evicts that id at once. Delivery takes milliseconds.
* While the listener is not connected (start-up, database restart, a pooler that cannot LISTEN)
  notifications could be missed, so the cache is bypassed and every check reads the row; when
  the listener (re)connects the whole cache is dropped, since changes may have been missed.

LISTEN needs a session: through Supabase's transaction pooler (port 6543) the listener connects
but never hears anything, so point KOTADB_DATABASE_URL at the direct port (5432) or, if only the
pooler is reachable, set KOTADB_AUTH_KEY_CACHE_TTL to the lag you accept (e.g. 1).

Revocation rides on the same notification: the eviction also tells the admitter (`on_change`)
to hand back the key's leased tokens, so the next check reads the row and is refused. While the
listener is down nothing is answered from the cache, and a lease grant refuses a revoked key
under the row lock anyway (services/auth/ratelimit.py). The listener also carries the
admitter's `api_key_lease_reclaim` channel (`channels`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from services.auth.store import ApiKeyRecord, bounded, find_by_hash
from services.common.db import as_service
from services.common.server import LazyPool

log = logging.getLogger("kotadb.auth.keycache")

CHANNEL = "api_key_changes"
# Seconds between attempts to (re)connect the listener; short, because the cache is bypassed
# (one extra query per check) until it is back.
LISTEN_RETRY = 0.5


class KeyCache:
    """KeyCache answers `lookup(key_hash)` from memory when it safely can, else from the database.

    `clock` is monotonic seconds (injected in tests); `db_timeout` bounds each lookup (a hung
    database answers Unavailable instead of holding Check). `start()` begins listening for
    changes; `close()` stops it.
    """

    def __init__(
        self,
        pool: LazyPool,
        database_url: str,
        *,
        ttl: float = 30.0,
        negative_ttl: float = 2.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        db_timeout: float = 1.5,
        on_change: Callable[[uuid.UUID | None], None] | None = None,
        channels: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        self._pool = pool
        # on_change hears every changed key id, and None when changes may have been missed;
        # channels are further NOTIFY channels heard on the same connection (payload only).
        self._on_change = on_change
        self._channels = dict(channels or {})
        self._database_url = database_url
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._clock = clock
        self.db_timeout = db_timeout
        self._entries: OrderedDict[str, tuple[float, ApiKeyRecord | None]] = OrderedDict()
        self._hash_by_id: dict[uuid.UUID, str] = {}
        # Reads in flight, shared by concurrent lookups of one hash; `_generation` counts the
        # changes heard, so a read that overlapped one is neither shared further nor cached.
        self._reads: dict[str, asyncio.Future[ApiKeyRecord | None]] = {}
        self._generation = 0
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self._closed = False
        self.lookups = 0
        self.evictions = 0

    @property
    def listening(self) -> bool:
        """listening tells whether change notifications are being received (the cache is in use)."""
        return self._listening.is_set()

    async def wait_listening(self, limit: float) -> bool:
        """wait_listening waits up to `limit` seconds for the listener; tells whether it is up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), limit)
        return self.listening

    def start(self) -> None:
        """start launches the listener task (idempotent)."""
        if self._listener is None and self._database_url:
            self._listener = asyncio.create_task(self._listen_forever(), name="keycache-listener")

    async def close(self) -> None:
        """close stops listening and forgets every cached key."""
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._drop_connection()
        self.clear()

    def clear(self) -> None:
        """clear forgets every cached key (and lets no read in flight be cached or shared)."""
        self._generation += 1
        self._reads.clear()
        self._entries.clear()
        self._hash_by_id.clear()

    def evict(self, key_id: uuid.UUID) -> None:
        """evict forgets the key with id `key_id`, if cached (and lets no read in flight be cached)."""
        self._generation += 1
        self._reads.clear()
        key_hash = self._hash_by_id.pop(key_id, None)
        if key_hash is not None:
            self._entries.pop(key_hash, None)
            self.evictions += 1

    def peek(self, key_hash: str) -> tuple[bool, ApiKeyRecord | None]:
        """peek answers from memory only: (True, record or None) on a live entry, else (False, None)."""
        if self.listening:
            cached = self._entries.get(key_hash)
            if cached is not None and cached[0] > self._clock():
                self._entries.move_to_end(key_hash)
                return True, cached[1]
        return False, None

    async def lookup(self, key_hash: str) -> ApiKeyRecord | None:
        """lookup returns the key stored under `key_hash`, or None when there is none.

        Concurrent lookups of one hash share one read (a burst on a cold key costs one query,
        not one per check). Raises Unavailable (services/common/errors.py) when the database
        cannot be reached or does not answer within `db_timeout`.
        """
        now = self._clock()
        if self.listening:
            cached = self._entries.get(key_hash)
            if cached is not None and cached[0] > now:
                self._entries.move_to_end(key_hash)
                return cached[1]
        shared = self._reads.get(key_hash)
        if shared is None:
            shared = asyncio.ensure_future(self._fetch(key_hash, now))
            self._reads[key_hash] = shared
            shared.add_done_callback(lambda done: self._read_done(key_hash, done))
        return await asyncio.shield(shared)

    def _read_done(self, key_hash: str, done: asyncio.Future[ApiKeyRecord | None]) -> None:
        if self._reads.get(key_hash) is done:
            del self._reads[key_hash]
        if not done.cancelled():
            done.exception()  # retrieved here too, in case every waiter was cancelled

    async def _fetch(self, key_hash: str, now: float) -> ApiKeyRecord | None:
        self.lookups += 1
        generation = self._generation
        record = await bounded(self._read(key_hash), self.db_timeout)
        # Only cache what was read while notifications were flowing, and only if no change was
        # heard since the read began; otherwise the row read may predate that change.
        if self.listening and generation == self._generation:
            self._remember(key_hash, record, now)
        return record

    async def _read(self, key_hash: str) -> ApiKeyRecord | None:
        async with as_service(self._pool.get()) as connection:
            return await find_by_hash(connection, key_hash)

    def _remember(self, key_hash: str, record: ApiKeyRecord | None, now: float) -> None:
        ttl = self.ttl if record is not None else self.negative_ttl
        if ttl <= 0:
            return
        self._entries[key_hash] = (now + ttl, record)
        self._entries.move_to_end(key_hash)
        if record is not None:
            self._hash_by_id[record.id] = key_hash
        while len(self._entries) > self.max_entries:
            _, (_, dropped) = self._entries.popitem(last=False)
            if dropped is not None:
                self._hash_by_id.pop(dropped.id, None)

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        try:
            key_id = uuid.UUID(str(payload))
        except ValueError:
            # Not one of ours; drop everything rather than guess what changed.
            self._changed(None)
            return
        self.evict(key_id)
        self._changed(key_id)

    def _changed(self, key_id: uuid.UUID | None) -> None:
        """_changed forgets what changed (everything, when `key_id` is None) and tells on_change."""
        if key_id is None:
            self.clear()
        if self._on_change is not None:
            self._on_change(key_id)

    def _on_channel(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        handler = self._channels.get(channel)
        if handler is not None:
            handler(str(payload))

    def _on_terminate(self, connection: Any) -> None:
        self._listening.clear()
        self._changed(None)

    async def _listen_forever(self) -> None:
        while not self._closed:
            try:
                connection = await asyncpg.connect(self._database_url, timeout=5.0, statement_cache_size=0)
                self._connection = connection
                connection.add_termination_listener(self._on_terminate)
                await connection.add_listener(CHANNEL, self._on_notify)
                for channel in self._channels:
                    await connection.add_listener(channel, self._on_channel)
                # Anything cached before this point may have missed a notification.
                self._changed(None)
                self._listening.set()
                log.info("listening for API key changes", extra={"fields": {"channel": CHANNEL}})
                while not connection.is_closed():
                    await asyncio.sleep(LISTEN_RETRY)
                    # A cheap round trip notices a silently dead connection (no TCP reset).
                    await connection.execute("select 1", timeout=5.0)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if self._listening.is_set():
                    log.warning("API key change listener lost", extra={"fields": {"error": str(exc)[:200]}})
            finally:
                self._listening.clear()
                await self._drop_connection()
            self._changed(None)
            await asyncio.sleep(LISTEN_RETRY)

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=1.0)
            if not connection.is_closed():
                connection.terminate()
