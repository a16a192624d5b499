"""`kotadb serve ingest-worker`: indexing workers alone, without the ingest RPCs.

The process runs KOTADB_INGEST_WORKERS workers (at least one) against the same database as the
ingest service and any number of other worker processes, on any machine; the queue makes every
claim exclusive. It serves only gRPC health (with the queue's depth) and reflection, on
KOTADB_INGEST_WORKER_PORT (default: a free port), so orchestrators can probe it.
"""

from __future__ import annotations

import asyncio

from services.common.server import LazyPool, Probe, ServiceServer
from services.common.settings import env_settings
from services.ingest import events
from services.ingest.config import IngestWorkerSettings
from services.ingest.documents import DocumentWriter
from services.ingest.documentservice import limits_from_settings
from services.ingest.server import queue_probe, worker_hooks
from services.ingest.store import IngestStore
from services.ingest.symbolizer import Symbolizer


def build(settings: IngestWorkerSettings | None = None) -> ServiceServer:
    """build assembles a worker process from `settings` (default: the environment); it is not started."""
    settings = settings if settings is not None else env_settings(IngestWorkerSettings)
    pool = LazyPool(settings)
    store = IngestStore(pool)
    symbolizer = Symbolizer(settings.symbol_workers)
    writer = DocumentWriter(symbolizer, limits_from_settings(settings))
    wakeups = events.Wakeups(settings.listen_database_url, poll_interval=settings.poll_interval)
    start_workers, stop_workers = worker_hooks(pool, settings, writer, wakeups, max(1, settings.workers))

    async def stop_symbolizer(grace: float) -> None:
        await asyncio.to_thread(symbolizer.close)

    return ServiceServer(
        IngestWorkerSettings.service_name,
        settings,
        pool=pool,
        bindings=[],
        probes=[Probe("schema", store.check_ready), Probe("queue", queue_probe(pool))],
        on_start=[start_workers],
        on_stop=[stop_workers, stop_symbolizer],
    )
