"""Envoy's gRPC access log becomes usage rows: entry rules, then a real Envoy feeding a real servicer.

The second half runs a small real Envoy (its own config, ext_authz off) in front of an in-process
gRPC server that is both the upstream and the access-log receiver. With ext_authz off the test
client sets the tenant and key-id headers itself, standing in for what `Check` adds, so what is
tested here is the metering path alone: Envoy → AccessLogService → UsageRecorder → Postgres.
The full gateway with `Check` is exercised in test_usage_shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2, wrappers_pb2
from kotadb.v1 import health_pb2, health_pb2_grpc

from services.auth.accesslog import AccessLogServicer, access_log_binding, usage_from_entry
from services.auth.metering import UsageRecorder
from services.cli import gateway, status
from services.common.identity import ACCESS_LOG_TOKEN_HEADER, access_log_token
from services.common.pgembed import free_port
from services.common.server import LazyPool, ServiceServer
from services.common.settings import ServiceSettings
from services.common.supervisor import Supervisor
from tests.conftest import UserFactory

START = datetime.datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=datetime.UTC)
TENANT = uuid.UUID("11111111-2222-4333-8444-555555555555")
KEY = uuid.UUID("66666666-7777-4888-9999-aaaaaaaaaaaa")


def _entry(
    *,
    headers: dict[str, str] | None = None,
    path: str = "/kotadb.v1.SearchService/SearchCode",
    original_path: str = "",
    code: int | None = 200,
    details: str = "via_upstream",
    trailers: dict[str, str] | None = None,
    response_headers: dict[str, str] | None = None,
    duration_us: int | None = 1500,
    intermediate: bool = False,
    log_type: int = accesslog_pb2.AccessLogType.DownstreamEnd,
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.start_time.CopyFrom(timestamp_pb2.Timestamp())
    common.start_time.FromDatetime(START)
    if duration_us is not None:
        common.duration.CopyFrom(duration_pb2.Duration(nanos=duration_us * 1000))
    common.intermediate_log_entry = intermediate
    common.access_log_type = log_type
    request = entry.request
    request.request_method = base_pb2.POST
    request.path = path
    request.original_path = original_path
    request.request_id = "req-1"
    default = {"x-kotadb-tenant": str(TENANT), "x-kotadb-key-id": str(KEY)}
    request.request_headers.update(default if headers is None else headers)
    if code is not None:
        entry.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=code))
    entry.response.response_code_details = details
    entry.response.response_trailers.update(trailers or {})
    entry.response.response_headers.update(response_headers or {})
    return entry


def test_an_admitted_request_becomes_a_record_with_every_field() -> None:
    record = usage_from_entry(_entry(original_path="/v1/code:search?x=1", trailers={"grpc-status": "5"}))
    assert record is not None
    assert record.user_id == TENANT
    assert record.key_id == KEY
    assert record.endpoint == "/kotadb.v1.SearchService/SearchCode"
    assert record.method == "POST"
    assert record.status_code == 200
    assert record.grpc_status == 5
    assert record.response_time_ms == 2  # 1.5 ms, rounded up
    assert record.request_id == "req-1"
    assert record.occurred_at == START


def test_a_transcoded_rest_call_keeps_its_http_method() -> None:
    headers = {"x-kotadb-tenant": str(TENANT), "x-kotadb-key-id": str(KEY), "x-envoy-original-method": "GET"}
    record = usage_from_entry(_entry(headers=headers, original_path="/v1/index"))
    assert record is not None and record.method == "GET"


def test_grpc_status_of_a_trailers_only_reply_comes_from_the_headers() -> None:
    record = usage_from_entry(_entry(response_headers={"grpc-status": "16"}))
    assert record is not None and record.grpc_status == 16
    plain = usage_from_entry(_entry())
    assert plain is not None and plain.grpc_status is None


def test_a_client_that_left_before_the_answer_is_status_zero() -> None:
    record = usage_from_entry(_entry(code=None, details="downstream_remote_disconnect"))
    assert record is not None and record.status_code == 0


def test_a_session_caller_has_no_key_id() -> None:
    record = usage_from_entry(_entry(headers={"x-kotadb-tenant": str(TENANT), "x-kotadb-key-id": ""}))
    assert record is not None and record.key_id is None and record.user_id == TENANT


@pytest.mark.parametrize(
    ("why", "entry"),
    [
        ("no tenant header: Check did not admit it", _entry(headers={"x-kotadb-key-id": str(KEY)})),
        ("a tenant that is not a user id", _entry(headers={"x-kotadb-tenant": "admin"})),
        ("refused by ext_authz", _entry(code=401, details="ext_authz_denied")),
        ("auth service unreachable", _entry(code=403, details="ext_authz_error")),
        ("health answers without Check", _entry(path="/health")),
        (
            "the webhook route skips Check",
            _entry(
                path="/kotadb.v1.IngestService/ReceiveGithubWebhook", original_path="/v1/webhooks/github/r"
            ),
        ),
        ("an intermediate entry of a long stream", _entry(intermediate=True)),
        ("a periodic entry", _entry(log_type=accesslog_pb2.AccessLogType.DownstreamPeriodic)),
    ],
)
def test_entries_that_are_not_metered(why: str, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
    assert usage_from_entry(entry) is None, why


# --- through a real Envoy ------------------------------------------------------------------------


TOKEN = access_log_token("accesslog-tests-identity-key-0123456789abcdef")


def _envoy_config(listen: int, admin: int, backend: int) -> str:
    """_envoy_config routes everything to `backend` and streams access logs to it as well."""
    cluster = {
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": backend}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    access_log = {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "kotadb-usage",
                "transport_api_version": "V3",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": "backend"},
                    "initial_metadata": [{"key": ACCESS_LOG_TOKEN_HEADER, "value": TOKEN}],
                },
                "buffer_flush_interval": "0.05s",
            },
            "additional_request_headers_to_log": ["x-kotadb-key-id", "x-kotadb-tenant", "x-request-id"],
            "additional_response_headers_to_log": ["grpc-status"],
            "additional_response_trailers_to_log": ["grpc-status"],
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "metering",
        "codec_type": "AUTO",
        "access_log": [access_log],
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                }
            ]
        },
    }
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "metering",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }
    return json.dumps(config, indent=1)  # JSON is YAML, and Envoy reads either


@dataclass
class Metered:
    """Metered is the running rig: Envoy's gRPC target, the servicer and the recorder behind it."""

    target: str
    servicer: AccessLogServicer
    recorder: UsageRecorder
    backend: int


