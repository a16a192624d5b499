"""Envoy's `Check`, called over real gRPC the way Envoy calls it, against real Postgres.

The Authorization servicer runs on a grpc.aio server on port 0 with a real key cache (listening
for NOTIFY), a real admitter and an injected clock. Through-Envoy behaviour (the headers really
reaching clients and services) is in test_gateway_auth.py; this file pins every decision and
the exact shape of each answer. `CheckRig` is reused by test_quota.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from services.auth import keys, quota
from services.auth.check import AuthorizationServicer, Authorizer
from services.auth.config import AuthSettings
from services.auth.keycache import KeyCache
from services.auth.ratelimit import Admitter
from services.auth.routes import RouteTable
from services.auth.sessions import SessionVerifier
from services.common.errors import Unauthenticated
from services.common.identity import IDENTITY_HEADER, KEY_ID_HEADER, TENANT_HEADER, IdentityCodec
from services.common.server import LazyPool
from tests.auth.conftest import open_lazy_pool
from tests.auth.test_ratelimit import insert_key

UTC = datetime.UTC
IDENTITY_KEY = "check-tests-identity-key-0123456789abcdef"
JWT_SECRET = "check-tests-jwt-secret-0123456789abcdef"
SEARCH = ("POST", "/kotadb.v1.SearchService/SearchCode")
SEARCH_REST = ("POST", "/v1/code:search")
SEARCH_METHOD = "/kotadb.v1.SearchService/SearchCode"
INGEST_REST = ("POST", "/v1/documents:batchUpsert")
KEYS_REST = ("GET", "/v1/apiKeys")


@dataclasses.dataclass(frozen=True)
class Answer:
    """Answer is a CheckResponse made easy to assert on."""

    response: external_auth_pb2.CheckResponse

    @property
    def allowed(self) -> bool:
        return bool(self.response.HasField("ok_response"))

    @property
    def status(self) -> int:
        return int(self.response.denied_response.status.code) if not self.allowed else 200

    @property
    def headers(self) -> dict[str, str]:
        source = self.response.ok_response.headers if self.allowed else self.response.denied_response.headers
        return {option.header.key: option.header.value for option in source}

    @property
    def response_headers(self) -> dict[str, str]:
        return {o.header.key: o.header.value for o in self.response.ok_response.response_headers_to_add}

    @property
    def removed(self) -> list[str]:
        return list(self.response.ok_response.headers_to_remove)

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.response.denied_response.body)
        return parsed

    @property
    def reason(self) -> str:
        return self.headers.get("x-kotadb-error-reason", "")


class CheckRig:
    """CheckRig is one auth replica's Check: servicer on a real gRPC port, cache, admitter, clock."""

    def __init__(
        self, lazy: LazyPool, database_url: str, clock: quota.Clock, cache_ttl: float = 300.0
    ) -> None:
        settings = AuthSettings(database_url=database_url, jwt_secret=JWT_SECRET)
        self.admitter = Admitter(lazy, clock)
        # Wired as services/auth/server.py wires them: a heard change also drops the key's block.
        self.cache = KeyCache(lazy, database_url, ttl=cache_ttl, on_change=self._changed)
        self.codec = IdentityCodec(IDENTITY_KEY)
        self.clock = clock
        self.authorizer = Authorizer(
            routes=RouteTable(),
            cache=self.cache,
            admitter=self.admitter,
            sessions=SessionVerifier(settings),
            codec=self.codec,
            clock=clock,
        )
        self.server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(self.authorizer), self.server
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    def _changed(self, key_id: uuid.UUID | None) -> None:
        if key_id is None:
            self.admitter.drop_all()
        else:
            self.admitter.drop(key_id)

    async def start(self) -> None:
        self.cache.start()
        assert await self.cache.wait_listening(20), "key change listener did not connect"
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        await self.server.stop(None)
        await self.admitter.close()
        await self.cache.close()

    async def check(
        self,
        route: tuple[str, str],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        grpc_client: bool = False,
    ) -> Answer:
        method, path = route
        sent = {"x-request-id": uuid.uuid4().hex, **(headers or {})}
        if key is not None:
            sent["authorization"] = f"Bearer {key}"
        if grpc_client:
            sent["content-type"] = "application/grpc"
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path = method, path
        http.headers.update(sent)
        assert self.channel is not None
        stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        return Answer(await stub.Check(request, timeout=10))


