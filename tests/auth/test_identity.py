"""The signed identity and the interceptor every service runs, over real gRPC.

* The codec: round trip, wrong key, tampering, expiry and clock skew, malformed tokens.
* `IdentityInterceptor` on a real ServiceServer with a recording servicer: signed identities
  are accepted and exposed through `current_identity()`; forged, wrongly keyed and expired ones
  are ignored (UNAUTHENTICATED when nothing else is presented); permissions are enforced;
  health stays open.
* Direct API keys: the real search server (`services.search.server.build`) with a real auth
  server checking keys through `ValidateApiKey`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.auth.config import AuthSettings
from services.auth.server import build as build_auth
from services.common.errors import Unauthenticated
from services.common.identity import (
    IDENTITY_HEADER,
    Identity,
    IdentityCodec,
    IdentityInterceptor,
    IdentitySettings,
    current_identity,
    method_permission,
)
from services.common.server import LazyPool, ServiceServer, bind
from services.common.settings import ServiceSettings
from services.search.config import SearchSettings
from services.search.server import build as build_search
from tests.auth.test_ratelimit import insert_key
from tests.runtime.rpc import status_details, unpack_details

KEY = "identity-tests-key-0123456789abcdef-0123"
OTHER_KEY = "identity-tests-other-key-0123456789abcdef"


class Clock:
    """Clock is a settable Unix-seconds clock for the codec."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


STATUS = "/kotadb.v1.SearchService/GetIndexStatus"
SEARCH = "/kotadb.v1.SearchService/SearchCode"
STREAM = "/kotadb.v1.SearchService/StreamSearchCode"
REBUILD = "/kotadb.v1.SearchService/RebuildIndex"


def _sign(
    codec: IdentityCodec, permissions: frozenset[str] = frozenset({"read"}), method: str = STATUS
) -> tuple[str, uuid.UUID]:
    user = uuid.uuid4()
    token = codec.sign(
        user_id=user, kind="api_key", permissions=permissions, key_id=uuid.uuid4(), method=method
    )
    return token, user


def test_a_signed_identity_round_trips() -> None:
    codec = IdentityCodec(KEY)
    user, key_id = uuid.uuid4(), uuid.uuid4()
    token = codec.sign(
        user_id=user, kind="api_key", permissions=["write", "read"], key_id=key_id, method=SEARCH
    )
    identity = codec.verify(token, method=SEARCH)
    assert (identity.user_id, identity.key_id, identity.kind) == (user, key_id, "api_key")
    assert identity.permissions == frozenset({"read", "write"})
    # A request's identity lives seconds, not a minute: long enough for the hop to the service.
    assert identity.expires_at - identity.issued_at == 5


def test_a_signed_identity_is_good_for_its_own_method_only() -> None:
    codec = IdentityCodec(KEY)
    token, _ = _sign(codec, frozenset({"read", "write", "admin"}), method=STATUS)
    codec.verify(token, method=STATUS)
    for other in (SEARCH, REBUILD, "/kotadb.v1.IngestService/UpsertDocuments", ""):
        with pytest.raises(Unauthenticated) as replayed:
            codec.verify(token, method=other)
        assert replayed.value.reason == "IDENTITY_WRONG_METHOD", other


def test_the_default_lifetime_ends_within_seconds() -> None:
    clock = Clock(1_900_000_000.0)
    codec = IdentityCodec(KEY, clock=clock)
    token, _ = _sign(codec)
    clock.now += 5  # exp, still inside the one-second leeway
    codec.verify(token, method=STATUS)
    clock.now += 1.5
    with pytest.raises(Unauthenticated) as expired:
        codec.verify(token, method=STATUS)
    assert expired.value.reason == "IDENTITY_EXPIRED"


def test_wrong_key_tampering_and_garbage_are_refused() -> None:
    codec = IdentityCodec(KEY)
    token, _ = _sign(codec)
    with pytest.raises(Unauthenticated) as wrong:
        IdentityCodec(OTHER_KEY).verify(token, method=STATUS)
    assert wrong.value.reason == "IDENTITY_INVALID"
    body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["perm"] = ["admin", "read", "write"]
    raised = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for forged in (
        f"{raised}.{signature}",
        f"{body}.",
        body,
        "",
        "a.b.c",
        f"{body}.%%%",
        f"{body}.{signature}x",
    ):
        with pytest.raises(Unauthenticated) as caught:
            codec.verify(forged, method=STATUS)
        assert caught.value.reason == "IDENTITY_INVALID", forged


