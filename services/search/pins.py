"""pins keeps the index snapshots that first pages were computed on, so their next pages read the same.

It also holds the page tokens' key: one secret per deployment (a setting shared by every
replica, or a random one kept on the volume), from which each tenant's key is derived, so
another tenant's token fails its integrity check.

A page token (the engine's cursor, engine/search/cursor.py) names the snapshot generation its
page was computed on, and the engine serves the next page only on that generation: results
are ranked within one snapshot, and a page over a newer one could repeat or skip files. In a
tenant that is written to, the tailer commits a new generation within a second, so paging
through results would fail almost at once. The service therefore pins the snapshot of every
page that has a next page: the engine's snapshots are reference-counted (engine/index/index.py),
so the segment and deletion files of a pinned generation stay on disk and mapped while
commits and merges go on, and the next page runs on the very same snapshot.

Pins are bounded: one per (tenant, generation), at most `per_tenant` per tenant (the least
recently used closed first), each dropped `ttl` seconds after its last use, and all of a
tenant's dropped when the tenant is closed, evicted or rebuilt (tenants.py). A pin in use by
a running search is closed only once that search releases it. Once a pin is gone, its tokens
expire (FAILED_PRECONDITION, PAGE_TOKEN_EXPIRED, engine_errors.py) unless the index has not
changed since. Expired pins are swept on every lease and pin, so a quiet server keeps at most
the bounded number of stale snapshots until its next search.

The registry is shared by the event loop and the search threads, hence its lock; closing a
snapshot may delete the files only it kept alive, so it happens outside the lock.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.search.engine.index.index import Index, Snapshot


@dataclass(slots=True)
class _Pin:
    """_Pin is one pinned snapshot: when it was last used and how many searches hold it now."""

    snapshot: Snapshot
    used: float
    users: int = 0
    dropped: bool = False


class PagePins:
    """PagePins holds the pinned snapshots of every open tenant (see the module docstring)."""

    def __init__(self, *, ttl: float, per_tenant: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.per_tenant = per_tenant
        self.clock = clock
        self._lock = threading.Lock()
        self._pins: dict[uuid.UUID, collections.OrderedDict[int, _Pin]] = {}

    def count(self, tenant: uuid.UUID | None = None) -> int:
        """count is the number of pinned snapshots, of one tenant or of all."""
        with self._lock:
            if tenant is not None:
                return len(self._pins.get(tenant, ()))
            return sum(len(p) for p in self._pins.values())

    @contextmanager
    def lease(self, tenant: uuid.UUID, index: Index, generation: int | None) -> Iterator[Snapshot | None]:
        """lease yields the tenant's pinned snapshot of `generation` for one search, or None.

        None means no such pin (never pinned, expired, dropped, or of an index since replaced):
        the caller searches a fresh snapshot. The pin cannot be closed while leased.
        """
        found: _Pin | None = None
        with self._lock:
            stale = self._sweep_locked()
            pins = self._pins.get(tenant)
            pin = pins.get(generation) if pins is not None and generation is not None else None
            if pins is not None and pin is not None and generation is not None:
                if pin.snapshot.index is not index:
                    stale.append(self._remove_locked(tenant, generation))
                else:
                    pin.used = self.clock()
                    pin.users += 1
                    pins.move_to_end(generation)
                    found = pin
        _close(stale)
        try:
            yield None if found is None else found.snapshot
        finally:
            if found is not None:
                with self._lock:
                    found.users -= 1
                    closing = found.snapshot if found.dropped and found.users == 0 else None
                _close([closing])

    def pin(self, tenant: uuid.UUID, snapshot: Snapshot) -> bool:
        """pin keeps `snapshot` for the tenant's next pages; False if its generation is pinned already.

        On True the registry owns the snapshot (and closes it); on False the caller still does.
        Pinning past `per_tenant` drops the tenant's least recently used pin.
        """
        with self._lock:
            stale = self._sweep_locked()
            pins = self._pins.setdefault(tenant, collections.OrderedDict())
            existing = pins.get(snapshot.generation)
            if existing is not None and existing.snapshot.index is snapshot.index:
                existing.used = self.clock()
                pins.move_to_end(snapshot.generation)
                taken = False
            else:
                if existing is not None:
                    stale.append(self._remove_locked(tenant, snapshot.generation))
                    pins = self._pins.setdefault(tenant, collections.OrderedDict())
                pins[snapshot.generation] = _Pin(snapshot, self.clock())
                while len(pins) > self.per_tenant:
                    oldest = next(iter(pins))
                    stale.append(self._remove_locked(tenant, oldest))
                taken = True
        _close(stale)
        return taken

    def drop(self, tenant: uuid.UUID) -> None:
        """drop releases every pin of the tenant (closed, evicted, rebuilt or lost)."""
        with self._lock:
            pins = self._pins.pop(tenant, None)
            stale = [self._retire_locked(p) for p in (pins or {}).values()]
        _close(stale)

    def drop_all(self) -> None:
        """drop_all releases every pin (the service stops)."""
        for tenant in list(self._pins):
            self.drop(tenant)

    def _sweep_locked(self) -> list[Snapshot | None]:
        now = self.clock()
        stale = []
        for tenant, pins in list(self._pins.items()):
            for generation, pin in list(pins.items()):
                if now - pin.used >= self.ttl:
                    stale.append(self._remove_locked(tenant, generation))
        return stale

    def _remove_locked(self, tenant: uuid.UUID, generation: int) -> Snapshot | None:
        pins = self._pins[tenant]
        pin = pins.pop(generation)
        if not pins:
            del self._pins[tenant]
        return self._retire_locked(pin)

    @staticmethod
    def _retire_locked(pin: _Pin) -> Snapshot | None:
        """_retire_locked marks a pin dropped; returns its snapshot to close unless a search holds it."""
        pin.dropped = True
        return pin.snapshot if pin.users == 0 else None


def _close(snapshots: list[Snapshot | None]) -> None:
    """_close closes dropped snapshots no search held (a holder closes its own on release)."""
    for snapshot in snapshots:
        if snapshot is not None:
            snapshot.close()


def load_cursor_secret(configured: str, data_dir: Path) -> bytes:
    """load_cursor_secret is the configured secret, else the volume's `cursor.key` (made on first use)."""
    if configured:
        return configured.encode()
    path = data_dir / "cursor.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secret)
        return secret


def tenant_cursor_key(secret: bytes, tenant: uuid.UUID) -> bytes:
    """tenant_cursor_key derives the key of one tenant's page tokens from the deployment's secret."""
    return hmac.new(secret, b"kotadb-cursor\0" + tenant.bytes, hashlib.sha256).digest()
