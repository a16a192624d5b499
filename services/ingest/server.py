"""The ingest service's composition: settings, store, servicer and the shared server bootstrap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from services.common import db
from services.common.identity import IdentitySettings, identity_interceptors
from services.common.server import LazyPool, Probe, ServiceServer, StartHook, StopHook, bind
from services.common.settings import env_settings
from services.ingest import events, queue
from services.ingest.config import IngestSettings
from services.ingest.documents import DocumentWriter
from services.ingest.documentservice import DocumentService
from services.ingest.jobs import JobService
from services.ingest.repositories import RepositoryManager
from services.ingest.servicer import IngestServicer
from services.ingest.store import IngestStore
from services.ingest.webhooks import WebhookReceiver
from services.ingest.worker import Worker, source_loader


def build(
    settings: IngestSettings | None = None, *, identity: IdentitySettings | None = None
) -> ServiceServer:
    """build assembles the ingest server from `settings` (default: the environment); it is not started.

    `identity` (default: the environment) says how callers are verified: the signed identity
    from the gateway, or an API key checked by the auth service (services/common/identity.py).
    """
    settings = settings if settings is not None else env_settings(IngestSettings)
    identity = identity if identity is not None else env_settings(IdentitySettings)
    pool = LazyPool(settings)
    store = IngestStore(pool)
    documents = DocumentService(pool, settings)
    wakeups = events.Wakeups(settings.listen_database_url, poll_interval=settings.poll_interval)
    jobs = JobService(pool, settings, wakeups)
    repositories = RepositoryManager(pool, settings, jobs)
    webhooks = WebhookReceiver(pool, repositories, wakeups)
    servicer = IngestServicer(
        store, documents=documents, repositories=repositories, webhooks=webhooks, jobs=jobs
    )
    start_workers, stop_workers = worker_hooks(pool, settings, documents.writer, wakeups, settings.workers)

    async def stop_documents(grace: float) -> None:
        await asyncio.to_thread(documents.close)

    add = ingest_pb2_grpc.add_IngestServiceServicer_to_server
    return ServiceServer(
        IngestSettings.service_name,
        settings,
        pool=pool,
        bindings=[bind(ingest_pb2.DESCRIPTOR, "IngestService", add, servicer)],
        identity=identity_interceptors(identity),
        probes=[Probe("schema", store.check_ready), Probe("queue", queue_probe(pool))],
        on_start=[start_workers],
        on_stop=[stop_workers, stop_documents],
    )


def worker_hooks(
    pool: LazyPool,
    settings: IngestSettings,
    writer: DocumentWriter,
    wakeups: events.Wakeups,
    concurrency: int,
) -> tuple[StartHook, StopHook]:
    """worker_hooks are the start and stop hooks of `concurrency` job workers and their wake-ups.

    Stopping gives running jobs the shutdown grace; whatever is still running then keeps its
    lease until it expires and another worker claims the job again.
    """
    worker = Worker(pool.get, settings, writer, wakeups, source_loader(settings), concurrency=concurrency)

    async def start() -> None:
        wakeups.start()
        worker.start()

    async def stop(grace: float) -> None:
        await worker.stop(grace)
        await wakeups.close()

    return start, stop


def queue_probe(pool: LazyPool) -> Callable[[], Awaitable[str]]:
    """queue_probe reports the job queue's depth (queued, running, oldest queued age) for health."""

    async def probe() -> str:
        async with db.as_service(pool.get()) as conn:
            return (await queue.queue_depth(conn)).describe()

    return probe
