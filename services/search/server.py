"""The search service's composition: settings, store, servicer, index volume and the server bootstrap."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.server import LazyPool, Probe, ServiceServer, bind
from services.common.settings import env_settings
from services.search.config import SearchSettings
from services.search.servicer import SearchServicer
from services.search.store import SearchStore


def build(settings: SearchSettings | None = None) -> ServiceServer:
    """build assembles the search server from `settings` (default: the environment); it is not started."""
    settings = settings if settings is not None else env_settings(SearchSettings)
    pool = LazyPool(settings)
    store = SearchStore(pool)
    servicer = SearchServicer(store)
    data_dir = settings.data_dir

    async def check_volume() -> None:
        await asyncio.to_thread(_check_writable, data_dir)

    add = search_pb2_grpc.add_SearchServiceServicer_to_server
    return ServiceServer(
        SearchSettings.service_name,
        settings,
        pool=pool,
        bindings=[bind(search_pb2.DESCRIPTOR, "SearchService", add, servicer)],
        probes=[Probe("schema", store.check_ready), Probe("index_volume", check_volume)],
    )


def _check_writable(directory: Path) -> None:
    """_check_writable creates `directory` if needed and proves a file can be written there."""
    directory.mkdir(parents=True, exist_ok=True)
    # A real write, because os.access says yes on a read-only mount.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as probe:
        probe.write(b"ok")
        probe.flush()
