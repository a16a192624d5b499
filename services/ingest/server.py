"""The ingest service's composition: settings, store, servicer and the shared server bootstrap."""

from __future__ import annotations

import asyncio

from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from services.common.identity import IdentitySettings, identity_interceptors
from services.common.server import LazyPool, Probe, ServiceServer, bind
from services.common.settings import env_settings
from services.ingest.config import IngestSettings
from services.ingest.documentservice import DocumentService
from services.ingest.repositories import RepositoryManager
from services.ingest.servicer import IngestServicer
from services.ingest.store import IngestStore
from services.ingest.webhooks import WebhookReceiver


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
    repositories = RepositoryManager(pool, settings)
    webhooks = WebhookReceiver(pool, repositories)
    servicer = IngestServicer(store, documents=documents, repositories=repositories, webhooks=webhooks)

    async def stop_documents(grace: float) -> None:
        await asyncio.to_thread(documents.close)

    add = ingest_pb2_grpc.add_IngestServiceServicer_to_server
    return ServiceServer(
        IngestSettings.service_name,
        settings,
        pool=pool,
        bindings=[bind(ingest_pb2.DESCRIPTOR, "IngestService", add, servicer)],
        identity=identity_interceptors(identity),
        probes=[Probe("schema", store.check_ready)],
        on_stop=[stop_documents],
    )