@pytest.fixture
async def rig(lazy: LazyPool, database_url: str) -> AsyncIterator[CheckRig]:
    started = CheckRig(lazy, database_url, quota.SystemClock())
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def _session(
    user_id: uuid.UUID | None, *, role: str = "authenticated", expires_in: int = 600, **extra: Any
) -> str:
    claims: dict[str, Any] = {"role": role, "exp": int(time.time()) + expires_in, **extra}
    if role == "authenticated":
        claims.update(sub=str(user_id), aud="authenticated")
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _assert_denied(answer: Answer, status: int, reason: str) -> None:
    assert not answer.allowed, answer.response
    assert answer.status == status
    assert answer.reason == reason
    body = answer.body
    assert body["reason"] == reason and body["message"]
    assert body["code"] == {401: 16, 403: 7, 404: 5, 429: 8, 503: 14}[status]
    info = body["details"][0]
    assert info["@type"].endswith("google.rpc.ErrorInfo") and info["domain"] == "kotadb.dev"
    assert info["reason"] == reason and info["metadata"]["request_id"]
    assert answer.headers["content-type"] == "application/json"
    if status == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")


ROUTES = [
    ("POST", "/v1/code:search", "/kotadb.v1.SearchService/SearchCode", "read"),
    ("POST", "/v1/symbols:search", "/kotadb.v1.SearchService/SearchSymbols", "read"),
    ("GET", "/v1/index?x=1", "/kotadb.v1.SearchService/GetIndexStatus", "read"),
    ("POST", "/v1/index:rebuild", "/kotadb.v1.SearchService/RebuildIndex", "admin"),
    ("POST", "/v1/documents:batchUpsert", "/kotadb.v1.IngestService/UpsertDocuments", "write"),
    ("GET", "/v1/documents/abc", "/kotadb.v1.IngestService/GetDocument", "read"),
    ("DELETE", "/v1/documents/abc", "/kotadb.v1.IngestService/DeleteDocument", "write"),
    ("POST", "/v1/repositories/r1:sync", "/kotadb.v1.IngestService/SyncRepository", "write"),
    ("POST", "/v1/webhooks/github/r1", "/kotadb.v1.IngestService/ReceiveGithubWebhook", ""),
    ("POST", "/v1/apiKeys", "/kotadb.v1.AuthService/CreateApiKey", "admin"),
    ("GET", "/v1/apiKeys", "/kotadb.v1.AuthService/ListApiKeys", "admin"),
    ("GET", "/v1/apiKeys/k1", "/kotadb.v1.AuthService/GetApiKey", "admin"),
    ("PATCH", "/v1/apiKeys/k1", "/kotadb.v1.AuthService/UpdateApiKey", "admin"),
    ("POST", "/v1/apiKeys/k1:revoke", "/kotadb.v1.AuthService/RevokeApiKey", "admin"),
    ("POST", "/v1/apiKeys/k1:rotate", "/kotadb.v1.AuthService/RotateApiKey", "admin"),
    ("GET", "/v1/usage", "/kotadb.v1.AuthService/GetUsage", "read"),
    ("POST", "/kotadb.v1.SearchService/SearchCode", "/kotadb.v1.SearchService/SearchCode", "read"),
    (
        "POST",
        "/kotadb.v1.IngestService/StreamUpsertDocuments",
        "/kotadb.v1.IngestService/StreamUpsertDocuments",
        "write",
    ),
    ("POST", "/kotadb.v1.AuthService/ValidateApiKey", "/kotadb.v1.AuthService/ValidateApiKey", "service"),
]


@pytest.mark.parametrize(("method", "path", "grpc_method", "permission"), ROUTES)
def test_rest_and_grpc_paths_resolve_to_the_same_method(
    method: str, path: str, grpc_method: str, permission: str
) -> None:
    route = RouteTable().resolve(method, path)
    assert route is not None
    assert (route.grpc_method, route.permission) == (grpc_method, permission)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/code:search"),
        ("POST", "/v1/apiKeys/k1:explode"),
        ("POST", "/v1/apiKeys/k1/extra:revoke"),
        ("GET", "/kotadb.v1.SearchService/SearchCode"),
        ("POST", "/no.such.Service/Method"),
        ("GET", "/"),
    ],
)
def test_unknown_routes_do_not_resolve(method: str, path: str) -> None:
    assert RouteTable().resolve(method, path) is None


def test_every_gateway_method_has_a_route() -> None:
    table = RouteTable()
    assert len(table.grpc_methods) >= 20
    for name in table.grpc_methods:
        assert table.resolve("POST", name) is not None


