"""The auth service's composition: settings, store, servicer and the shared server bootstrap."""

from __future__ import annotations

from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth.config import AuthSettings
from services.auth.servicer import AuthServicer
from services.auth.store import AuthStore
from services.common.server import LazyPool, Probe, ServiceServer, bind
from services.common.settings import env_settings


def build(settings: AuthSettings | None = None) -> ServiceServer:
    """build assembles the auth server from `settings` (default: the environment); it is not started."""
    settings = settings if settings is not None else env_settings(AuthSettings)
    pool = LazyPool(settings)
    store = AuthStore(pool)
    servicer = AuthServicer(store)
    return ServiceServer(
        AuthSettings.service_name,
        settings,
        pool=pool,
        bindings=[
            bind(
                auth_pb2.DESCRIPTOR, "AuthService", auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer
            )
        ],
        probes=[Probe("schema", store.check_ready)],
    )
