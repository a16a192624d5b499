"""The search service's composition: settings, store, tenant indexes, tailer, servicer and the server."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.errors import Unavailable
from services.common.identity import IdentitySettings, identity_interceptors
from services.common.server import LazyPool, Probe, ServiceServer, bind
from services.common.settings import env_settings
from services.search.config import SearchSettings
from services.search.searches import Searches
from services.search.servicer import SearchServicer
from services.search.store import SearchStore
from services.search.tenants import TenantManager


def build(
    settings: SearchSettings | None = None, *, identity: IdentitySettings | None = None
) -> ServiceServer:
    """build assembles the search server (see `assemble`); it is not started."""
    return assemble(settings, identity=identity)[0]


def assemble(
    settings: SearchSettings | None = None, *, identity: IdentitySettings | None = None
) -> tuple[ServiceServer, TenantManager]:
    """assemble builds the search server from `settings` (default: the environment); it is not started.

    `identity` (default: the environment) says how callers are verified: the signed identity
    from the gateway, or an API key checked by the auth service (services/common/identity.py).
    The tenant manager starts with the server (reopening the tenants on the volume, tailing the
    change feed) and stops after it has drained.
    """
    settings = settings if settings is not None else env_settings(SearchSettings)
    identity = identity if identity is not None else env_settings(IdentitySettings)
    pool = LazyPool(settings)
    store = SearchStore(pool)
    manager = TenantManager(settings, store)
    servicer = SearchServicer(Searches(settings, manager), settings.replica)
    data_dir = settings.data_dir

    async def check_volume() -> None:
        await asyncio.to_thread(_check_writable, data_dir)

    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    server = ServiceServer(
        SearchSettings.service_name,
        settings,
        pool=pool,
        bindings=[bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)],
        identity=identity_interceptors(identity),
        probes=[
            Probe("schema", store.check_ready),
            Probe("index_volume", check_volume),
            Probe("change_feed", feed_probe(manager, settings.health_max_lag), critical=False),
        ],
        on_start=[manager.start],
        on_stop=[manager.stop],
    )
    return server, manager


def feed_probe(manager: TenantManager, threshold: float) -> Callable[[], Awaitable[str]]:
    """feed_probe reports the index's lag: seconds since the tailer last read the change feed.

    Past `threshold` (health_max_lag) the component is NOT_SERVING, which turns the gateway's
    /health unhealthy; the probe is not critical, so the replica keeps answering searches from
    what it has (a search that needs a write passes min_revision and waits or fails by itself).
    """

    async def probe() -> str:
        last = manager.tailer.last_poll
        if not last:
            raise Unavailable("the change feed has not been read yet", reason="INDEX_LAGGING")
        lag = time.monotonic() - last
        if lag > threshold:
            raise Unavailable(
                f"lag {lag:.1f} s: the change feed was last read {lag:.1f} s ago (threshold {threshold:g} s)",
                reason="INDEX_LAGGING",
            )
        return f"lag {lag:.2f} s"

    return probe


def _check_writable(directory: Path) -> None:
    """_check_writable creates `directory` if needed and proves a file can be written there."""
    directory.mkdir(parents=True, exist_ok=True)
    # A real write, because os.access says yes on a read-only mount.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as probe:
        probe.write(b"ok")
        probe.flush()
