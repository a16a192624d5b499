"""The auth service's composition: one process serving three gRPC services on one port, plus Check's own.

* `kotadb.v1.AuthService` — key management and usage (services/auth/servicer.py);
* `envoy.service.auth.v3.Authorization` — Envoy's ext_authz `Check` (services/auth/check.py),
  with its key cache (keycache.py) and exact admission (ratelimit.py);
* `envoy.service.accesslog.v3.AccessLogService` — Envoy's access log, metered into
  `usage_metrics` by the batch writer (accesslog.py, metering.py).

Envoy's ext_authz does not use the gRPC port: every external request's `Check` goes to a lean
HTTP/2 listener on `check_port` (services/common/h2unary.py) that serves only `Check` and gRPC
health, in the same process and event loop. A grpc.aio call costs about 250 us of CPU before
any handler code runs, more than a whole `Check` answered from memory; the lean listener is what
lets one process answer several thousand checks a second (BENCHMARKS.md). `Check` stays on the
gRPC port too, for direct callers and older gateway configs.

Life of the background parts: the key-change listener and the usage writer start with the
server; on SIGTERM the gRPC server drains first (so Envoy's access-log streams end and their
last entries are queued), then the usage writer flushes everything queued, then the listener
stops and the pool closes. ServiceServer's lifecycle hooks give that order: the stop hooks run
after the drain and before the pool closes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth import quota
from services.auth.accesslog import MAX_ENDPOINT_CHARS, AccessLogServicer, access_log_binding
from services.auth.check import AuthorizationServicer, Authorizer, limit_error
from services.auth.config import AuthSettings
from services.auth.keycache import KeyCache
from services.auth.metering import UsageRecord, UsageRecorder, recorder_from_settings
from services.auth.ratelimit import RECLAIM_CHANNEL, Admission, Admitter
from services.auth.routes import RouteTable
from services.auth.servicer import AuthServicer
from services.auth.sessions import SessionVerifier
from services.auth.store import ApiKeyRecord, AuthStore
from services.common.errors import Unauthenticated
from services.common.h2limits import H2Limits
from services.common.h2unary import H2UnaryServer
from services.common.identity import Identity, IdentityInterceptor, IdentitySettings, access_log_token
from services.common.server import LazyPool, Probe, ServiceServer, SideListener, bind
from services.common.settings import env_settings


class KeyMeter:
    """KeyMeter admits a directly presented key (ValidateApiKey) exactly as Check admits one.

    The same Admitter counts the request against the key's per-minute limit and monthly quota,
    and the call gets a usage row like a request through the gateway. Only the gateway's access
    log knows a response's status and time; a direct call's row is written at admission, with
    HTTP status 200 (every gRPC response has it), no gRPC status and a response time of 0.
    """

    def __init__(self, admitter: Admitter, recorder: UsageRecorder, clock: quota.Clock) -> None:
        self._admitter = admitter
        self._recorder = recorder
        self._clock = clock

    async def admit(self, record: ApiKeyRecord, endpoint: str) -> Admission:
        """admit counts one request against `record`'s limits and meters it, or raises ResourceExhausted."""
        admission = await self._admitter.admit(record.id)
        if admission.revoked or not admission.found:
            raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
        if not admission.admitted:
            raise limit_error(admission, record)
        self._recorder.submit(
            UsageRecord(
                user_id=record.user_id,
                key_id=record.id,
                endpoint=(endpoint or "/")[:MAX_ENDPOINT_CHARS],
                method="POST",
                status_code=200,
                grpc_status=None,
                response_time_ms=0,
                request_id=None,
                occurred_at=self._clock.now(),
            )
        )
        return admission


class _InProcessValidator:
    """_InProcessValidator checks credentials presented directly to the auth process, in process.

    An API key is admitted against its limits for every call, as a direct call to any other
    service is (through ValidateApiKey).
    """

    def __init__(self, servicer: AuthServicer) -> None:
        self._servicer = servicer

    async def validate(self, credential: str, permission: str, method: str) -> Identity:
        """validate returns the identity a session JWT or API key proves, after admitting a key."""
        return await self._servicer.resolver.identity_for(credential, endpoint=method)


log = logging.getLogger("kotadb.auth.server")

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
HEALTH_PATH = "/grpc.health.v1.Health/Check"


