"""A key presented directly to a service is admitted exactly like a request through the gateway.

Real auth and search servers on loopback, real Postgres. The gateway's path is auth's `Check`
(called over gRPC as Envoy calls it); the direct path is an API key in the metadata of a call
to the search service (checked through auth's `ValidateApiKey`) or to the auth service itself
(checked in process). Both paths share one admitter, so a 20-per-minute key spent on one path
is refused on the other with RESOURCE_EXHAUSTED, and every directly admitted call leaves a
usage row. The services cache auth's answer for session JWTs only; with a 5-second credential
cache configured here, every direct call must still be admitted.

The auth clock is fixed mid-minute, so the window cannot turn during the test.
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from kotadb.v1 import auth_pb2, auth_pb2_grpc, search_pb2, search_pb2_grpc

from services.auth import quota
from services.auth.config import AuthSettings
from services.auth.server import build as build_auth
from services.common.identity import IdentitySettings
from services.search.config import SearchSettings
from services.search.server import build as build_search
from tests.auth.test_ratelimit import insert_key
from tests.runtime.rpc import status_details, unpack_details

KEY = "direct-admission-tests-key-0123456789abcdef"
STATUS_METHOD = "/kotadb.v1.SearchService/GetIndexStatus"
REFUSALS = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
)


@dataclass
class Stack:
    """Stack is an auth server and a search server that checks direct keys through it."""

    auth: grpc.aio.Channel
    search: grpc.aio.Channel

    async def direct_search(self, secret: str) -> tuple[grpc.StatusCode, str]:
        stub = search_pb2_grpc.SearchServiceStub(self.search)
        metadata = [("authorization", f"Bearer {secret}")]
        return await _outcome(
            stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), metadata=metadata, timeout=10)
        )

    async def direct_auth(self, secret: str) -> tuple[grpc.StatusCode, str]:
        stub = auth_pb2_grpc.AuthServiceStub(self.auth)
        metadata = [("authorization", f"Bearer {secret}")]
        return await _outcome(stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=metadata, timeout=10))

    async def gateway(self, secret: str) -> tuple[int, str]:
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path = "GET", "/v1/index"
        http.headers.update({"authorization": f"Bearer {secret}", "x-request-id": uuid.uuid4().hex})
        answer = await external_auth_pb2_grpc.AuthorizationStub(self.auth).Check(request, timeout=10)
        if answer.HasField("ok_response"):
            return 200, ""
        reason = {h.header.key: h.header.value for h in answer.denied_response.headers}[
            "x-kotadb-error-reason"
        ]
        return int(answer.denied_response.status.code), reason


async def _outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        details = unpack_details(status_details(exc))
        info = details.get("ErrorInfo")
        return exc.code(), str(info.reason) if info is not None else ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    clock = quota.FixedClock(datetime.datetime(2031, 6, 12, 8, 30, 20, tzinfo=datetime.UTC))
    auth = build_auth(
        AuthSettings(
            database_url=database_url,
            port=0,
            metrics_port=0,
            check_port=0,
            readiness_interval=0.2,
            shutdown_grace=1.0,
        ),
        identity=IdentitySettings(identity_key=KEY),
        clock=clock,
    )
    auth_port = await auth.start()
    search = build_search(
        SearchSettings(
            database_url=database_url,
            port=0,
            metrics_port=0,
            readiness_interval=0.2,
            shutdown_grace=1.0,
            data_dir=tmp_path / "index",
        ),
        identity=IdentitySettings(
            identity_key=KEY, auth_address=f"127.0.0.1:{auth_port}", credential_cache_ttl=5
        ),
    )
    search_port = await search.start()
    # Both ready (database reached, schema present), so no call races the pools' first connect.
    for _ in range(600):
        if auth.serving and search.serving:
            break
        await asyncio.sleep(0.05)
    assert auth.serving and search.serving
    auth_channel = grpc.aio.insecure_channel(f"127.0.0.1:{auth_port}")
    search_channel = grpc.aio.insecure_channel(f"127.0.0.1:{search_port}")
    try:
        yield Stack(auth_channel, search_channel)
    finally:
        await search_channel.close(None)
        await auth_channel.close(None)
        await search.stop(1.0)
        await auth.stop(1.0)


async def _rows(pool: asyncpg.Pool, key_id: uuid.UUID, expected: int) -> list[asyncpg.Record]:
    """_rows waits for the usage writer's batches, then returns the key's usage rows."""
    deadline = time.monotonic() + 30
    while True:
        rows = await pool.fetch("select * from public.usage_metrics where key_id = $1", key_id)
        if len(rows) >= expected or time.monotonic() > deadline:
            return list(rows)
        await asyncio.sleep(0.1)


async def test_a_key_spent_directly_is_refused_by_the_gateway_and_metered(
    stack: Stack, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    secret, key_id = await insert_key(pool, user, rate_limit=20)
    for call in range(20):
        code, reason = await stack.direct_search(secret)
        assert code not in REFUSALS, (call, code, reason)
    assert await stack.direct_search(secret) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert await stack.gateway(secret) == (429, "RATE_LIMITED")

    rows = await _rows(pool, key_id, 20)
    assert len(rows) == 20
    assert {(row["user_id"], row["endpoint"], row["status_code"]) for row in rows} == {
        (user, STATUS_METHOD, 200)
    }
    assert await pool.fetchval("select usage_count from public.api_keys where id = $1", key_id) == 20


async def test_a_key_spent_through_the_gateway_is_refused_directly(
    stack: Stack, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    secret, _ = await insert_key(pool, user, permissions=("read", "admin"), rate_limit=20)
    for call in range(20):
        assert await stack.gateway(secret) == (200, ""), call
    assert await stack.gateway(secret) == (429, "RATE_LIMITED")
    # The report: after the gateway spent the key, 100 direct calls to auth succeeded.
    for _ in range(3):
        assert await stack.direct_search(secret) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert await stack.direct_auth(secret) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


async def test_direct_calls_to_auth_count_against_the_same_window(
    stack: Stack, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    secret, key_id = await insert_key(pool, user, permissions=("read", "admin"), rate_limit=20)
    for call in range(10):
        assert (await stack.direct_auth(secret))[0] == grpc.StatusCode.OK, call
        assert (await stack.direct_search(secret))[0] not in REFUSALS, call
    assert await stack.direct_auth(secret) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert await stack.gateway(secret) == (429, "RATE_LIMITED")
    rows = await _rows(pool, key_id, 20)
    assert sorted({row["endpoint"] for row in rows}) == ["/kotadb.v1.AuthService/ListApiKeys", STATUS_METHOD]
    assert len(rows) == 20
