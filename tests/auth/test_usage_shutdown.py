"""Usage rows through the real gateway, written on SIGTERM from a full queue.

A real `kotadb serve auth` (its usage batch window set to an hour, so nothing is written while
traffic flows), a real `kotadb serve search` as the upstream, and a real Envoy rendered from the
gateway template with ext_authz on and the gRPC access log pointed at auth. Requests go through
Envoy over REST and native gRPC, with a valid key, without one and with a malformed one. Once
the auth process reports every admitted request received, the table is still empty (the queue
is full); then SIGTERM: the auth process must write every queued row before it exits, one per
admitted request, matching what the client saw, and `usage_count` must equal the number of rows.
"""

from __future__ import annotations

import functools
import json
import secrets
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.auth.config import AuthSettings
from services.auth.management import KeyManager, KeySpec
from services.auth.store import AuthStore
from services.common.identity import READ, Identity
from services.common.settings import env_settings
from services.common.supervisor import Supervisor
from tests.conftest import UserFactory
from tests.gatewayhttp import http
from tests.harness import serve, service_env, start_envoy, wait_gateway_healthy, wait_until

INDEX_METHOD = "/kotadb.v1.SearchService/GetIndexStatus"


def _metered(log_path: Path) -> int:
    """_metered is how many admitted requests the auth process says its access-log receiver queued.

    Envoy's own `logs_written` stat counts entries put in its buffer, not entries sent, so the
    auth side's running total (a DEBUG line per access-log message) is what proves delivery.
    """
    totals = [0]
    for line in log_path.read_text(errors="replace").splitlines():
        if '"access-log entries received"' in line:
            totals.append(int(json.loads(line)["metered"]))
    return max(totals)


async def _issue_key(pool: asyncpg.Pool, user_id: uuid.UUID) -> tuple[str, uuid.UUID]:
    manager = KeyManager(AuthStore(pool), env_settings(AuthSettings, environ={}))
    spec = KeySpec("shutdown test", frozenset({READ}), rate_limit=1000, monthly_quota=1000)
    issued = await manager.create(Identity.service(), spec, user_id=user_id)
    return issued.secret, issued.record.id


async def test_sigterm_writes_every_queued_usage_row(
    database_url: str, pool: asyncpg.Pool, user_factory: UserFactory, tmp_path: Path
) -> None:
    user_id = await user_factory()
    # One key for REST and one for native gRPC, so each side's rows can be told apart.
    key, key_id = await _issue_key(pool, user_id)
    grpc_key, grpc_key_id = await _issue_key(pool, user_id)
    identity_key = secrets.token_hex(32)
    env = service_env(
        database_url,
        tmp_path,
        identity_key,
        # Nothing is written until shutdown: the whole run stays queued in the auth process.
        KOTADB_AUTH_USAGE_FLUSH_INTERVAL="3600",
        KOTADB_AUTH_USAGE_BATCH_SIZE="100000",
        KOTADB_AUTH_USAGE_MAX_QUEUED="100000",
        KOTADB_AUTH_SHUTDOWN_GRACE="2",
        KOTADB_LOG_LEVEL="DEBUG",
    )
    with Supervisor(grace=20) as supervisor:
        auth, auth_child = serve(supervisor, tmp_path, "auth", "auth", env)
        search, _ = serve(supervisor, tmp_path, "search", "search", env)
        envoy = start_envoy(
            supervisor, tmp_path, "envoy", auth=auth, ingest=search, search=search, identity_key=identity_key
        )
        wait_gateway_healthy(envoy, supervisor)
        url = envoy.url

        rest_statuses = Counter(http("GET", f"{url}/v1/index", key)[0] for _ in range(12))
        refused = [http("GET", f"{url}/v1/index", None)[0] for _ in range(3)]
        refused += [http("GET", f"{url}/v1/index", "kdb_live_not-a-key")[0] for _ in range(3)]
        assert refused == [401] * 6
        grpc_codes: Counter[int] = Counter()
        with grpc.insecure_channel(envoy.target) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for _ in range(8):
                try:
                    stub.GetIndexStatus(
                        search_pb2.GetIndexStatusRequest(),
                        metadata=(("authorization", f"Bearer {grpc_key}"),),
                        timeout=30,
                    )
                except grpc.RpcError as exc:
                    grpc_codes[exc.code().value[0]] += 1
                else:
                    grpc_codes[0] += 1
        delivered = functools.partial(_metered, tmp_path / "auth.log")
        wait_until("access-log delivery", lambda: (delivered() >= 20, f"{delivered()} metered"), supervisor)

        written = "select count(*) from public.usage_metrics where key_id = any($1::uuid[])"
        assert await pool.fetchval(written, [key_id, grpc_key_id]) == 0
        assert auth_child.stop(grace=30) == 0, auth_child.log_tail()

    rest = await pool.fetch("select * from public.usage_metrics where key_id = $1", key_id)
    native = await pool.fetch("select * from public.usage_metrics where key_id = $1", grpc_key_id)
    assert (len(rest), len(native)) == (12, 8), "one row per admitted request, none for the 6 refused"
    rows = [*rest, *native]
    assert {row["endpoint"] for row in rows} == {INDEX_METHOD}
    assert all(row["user_id"] == user_id and row["response_time_ms"] > 0 for row in rows)
    assert all(row["request_id"] for row in rows)
    assert Counter(row["status_code"] for row in rest) == rest_statuses
    # The transcoder sends REST calls upstream as POST; the client's method survives in
    # x-envoy-original-method, which the gateway's access log carries to the meter.
    assert {row["method"] for row in rest} == {"GET"}
    assert {(row["method"], row["status_code"]) for row in native} == {("POST", 200)}
    assert Counter(row["grpc_status"] for row in native) == grpc_codes
    for key_used, count in ((key_id, 12), (grpc_key_id, 8)):
        usage_count = await pool.fetchval("select usage_count from public.api_keys where id = $1", key_used)
        assert usage_count == count
