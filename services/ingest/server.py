"""The ingest service's composition: settings, store, servicer and the shared server bootstrap."""

from __future__ import annotations

from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from services.common.server import LazyPool, Probe, ServiceServer, bind
from services.common.settings import env_settings
from services.ingest.config import IngestSettings
from services.ingest.servicer import IngestServicer
from services.ingest.store import IngestStore


def build(settings: IngestSettings | None = None) -> ServiceServer:
    """build assembles the ingest server from `settings` (default: the environment); it is not started."""
    settings = settings if settings is not None else env_settings(IngestSettings)
    pool = LazyPool(settings)
    store = IngestStore(pool)
    servicer = IngestServicer(store)
    add = ingest_pb2_grpc.add_IngestServiceServicer_to_server
    return ServiceServer(
        IngestSettings.service_name,
        settings,
        pool=pool,
        bindings=[bind(ingest_pb2.DESCRIPTOR, "IngestService", add, servicer)],
        probes=[Probe("schema", store.check_ready)],
    )