async def test_a_valid_key_is_allowed_with_signed_identity_and_rate_headers(
    rig: CheckRig, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    secret, key_id = await insert_key(pool, user, permissions=("read", "write"), rate_limit=7)
    answer = await rig.check(
        SEARCH_REST, key=secret, headers={IDENTITY_HEADER: "forged.token", TENANT_HEADER: "x"}
    )
    assert answer.allowed
    identity = rig.codec.verify(answer.headers[IDENTITY_HEADER], method=SEARCH_METHOD)
    assert (identity.user_id, identity.key_id, identity.kind) == (user, key_id, "api_key")
    assert identity.permissions == frozenset({"read", "write"})
    # The identity is bound to the method Check admitted: a replay elsewhere is refused.
    with pytest.raises(Unauthenticated) as replayed:
        rig.codec.verify(answer.headers[IDENTITY_HEADER], method="/kotadb.v1.IngestService/UpsertDocuments")
    assert replayed.value.reason == "IDENTITY_WRONG_METHOD"
    assert answer.headers[TENANT_HEADER] == str(user)
    assert answer.headers[KEY_ID_HEADER] == str(key_id)
    assert {"authorization", "x-api-key"} <= set(answer.removed)
    assert answer.response_headers["ratelimit-limit"] == "7"
    assert answer.response_headers["ratelimit-remaining"] == "6"
    assert 1 <= int(answer.response_headers["ratelimit-reset"]) <= 60
    # x-api-key works as well as a bearer token.
    assert (await rig.check(SEARCH, headers={"x-api-key": secret})).allowed


async def test_each_bad_credential_is_refused_with_its_reason(
    rig: CheckRig, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    now = datetime.datetime.now(UTC)
    unknown = keys.generate_key().plaintext
    valid, _ = await insert_key(pool, user)
    mistyped = valid[:-1] + ("A" if valid[-1] != "A" else "B")
    expired, _ = await insert_key(pool, user, expires_at=now - datetime.timedelta(seconds=1))
    revoked, _ = await insert_key(pool, user, revoked_at=now)
    rotated_out, _ = await insert_key(pool, user, grace_until=now - datetime.timedelta(seconds=1))
    cases: list[tuple[str | None, str]] = [
        (None, "MISSING_CREDENTIALS"),
        ("not-a-key", "MALFORMED_API_KEY"),
        (valid[:-3], "MALFORMED_API_KEY"),
        (mistyped, "BAD_API_KEY_CHECKSUM"),
        (unknown, "UNKNOWN_API_KEY"),
        (expired, "API_KEY_EXPIRED"),
        (revoked, "API_KEY_REVOKED"),
        (rotated_out, "API_KEY_ROTATED"),
    ]
    for key, reason in cases:
        _assert_denied(await rig.check(SEARCH_REST, key=key), 401, reason)
    # Nothing was counted for any of them.
    assert (
        await pool.fetchval(
            "select coalesce(sum(usage_count), 0) from public.api_keys where user_id = $1", user
        )
        == 0
    )


async def test_a_rotated_key_works_within_its_grace_period(
    rig: CheckRig, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    later = datetime.datetime.now(UTC) + datetime.timedelta(minutes=5)
    rotating, _ = await insert_key(pool, user, grace_until=later)
    assert (await rig.check(SEARCH_REST, key=rotating)).allowed


async def test_missing_permission_is_403(rig: CheckRig, pool: asyncpg.Pool, user_factory: Any) -> None:
    user = await user_factory()
    reader, _ = await insert_key(pool, user, permissions=("read",))
    writer, _ = await insert_key(pool, user, permissions=("write",))
    admin, _ = await insert_key(pool, user, permissions=("read", "write", "admin"))
    _assert_denied(await rig.check(INGEST_REST, key=reader), 403, "MISSING_PERMISSION")
    _assert_denied(await rig.check(KEYS_REST, key=writer), 403, "MISSING_PERMISSION")
    _assert_denied(await rig.check(("POST", "/v1/index:rebuild"), key=writer), 403, "MISSING_PERMISSION")
    assert (await rig.check(KEYS_REST, key=admin)).allowed
    # The internal ValidateApiKey is not for API keys at all, admin or not.
    internal = ("POST", "/kotadb.v1.AuthService/ValidateApiKey")
    _assert_denied(await rig.check(internal, key=admin), 403, "MISSING_PERMISSION")


async def test_unknown_routes_are_404_for_rest_and_unimplemented_for_grpc(rig: CheckRig) -> None:
    _assert_denied(await rig.check(("GET", "/nope")), 404, "ROUTE_NOT_FOUND")
    answer = await rig.check(("POST", "/no.such.Service/Method"), grpc_client=True)
    assert answer.headers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


async def test_grpc_clients_get_grpc_status_and_no_body(
    rig: CheckRig, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    reader, _ = await insert_key(pool, user, permissions=("read",), rate_limit=1)
    missing = await rig.check(SEARCH, grpc_client=True)
    assert missing.status == 401 and missing.headers["grpc-status"] == "16"
    assert missing.headers["grpc-message"].startswith("this request needs an API key")
    assert missing.response.denied_response.body == ""
    forbidden = await rig.check(
        ("POST", "/kotadb.v1.IngestService/UpsertDocuments"), key=reader, grpc_client=True
    )
    assert forbidden.headers["grpc-status"] == "7"
    assert (await rig.check(SEARCH, key=reader, grpc_client=True)).allowed
    limited = await rig.check(SEARCH, key=reader, grpc_client=True)
    assert limited.status == 429 and limited.headers["grpc-status"] == "8"
    assert int(limited.headers["retry-after"]) >= 1


async def test_rate_limit_refusal_is_429_with_retry_after(
    rig: CheckRig, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    secret, key_id = await insert_key(pool, user, rate_limit=2)
    assert (await rig.check(SEARCH_REST, key=secret)).allowed
    assert (await rig.check(SEARCH_REST, key=secret)).allowed
    refused = await rig.check(SEARCH_REST, key=secret)
    _assert_denied(refused, 429, "RATE_LIMITED")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.body["details"][0]["metadata"]["key_id"] == str(key_id)


async def test_sessions_manage_keys_but_do_not_replace_api_keys(rig: CheckRig, user_factory: Any) -> None:
    user = await user_factory()
    session = _session(user)
    allowed = await rig.check(KEYS_REST, key=session)
    assert allowed.allowed
    identity = rig.codec.verify(allowed.headers[IDENTITY_HEADER], method="/kotadb.v1.AuthService/ListApiKeys")
    assert (identity.kind, identity.user_id, identity.key_id) == ("user", user, None)
    assert KEY_ID_HEADER in allowed.removed
    assert (await rig.check(("POST", "/v1/index:rebuild"), key=session)).allowed
    _assert_denied(await rig.check(SEARCH_REST, key=session), 403, "SESSION_NOT_ACCEPTED")
    _assert_denied(await rig.check(KEYS_REST, key=_session(user, expires_in=-120)), 401, "SESSION_EXPIRED")
    forged = jwt.encode(
        {"sub": str(user), "role": "authenticated", "aud": "authenticated"}, "wrong" * 8, "HS256"
    )
    _assert_denied(await rig.check(KEYS_REST, key=forged), 401, "INVALID_SESSION_TOKEN")
    # The service role may call anything, including the internal ValidateApiKey.
    service = _session(None, role="service_role")
    answer = await rig.check(SEARCH_REST, key=service)
    assert answer.allowed
    assert rig.codec.verify(answer.headers[IDENTITY_HEADER], method=SEARCH_METHOD).kind == "service"
    assert TENANT_HEADER in answer.removed
    assert (await rig.check(("POST", "/kotadb.v1.AuthService/ValidateApiKey"), key=service)).allowed


async def test_key_changes_reach_every_replica_within_a_second(
    lazy: LazyPool, database_url: str, pool: asyncpg.Pool, user_factory: Any
) -> None:
    second_pool = await open_lazy_pool(database_url)
    replicas = [
        CheckRig(lazy, database_url, quota.SystemClock()),
        CheckRig(second_pool, database_url, quota.SystemClock()),
    ]
    for replica in replicas:
        await replica.start()
    try:
        user = await user_factory()
        secret, key_id = await insert_key(pool, user, permissions=("read", "write"))
        for replica in replicas:
            assert (await replica.check(INGEST_REST, key=secret)).allowed
        lookups = [replica.cache.lookups for replica in replicas]
        for replica in replicas:  # served from the cache now (TTL 300 s): no new lookups
            assert (await replica.check(INGEST_REST, key=secret)).allowed
        assert [replica.cache.lookups for replica in replicas] == lookups

        # A downgrade is not something the admission function checks: only the NOTIFY-driven
        # eviction can make the replicas notice it before the cache entry's TTL.
        await pool.execute("update public.api_keys set permissions = '{read}' where id = $1", key_id)
        changed = time.monotonic()
        pending = set(range(len(replicas)))
        while pending and time.monotonic() - changed < 1.0:
            for index in list(pending):
                if not (await replicas[index].check(INGEST_REST, key=secret)).allowed:
                    pending.discard(index)
            await asyncio.sleep(0.02)
        assert not pending, f"replicas {sorted(pending)} still allowed a write a second after the downgrade"

        await pool.execute("update public.api_keys set revoked_at = now() where id = $1", key_id)
        for replica in replicas:  # revocation is refused at once by the admission itself
            _assert_denied(await replica.check(SEARCH_REST, key=secret), 401, "API_KEY_REVOKED")
    finally:
        for replica in replicas:
            await replica.stop()
        await second_pool.close(wait=5)