def test_expiry_and_clock_skew() -> None:
    clock = Clock(1_900_000_000.0)
    codec = IdentityCodec(KEY, ttl=60, leeway=5, clock=clock)
    token, _ = _sign(codec)
    clock.now += 64  # within exp + leeway
    codec.verify(token, method=STATUS)
    clock.now += 1
    with pytest.raises(Unauthenticated) as expired:
        codec.verify(token, method=STATUS)
    assert expired.value.reason == "IDENTITY_EXPIRED"
    clock.now = 1_900_000_000.0 - 6  # issued in this verifier's future, beyond the leeway
    with pytest.raises(Unauthenticated):
        codec.verify(token, method=STATUS)


def test_short_keys_are_rejected() -> None:
    with pytest.raises(ValueError):
        IdentityCodec("too-short")


def test_method_permissions() -> None:
    assert method_permission("/kotadb.v1.SearchService/SearchCode") == "read"
    assert method_permission("/kotadb.v1.SearchService/RebuildIndex") == "admin"
    assert method_permission("/kotadb.v1.IngestService/UpsertDocuments") == "write"
    assert method_permission("/kotadb.v1.IngestService/GetDocument") == "read"
    assert method_permission("/kotadb.v1.IngestService/ReceiveGithubWebhook") == ""
    assert method_permission("/kotadb.v1.AuthService/CreateApiKey") == "admin"
    assert method_permission("/kotadb.v1.AuthService/ValidateApiKey") == "service"
    assert method_permission("/other.Service/Method") is None


class RecordingServicer(search_pb2_grpc.SearchServiceServicer):
    """RecordingServicer remembers the identity each call ran with."""

    def __init__(self) -> None:
        self.seen: list[Identity | None] = []

    async def GetIndexStatus(self, request: Any, context: Any) -> search_pb2.IndexStatus:
        self.seen.append(current_identity())
        return search_pb2.IndexStatus()

    async def RebuildIndex(self, request: Any, context: Any) -> search_pb2.RebuildIndexResponse:
        self.seen.append(current_identity())
        return search_pb2.RebuildIndexResponse()

    async def SearchCode(self, request: Any, context: Any) -> search_pb2.SearchCodeResponse:
        self.seen.append(current_identity())
        return search_pb2.SearchCodeResponse()

    async def SearchSymbols(self, request: Any, context: Any) -> search_pb2.SearchSymbolsResponse:
        self.seen.append(current_identity())
        return search_pb2.SearchSymbolsResponse()

    async def StreamSearchCode(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.seen.append(current_identity())
        yield search_pb2.StreamSearchCodeResponse()


@pytest.fixture
async def guarded(database_url: str) -> AsyncIterator[tuple[grpc.aio.Channel, RecordingServicer]]:
    settings = ServiceSettings(
        database_url=database_url, port=0, metrics_port=0, readiness_interval=0.1, shutdown_grace=1.0
    )
    servicer = RecordingServicer()
    server = ServiceServer(
        "identity-test",
        settings,
        pool=LazyPool(settings),
        bindings=[
            bind(
                search_pb2.DESCRIPTOR,
                "SearchService",
                search_pb2_grpc.add_SearchServiceServicer_to_server,
                servicer,
            )
        ],
        identity=[IdentityInterceptor(IdentityCodec(KEY))],
    )
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, servicer
    finally:
        await channel.close(None)
        await server.stop(1.0)


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = unpack_details(status_details(raised.value))["ErrorInfo"]
    return raised.value.code(), str(info.reason)


async def test_services_accept_signed_identities_and_ignore_forged_ones(
    guarded: tuple[grpc.aio.Channel, RecordingServicer],
) -> None:
    channel, servicer = guarded
    stub = search_pb2_grpc.SearchServiceStub(channel)
    request = search_pb2.GetIndexStatusRequest()
    codec = IdentityCodec(KEY)
    token, user = _sign(codec)

    await stub.GetIndexStatus(request, metadata=[(IDENTITY_HEADER, token)], timeout=10)
    seen = servicer.seen[-1]
    assert seen is not None and seen.user_id == user and seen.kind == "api_key"

    streaming = codec.sign(
        user_id=user, kind="api_key", permissions=["read"], key_id=uuid.uuid4(), method=STREAM
    )
    stream = stub.StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(query="x"), metadata=[(IDENTITY_HEADER, streaming)]
    )
    assert len([item async for item in stream]) == 1
    assert servicer.seen[-1] is not None and servicer.seen[-1].user_id == user

    calls = len(servicer.seen)
    wrong_key, _ = _sign(IdentityCodec(OTHER_KEY))
    expired = IdentityCodec(KEY, clock=lambda: 1_000_000_000.0).sign(
        user_id=user, kind="api_key", permissions=["read"], key_id=uuid.uuid4(), method=STATUS
    )
    # Check's identity for a search, replayed against another method of the same service.
    replayed, _ = _sign(codec, frozenset({"read", "admin"}), method=SEARCH)
    unsigned = base64.urlsafe_b64encode(json.dumps({"sub": str(user), "perm": ["admin"]}).encode()).decode()
    cases = [
        ([], "MISSING_CREDENTIALS"),
        ([(IDENTITY_HEADER, wrong_key)], "IDENTITY_INVALID"),
        ([(IDENTITY_HEADER, expired)], "IDENTITY_EXPIRED"),
        ([(IDENTITY_HEADER, replayed)], "IDENTITY_WRONG_METHOD"),
        ([(IDENTITY_HEADER, unsigned)], "IDENTITY_INVALID"),
        ([("x-kotadb-tenant", str(user)), ("x-kotadb-key-id", str(uuid.uuid4()))], "MISSING_CREDENTIALS"),
        ([("authorization", "Bearer kdb_live_x")], "DIRECT_CREDENTIALS_UNSUPPORTED"),
    ]
    for metadata, reason in cases:
        code, got = await _refusal(stub.GetIndexStatus(request, metadata=metadata, timeout=10))
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason), metadata
    assert len(servicer.seen) == calls, "a refused call reached the servicer"

    # A valid read identity may not rebuild the index (admin).
    reader, _ = _sign(codec, method=REBUILD)
    code, reason = await _refusal(
        stub.RebuildIndex(search_pb2.RebuildIndexRequest(), metadata=[(IDENTITY_HEADER, reader)], timeout=10)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    admin, _ = _sign(codec, frozenset({"admin"}), method=REBUILD)
    await stub.RebuildIndex(search_pb2.RebuildIndexRequest(), metadata=[(IDENTITY_HEADER, admin)], timeout=10)

    # Health stays open to probes without credentials.
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )


