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
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.auth.config import AuthSettings
from services.auth.management import KeyManager, KeySpec
from services.auth.principal import READ, Principal
from services.auth.store import AuthStore
from services.cli import gateway, status
from services.common.pgembed import free_port
from services.common.settings import env_settings
from services.common.supervisor import ChildProcess, Supervisor
from tests.conftest import UserFactory

READY_LIMIT = 180.0
INDEX_METHOD = "/kotadb.v1.SearchService/GetIndexStatus"


def _wait(what: str, probe: Callable[[], tuple[bool, str]], children: list[ChildProcess]) -> None:
    deadline = time.monotonic() + READY_LIMIT
    detail = ""
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive():
                pytest.fail(f"{child.name} exited ({child.returncode}):\n{child.log_tail()}")
        ok, detail = probe()
        if ok:
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready after {READY_LIMIT}s: {detail}")


def _port_probe(path: Path) -> tuple[bool, str]:
    text = path.read_text().strip() if path.exists() else ""
    return text.isdigit(), f"waiting for {path}"


def _serve(
    supervisor: Supervisor, service: str, workdir: Path, env: dict[str, str]
) -> tuple[str, ChildProcess]:
    port_file = workdir / f"{service}.port"
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        service,
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    child = supervisor.spawn(service, argv, log_path=workdir / f"{service}.log", env=env)
    _wait(f"{service} port", functools.partial(_port_probe, port_file), [child])
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    _wait(service, functools.partial(status.probe_grpc_health, address), [child])
    return address, child


def _http(url: str, key: str | None) -> int:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


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
    issued = await manager.create(Principal.service(), spec, user_id=user_id)
    return issued.secret, issued.record.id


async def test_sigterm_writes_every_queued_usage_row(
    database_url: str, pool: asyncpg.Pool, user_factory: UserFactory, tmp_path: Path
) -> None:
    user_id = await user_factory()
    # One key for REST and one for native gRPC, so each side's rows can be told apart.
    key, key_id = await _issue_key(pool, user_id)
    grpc_key, grpc_key_id = await _issue_key(pool, user_id)
    env = dict(os.environ, KOTADB_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    env.update(
        KOTADB_IDENTITY_KEY=secrets.token_hex(32),
        KOTADB_SEARCH_DATA_DIR=str(tmp_path / "search"),
        # Nothing is written until shutdown: the whole run stays queued in the auth process.
        KOTADB_AUTH_USAGE_FLUSH_INTERVAL="3600",
        KOTADB_AUTH_USAGE_BATCH_SIZE="100000",
        KOTADB_AUTH_USAGE_MAX_QUEUED="100000",
        KOTADB_AUTH_SHUTDOWN_GRACE="2",
        KOTADB_LOG_LEVEL="DEBUG",
    )
    with Supervisor(grace=20) as supervisor:
        auth, auth_child = _serve(supervisor, "auth", tmp_path, env)
        search, _ = _serve(supervisor, "search", tmp_path, env)
        port, admin_port = free_port(), free_port()
        config = gateway.GatewayConfig(
            gateway_port=port, admin_port=admin_port, auth=auth, ingest=search, search=search, ext_authz=True
        )
        config_path = tmp_path / "envoy.yaml"
        config_path.write_text(gateway.render(config))
        argv = [gateway.find_envoy(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
        envoy = supervisor.spawn("envoy", argv, log_path=tmp_path / "envoy.log")
        url = f"http://127.0.0.1:{port}"
        _wait("gateway /health", functools.partial(status.probe_http, f"{url}/health"), [envoy])

        rest_statuses = Counter(_http(f"{url}/v1/index", key) for _ in range(12))
        refused = [_http(f"{url}/v1/index", None) for _ in range(3)]
        refused += [_http(f"{url}/v1/index", "kdb_live_not-a-key") for _ in range(3)]
        assert refused == [401] * 6
        grpc_codes: Counter[int] = Counter()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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
        _wait("access-log delivery", lambda: (delivered() >= 20, f"{delivered()} metered"), [envoy])

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
    # The transcoder sends REST calls upstream as POST; the client's method survives only in
    # x-envoy-original-method, recorded when the gateway config logs that header.
    rest_method = "GET" if "x-envoy-original-method" in config_path.read_text() else "POST"
    assert {row["method"] for row in rest} == {rest_method}
    assert {(row["method"], row["status_code"]) for row in native} == {("POST", 200)}
    assert Counter(row["grpc_status"] for row in native) == grpc_codes
    for key_used, count in ((key_id, 12), (grpc_key_id, 8)):
        usage_count = await pool.fetchval("select usage_count from public.api_keys where id = $1", key_used)
        assert usage_count == count