@pytest.fixture(scope="module")
async def metered(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Metered]:
    workdir: Path = tmp_path_factory.mktemp("accesslog")
    settings = ServiceSettings(database_url=database_url, port=0, metrics_port=0, shutdown_grace=1.0)
    pool = LazyPool(settings)
    recorder = UsageRecorder(pool, flush_interval=3600)  # the tests flush explicitly
    servicer = AccessLogServicer(recorder, TOKEN)
    server = ServiceServer("metering-test", settings, pool=pool, bindings=[access_log_binding(servicer)])
    backend = await server.start()
    await pool.connect()
    listen, admin = free_port(), free_port()
    config_path = workdir / "envoy.yaml"
    config_path.write_text(_envoy_config(listen, admin, backend))
    argv = [gateway.find_envoy(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
    try:
        with Supervisor(grace=10) as supervisor:
            envoy = supervisor.spawn("envoy", argv, log_path=workdir / "envoy.log")
            ready = functools.partial(status.probe_http, f"http://127.0.0.1:{admin}/ready")
            for _ in range(600):
                if (await asyncio.to_thread(ready))[0]:
                    break
                assert envoy.alive(), envoy.log_tail()
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"envoy not ready:\n{envoy.log_tail()}")
            yield Metered(f"127.0.0.1:{listen}", servicer, recorder, backend)
    finally:
        await recorder.close()
        await server.stop(grace=1.0)


async def _new_key(pool: asyncpg.Pool, user_id: uuid.UUID) -> uuid.UUID:
    key_id: uuid.UUID = await pool.fetchval(
        "insert into public.api_keys (user_id, name, key_prefix, key_hash)"
        " values ($1, 'accesslog test', 'kdb_test_abcdef', $2) returning id",
        user_id,
        uuid.uuid4().hex,
    )
    return key_id


async def _until_entries(metered: Metered, count: int) -> None:
    for _ in range(3000):
        if metered.servicer.entries >= count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"Envoy delivered {metered.servicer.entries} access-log entries, expected {count}")