async def test_direct_api_keys_are_checked_through_the_auth_service(
    database_url: str, pool: asyncpg.Pool, user_factory: Any, tmp_path: Path
) -> None:
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
    )
    auth_port = await auth.start()
    search = build_search(
        SearchSettings(
            database_url=database_url,
            port=0,
            readiness_interval=0.2,
            shutdown_grace=1.0,
            data_dir=tmp_path / "index",
            metrics_port=0,
        ),
        identity=IdentitySettings(
            identity_key=KEY, auth_address=f"127.0.0.1:{auth_port}", credential_cache_ttl=0
        ),
    )
    search_port = await search.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{search_port}")
    try:
        user = await user_factory()
        reader, key_id = await insert_key(pool, user, permissions=("read",))
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def outcome(metadata: list[tuple[str, str]]) -> grpc.StatusCode:
            try:
                # An unbalanced query: only the servicer itself refuses it (INVALID_ARGUMENT).
                await stub.SearchCode(search_pb2.SearchCodeRequest(query="(x"), metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # A valid key gets past the interceptor to the servicer, which refuses the query itself.
        passed = await outcome([("authorization", f"Bearer {reader}")])
        assert passed == grpc.StatusCode.INVALID_ARGUMENT
        assert await outcome([("x-api-key", reader)]) == passed
        assert (
            await outcome([("authorization", "Bearer kdb_live_nonsense")]) == grpc.StatusCode.UNAUTHENTICATED
        )
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.RebuildIndex(
                search_pb2.RebuildIndexRequest(), metadata=[("authorization", f"Bearer {reader}")], timeout=10
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await pool.execute("update public.api_keys set revoked_at = now() where id = $1", key_id)
        assert await outcome([("authorization", f"Bearer {reader}")]) == grpc.StatusCode.UNAUTHENTICATED
        # A signed identity still works without any key.
        token, _ = _sign(IdentityCodec(KEY), method=SEARCH)
        assert await outcome([(IDENTITY_HEADER, token)]) == passed
    finally:
        await channel.close(None)
        await search.stop(1.0)
        await auth.stop(1.0)