def build(
    settings: AuthSettings | None = None,
    *,
    identity: IdentitySettings | None = None,
    clock: quota.Clock | None = None,
) -> ServiceServer:
    """build assembles the auth server from `settings` (default: the environment); it is not started.

    `identity` defaults to the environment (KOTADB_IDENTITY_KEY); `clock` defaults to the system
    clock shifted by `check_clock_offset`. Check and AuthService read the same clock, so key
    states and usage reports agree with what Check enforces.
    """
    settings = settings if settings is not None else env_settings(AuthSettings)
    identity = identity if identity is not None else env_settings(IdentitySettings)
    clock = clock if clock is not None else quota.SystemClock(settings.check_clock_offset)
    pool = LazyPool(settings)
    store = AuthStore(pool)

    admitter = Admitter(
        pool,
        clock,
        lease_ttl=settings.lease_ttl,
        lease_span=settings.lease_span,
        lease_max=settings.lease_max,
        idle_return=settings.lease_idle_return,
        db_timeout=settings.check_deadline,
    )

    def key_changed(key_id: uuid.UUID | None) -> None:
        if key_id is None:
            admitter.drop_all()
        else:
            admitter.drop(key_id)

    def reclaim(payload: str) -> None:
        with contextlib.suppress(ValueError):
            admitter.reclaim(uuid.UUID(payload))

    cache = KeyCache(
        pool,
        settings.database_url,
        ttl=settings.key_cache_ttl,
        negative_ttl=settings.key_cache_negative_ttl,
        max_entries=settings.key_cache_size,
        db_timeout=settings.check_deadline,
        on_change=key_changed,
        channels={RECLAIM_CHANNEL: reclaim},
    )
    sessions = SessionVerifier(settings)
    codec = identity.codec()
    authorizer = Authorizer(
        routes=RouteTable(),
        cache=cache,
        admitter=admitter,
        sessions=sessions,
        codec=codec,
        clock=clock,
    )
    recorder = recorder_from_settings(pool, settings)
    meter = KeyMeter(admitter, recorder, clock)
    servicer = AuthServicer(store, settings, now=clock.now, meter=meter, verifier=sessions)
    check = AuthorizationServicer(authorizer, deadline=settings.check_deadline)
    server: ServiceServer | None = None

    def health(message: bytes, metadata: Mapping[str, str]) -> bytes:
        serving = server is not None and server.serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return bytes(health_pb2.HealthCheckResponse(status=status).SerializeToString())

    lean = H2UnaryServer(
        {CHECK_PATH: check.check_bytes, HEALTH_PATH: health},
        limits=H2Limits(
            max_message=settings.check_max_message, max_connections=settings.check_max_connections
        ),
        name="auth-check",
        service=AuthSettings.service_name,
    )

    async def start_background() -> None:
        cache.start()
        await recorder.start()

    async def flush_usage(wait: float) -> None:
        await recorder.close(within=wait)

    async def stop_checks(wait: float) -> None:
        log.info(
            "check listener totals",
            extra={
                "fields": {
                    "calls": lean.calls,
                    "errors": lean.errors,
                    "connections": lean.connections,
                    "hpack_decodes": lean.hpack_decodes,
                    "admitted_from_memory": admitter.fast,
                    "lease_calls": admitter.calls,
                    "settle_calls": admitter.settles,
                }
            },
        )
        await admitter.close()
        await cache.close()

    server = ServiceServer(
        AuthSettings.service_name,
        settings,
        pool=pool,
        bindings=[
            bind(
                auth_pb2.DESCRIPTOR, "AuthService", auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer
            ),
            bind(
                external_auth_pb2.DESCRIPTOR,
                "Authorization",
                external_auth_pb2_grpc.add_AuthorizationServicer_to_server,
                check,
            ),
            access_log_binding(AccessLogServicer(recorder, access_log_token(identity.identity_key))),
        ],
        probes=[Probe("schema", store.check_ready), Probe("usage_queue", recorder.check_ready)],
        identity=[IdentityInterceptor(codec, _InProcessValidator(servicer))],
        on_start=[start_background],
        on_stop=[flush_usage, stop_checks],
        listeners=[SideListener("check", lean, settings.check_port, settings.check_host)],
    )
    return server