async def test_rows_match_the_requests_sent_through_envoy(
    metered: Metered, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user_id = await user_factory()
    key_id = await _new_key(pool, user_id)
    admitted = [("x-kotadb-tenant", str(user_id)), ("x-kotadb-key-id", str(key_id))]
    before = metered.servicer.entries
    request_ids: set[str] = set()
    async with grpc.aio.insecure_channel(metered.target) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        missing = channel.unary_unary(
            "/kotadb.v1.SearchService/SearchCode",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        for _ in range(7):
            call = stub.GetHealth(health_pb2.GetHealthRequest(), metadata=admitted, timeout=10)
            await call
            request_ids.add(str(dict(await call.trailing_metadata())["x-request-id"]))
        for _ in range(3):
            failing = missing(b"", metadata=admitted, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await failing
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Not admitted (no tenant): logged by Envoy, never metered.
        for _ in range(4):
            await stub.GetHealth(health_pb2.GetHealthRequest(), metadata=[("x-kotadb-key-id", str(key_id))])
    await _until_entries(metered, before + 14)
    await metered.recorder.flush()

    rows = await pool.fetch(
        "select * from public.usage_metrics where key_id = $1 order by occurred_at, id", key_id
    )
    assert len(rows) == 10
    assert all(row["user_id"] == user_id and row["method"] == "POST" for row in rows)
    assert all(row["status_code"] == 200 and row["response_time_ms"] > 0 for row in rows)
    health = [row for row in rows if row["endpoint"] == "/kotadb.v1.HealthService/GetHealth"]
    search = [row for row in rows if row["endpoint"] == "/kotadb.v1.SearchService/SearchCode"]
    assert len(health) == 7 and len(search) == 3
    assert {row["grpc_status"] for row in health} == {grpc.StatusCode.OK.value[0]}
    assert {row["grpc_status"] for row in search} == {grpc.StatusCode.UNIMPLEMENTED.value[0]}
    assert {row["request_id"] for row in health} == request_ids
    last_used = await pool.fetchval("select last_used_at from public.api_keys where id = $1", key_id)
    assert last_used == max(row["occurred_at"] for row in rows)


async def test_headers_naming_someone_elses_key_charge_nobody(
    metered: Metered, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    victim = await user_factory()
    victim_key = await _new_key(pool, victim)
    forger = await user_factory()
    before = metered.servicer.entries
    async with grpc.aio.insecure_channel(metered.target) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        forged = [("x-kotadb-tenant", str(forger)), ("x-kotadb-key-id", str(victim_key))]
        for _ in range(3):
            await stub.GetHealth(health_pb2.GetHealthRequest(), metadata=forged, timeout=10)
    await _until_entries(metered, before + 3)
    await metered.recorder.flush()
    count = await pool.fetchval(
        "select count(*) from public.usage_metrics where key_id = $1 or user_id = $2", victim_key, forger
    )
    assert count == 0


async def test_a_stream_without_the_gateway_token_is_refused(
    metered: Metered, pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    # Whoever reaches auth's port directly must not be able to write usage rows for a tenant.
    user_id = await user_factory()
    key_id = await _new_key(pool, user_id)
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_headers.update({"x-kotadb-tenant": str(user_id), "x-kotadb-key-id": str(key_id)})
    entry.request.path = "/kotadb.v1.SearchService/SearchCode"
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    refused_before = metered.servicer.refused
    for metadata in ((), ((ACCESS_LOG_TOKEN_HEADER, "not-the-token"),)):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{metered.backend}") as channel:
            stream = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(
                metadata=metadata, timeout=10
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stream.write(message)
                await stream.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stream
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert metered.servicer.refused == refused_before + 2
    await metered.recorder.flush()
    assert await pool.fetchval("select count(*) from public.usage_metrics where key_id = $1", key_id) == 0
