"""AuthSettings: the auth service's configuration, read from `KOTADB_AUTH_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class AuthSettings(ServiceSettings):
    """AuthSettings configures the auth process; later auth work adds its key and quota settings here."""

    env_prefix: ClassVar[str] = "KOTADB_AUTH_"
    service_name: ClassVar[str] = "auth"

    port: int = setting(50051, minimum=0, help="gRPC port of the auth service; 0 picks a free one.")
    metrics_port: int = setting(
        9461,
        minimum=0,
        help="Prometheus `GET /metrics` port of the auth service; 0 picks a free one.",
    )
    check_port: int = setting(
        50055,
        minimum=0,
        help="Port of the lean HTTP/2 listener serving only Check (Envoy's ext_authz); 0 picks a free one.",
    )
    check_host: str = setting(
        "127.0.0.1",
        help="Address the Check listener binds (not `KOTADB_AUTH_HOST`); only Envoy may reach it.",
    )
    check_max_message: int = setting(
        64 << 10, minimum=1, help="Largest Check request message (bytes); larger ones are refused unread."
    )
    check_max_connections: int = setting(
        1024, minimum=1, help="Most connections open on the Check listener; more are closed at once."
    )

    # Keys and sessions (A-keys): session JWT verification, rotation grace, limits users may pick.
    jwt_secret: str = setting(
        "", help="HS256 secret of the Supabase project's session JWTs; empty disables HS256."
    )
    jwks: str = setting(
        "", help="JWKS file path or https URL with the project's asymmetric JWT signing keys."
    )
    jwt_audience: str = setting("authenticated", help="Required `aud` of user session JWTs.")
    jwt_leeway: float = setting(5.0, minimum=0, help="Seconds of clock skew tolerated on JWT exp/nbf/iat.")
    rotation_grace: float = setting(86400.0, minimum=0, help="Default seconds a rotated key keeps working.")
    default_rate_limit: int = setting(
        60, minimum=1, help="Per-minute rate limit of keys created without one."
    )
    default_monthly_quota: int = setting(100000, minimum=1, help="Monthly quota of keys created without one.")
    max_rate_limit: int = setting(
        6000, minimum=1, help="Highest per-minute rate limit a user or admin key may set."
    )
    max_monthly_quota: int = setting(
        10_000_000,
        minimum=1,
        help="Highest monthly quota a user or admin key may set; the service role is exempt.",
    )

    # Usage metering (A-meter): batches of access-log rows into usage_metrics (auth/metering.py).
    usage_flush_interval: float = setting(
        0.2, minimum=0.001, help="Seconds between usage_metrics batch writes; a crash loses at most this."
    )
    usage_batch_size: int = setting(500, minimum=1, help="Most usage rows written in one batch.")
    usage_max_queued: int = setting(
        100_000, minimum=1, help="Usage rows held in memory while the database is unreachable."
    )

    # Check (A-check): key cache, admission, identity signing (auth/check.py, keycache.py, ratelimit.py).
    key_cache_ttl: float = setting(
        30.0,
        minimum=0.0,
        help="Seconds Check caches a key it looked up; changes still evict it at once (NOTIFY).",
    )
    key_cache_negative_ttl: float = setting(
        2.0, minimum=0.0, help="Seconds Check remembers that a well-formed key does not exist."
    )
    key_cache_size: int = setting(100_000, minimum=1, help="Most keys Check keeps cached.")
    lease_ttl: float = setting(
        1.0,
        minimum=0.2,
        help="Seconds a block of leased admission tokens lives (a crashed replica's block stays counted).",
    )
    lease_span: float = setting(
        0.1, minimum=0.0, help="Seconds of a key's recent demand one lease asks for (block size)."
    )
    lease_max: int = setting(1000, minimum=1, help="Most tokens one lease may reserve for a key.")
    lease_idle_return: float = setting(
        0.2, minimum=0.01, help="Seconds a key may sit idle before its unused leased tokens are returned."
    )
    check_deadline: float = setting(
        1.5,
        minimum=0.1,
        help="Seconds Check may wait on the database for one request (each statement, and all of them) "
        "before failing closed with 503 DATABASE_UNAVAILABLE; keep it under Envoy's 2 s ext_authz timeout.",
    )
    check_clock_offset: float = setting(
        0.0,
        help="Seconds added to the clock Check uses for rate windows and quota months (tests only).",
    )
