"""AuthService key management over real gRPC against real Postgres, authenticated with real credentials.

Callers authenticate the way direct gRPC clients do (`authorization: Bearer` with an HS256
session JWT, an API key or a service-role JWT); the server runs the real AuthServicer with an
injected clock, so rotation grace and expiry are tested without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth.config import AuthSettings
from services.auth.keys import generate_key
from services.auth.servicer import AuthServicer
from services.auth.store import AuthStore
from services.common.server import LazyPool, ServiceServer, bind
from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details

SECRET = "test-jwt-secret-test-jwt-secret-test-jwt-secret"
READ = auth_pb2.ApiKey.READ
WRITE = auth_pb2.ApiKey.WRITE
ADMIN = auth_pb2.ApiKey.ADMIN


class Clock:
    """Clock is a settable clock for the server under test."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclasses.dataclass
class Harness:
    """Harness is a running auth server, a stub to it and its clock."""

    stub: auth_pb2_grpc.AuthServiceAsyncStub
    clock: Clock
    pool: asyncpg.Pool


@pytest.fixture(scope="module")
async def harness(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    settings = AuthSettings(
        database_url=database_url,
        port=0,
        metrics_port=0,
        readiness_interval=0.2,
        jwt_secret=SECRET,
        rotation_grace=3600.0,
        max_rate_limit=1000,
        max_monthly_quota=1_000_000,
    )
    lazy = LazyPool(settings)
    clock = Clock()
    servicer = AuthServicer(AuthStore(lazy), settings, now=clock)
    server = ServiceServer(
        "auth",
        settings,
        pool=lazy,
        bindings=[
            bind(
                auth_pb2.DESCRIPTOR, "AuthService", auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer
            )
        ],
    )
    port = await server.start()
    await server.wait_checked()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(auth_pb2_grpc.AuthServiceStub(channel), clock, pool)
    finally:
        await channel.close(None)
        await server.stop(0)


def session(user_id: uuid.UUID, **extra: Any) -> list[tuple[str, str]]:
    now = int(time.time())
    claims = {
        "sub": str(user_id),
        "role": "authenticated",
        "aud": "authenticated",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(extra)
    return [("authorization", f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}")]


def service_role() -> list[tuple[str, str]]:
    now = int(time.time())
    token = jwt.encode({"role": "service_role", "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")
    return [("authorization", f"Bearer {token}")]


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def new_key(
    name: str = "ci", permissions: tuple[auth_pb2.ApiKey.Permission.ValueType, ...] = (READ,), **fields: Any
) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(name=name, permissions=list(permissions), **fields)


async def create(
    h: Harness, metadata: list[tuple[str, str]], key: auth_pb2.ApiKey | None = None, **fields: Any
) -> auth_pb2.CreateApiKeyResponse:
    request = auth_pb2.CreateApiKeyRequest(api_key=key or new_key(), **fields)
    return await h.stub.CreateApiKey(request, metadata=metadata, timeout=10)


async def failure(call: Any) -> tuple[grpc.StatusCode, str, dict[str, Any]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = unpack_details(status_details(caught.value))
    return caught.value.code(), details["ErrorInfo"].reason, details


async def count_keys(pool: asyncpg.Pool, user_id: uuid.UUID) -> int:
    return int(await pool.fetchval("select count(*) from public.api_keys where user_id = $1", user_id))


async def test_create_stores_only_the_hash(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user), new_key("laptop", (READ, WRITE), rate_limit=120))
    secret = created.secret
    assert secret.startswith("kdb_live_") and len(secret) == 47
    key = created.api_key
    assert key.user_id == str(user) and key.name == "laptop" and key.state == auth_pb2.ApiKey.ACTIVE
    assert list(key.permissions) == [READ, WRITE]
    assert key.rate_limit == 120 and key.monthly_quota == 100000
    assert key.prefix == secret[:15]
    row = await harness.pool.fetchrow(
        "select row_to_json(k)::text as text, key_hash from public.api_keys k where id = $1",
        uuid.UUID(key.id),
    )
    assert row is not None
    assert secret not in row["text"] and secret[15:] not in row["text"]
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()


async def test_list_and_get_never_return_secrets(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user))
    key_hash = hashlib.sha256(created.secret.encode()).hexdigest()
    listed = await harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=session(user))
    got = await harness.stub.GetApiKey(
        auth_pb2.GetApiKeyRequest(id=created.api_key.id), metadata=session(user)
    )
    assert [key.id for key in listed.api_keys] == [created.api_key.id]
    assert got == listed.api_keys[0]
    for message in (listed, got):
        wire = message.SerializeToString()
        assert created.secret.encode() not in wire and created.secret[15:].encode() not in wire
        assert key_hash.encode() not in wire


async def test_users_cannot_see_or_touch_each_others_keys(
    harness: Harness, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    alices = await create(harness, session(alice))
    key_id = alices.api_key.id
    for call in (
        harness.stub.GetApiKey(auth_pb2.GetApiKeyRequest(id=key_id), metadata=session(bob)),
        harness.stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=key_id), metadata=session(bob)),
        harness.stub.RotateApiKey(auth_pb2.RotateApiKeyRequest(id=key_id), metadata=session(bob)),
        harness.stub.UpdateApiKey(
            auth_pb2.UpdateApiKeyRequest(
                api_key=auth_pb2.ApiKey(id=key_id, name="mine now"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=session(bob),
        ),
        harness.stub.GetUsage(auth_pb2.GetUsageRequest(api_key_id=key_id), metadata=session(bob)),
    ):
        code, reason, _ = await failure(call)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    listed = await harness.stub.ListApiKeys(
        auth_pb2.ListApiKeysRequest(show_revoked=True), metadata=session(bob)
    )
    assert list(listed.api_keys) == []
    # Nothing changed: the key still works and keeps its name.
    row = await harness.pool.fetchrow(
        "select name, revoked_at, grace_until from public.api_keys where id = $1", uuid.UUID(key_id)
    )
    assert (
        row is not None and row["name"] == "ci" and row["revoked_at"] is None and row["grace_until"] is None
    )
    code, reason, _ = await failure(create(harness, session(bob), user_id=str(alice)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CROSS_TENANT_DENIED")
    assert await count_keys(harness.pool, alice) == 1


async def test_create_is_idempotent_per_request_id(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    request_id = str(uuid.uuid4())
    first = await create(harness, session(user), request_id=request_id)
    again = await create(harness, session(user), request_id=request_id)
    assert first.secret and again.secret == ""
    assert again.api_key.id == first.api_key.id
    assert await count_keys(harness.pool, user) == 1
    code, reason, details = await failure(
        create(harness, session(user), new_key("other"), request_id=request_id)
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert details["ErrorInfo"].metadata["api_key_id"] == first.api_key.id
    # Another user's identical request id is unrelated.
    other = await user_factory()
    theirs = await create(harness, session(other), request_id=request_id)
    assert theirs.secret and theirs.api_key.id != first.api_key.id


async def test_concurrent_retries_create_one_key(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    request_id = str(uuid.uuid4())
    answers = await asyncio.gather(*(create(harness, session(user), request_id=request_id) for _ in range(6)))
    assert len({answer.api_key.id for answer in answers}) == 1
    assert sum(1 for answer in answers if answer.secret) == 1
    assert await count_keys(harness.pool, user) == 1


@pytest.mark.parametrize(
    ("key", "extra", "fields"),
    [
        (new_key(name="  "), {}, {"api_key.name"}),
        (new_key(name="x" * 201), {}, {"api_key.name"}),
        (new_key(name="tab\there"), {}, {"api_key.name"}),
        (new_key(permissions=()), {}, {"api_key.permissions"}),
        (new_key(permissions=(auth_pb2.ApiKey.PERMISSION_UNSPECIFIED,)), {}, {"api_key.permissions"}),
        (new_key(rate_limit=-1), {}, {"api_key.rate_limit"}),
        (new_key(rate_limit=1001), {}, {"api_key.rate_limit"}),
        (new_key(monthly_quota=2_000_000), {}, {"api_key.monthly_quota"}),
        (
            new_key(expire_time=timestamp_pb2.Timestamp(seconds=int(time.time()) - 60)),
            {},
            {"api_key.expire_time"},
        ),
        (new_key(), {"environment": "prod"}, {"environment"}),
        (new_key(), {"request_id": "x" * 200}, {"request_id"}),
        (new_key(name="", rate_limit=-5), {}, {"api_key.name", "api_key.rate_limit"}),
        (new_key(), {"user_id": "not-a-uuid"}, {"user_id"}),
    ],
    ids=[
        "blank-name",
        "long-name",
        "control-char",
        "no-permissions",
        "unspecified-permission",
        "negative-rate",
        "rate-over-max",
        "quota-over-max",
        "expired",
        "environment",
        "request-id",
        "two-violations",
        "bad-user-id",
    ],
)
async def test_invalid_creates_write_nothing(
    harness: Harness, user_factory: UserFactory, key: auth_pb2.ApiKey, extra: dict[str, Any], fields: set[str]
) -> None:
    user = await user_factory()
    code, reason, details = await failure(create(harness, session(user), key, **extra))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_ARGUMENT"
    assert {violation.field for violation in details["BadRequest"].field_violations} == fields
    assert await count_keys(harness.pool, user) == 0


async def test_rotation_keeps_the_old_key_for_the_grace_period(
    harness: Harness, user_factory: UserFactory
) -> None:
    user = await user_factory()
    created = await create(
        harness, session(user), new_key("deploy", (READ, WRITE), rate_limit=30, monthly_quota=500)
    )
    old_id = created.api_key.id
    await harness.pool.execute("update public.api_keys set usage_count = 7 where id = $1", uuid.UUID(old_id))
    rotated = await harness.stub.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(id=old_id, grace_period=duration_pb2.Duration(seconds=600)),
        metadata=session(user),
    )
    new, previous = rotated.api_key, rotated.previous_api_key
    assert rotated.secret and rotated.secret != created.secret
    assert new.id != old_id and new.rotated_from_id == old_id and previous.rotated_to_id == new.id
    assert (new.name, list(new.permissions), new.rate_limit, new.monthly_quota) == (
        "deploy",
        [READ, WRITE],
        30,
        500,
    )
    assert new.usage_count == 7, "rotating must not reset the month's quota"
    assert previous.state == auth_pb2.ApiKey.ROTATING
    expected_grace = harness.clock.now + dt.timedelta(seconds=600)
    assert abs(previous.grace_expire_time.ToDatetime(tzinfo=dt.UTC) - expected_grace) < dt.timedelta(
        seconds=1
    )

    validate = harness.stub.ValidateApiKey
    both = [
        await validate(auth_pb2.ValidateApiKeyRequest(secret=s)) for s in (created.secret, rotated.secret)
    ]
    assert [answer.api_key_id for answer in both] == [old_id, new.id]

    code, reason, details = await failure(
        harness.stub.RotateApiKey(auth_pb2.RotateApiKeyRequest(id=old_id), metadata=session(user))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "API_KEY_NOT_ACTIVE")
    assert details["ErrorInfo"].metadata["rotated_to_id"] == new.id

    harness.clock.advance(601)
    try:
        code, reason, _ = await failure(validate(auth_pb2.ValidateApiKeyRequest(secret=created.secret)))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_ROTATED")
        assert (await validate(auth_pb2.ValidateApiKeyRequest(secret=rotated.secret))).api_key_id == new.id
        old = await harness.stub.GetApiKey(auth_pb2.GetApiKeyRequest(id=old_id), metadata=session(user))
        assert old.state == auth_pb2.ApiKey.REVOKED and old.HasField("revoke_time")
        active = await harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=session(user))
        assert [key.id for key in active.api_keys] == [new.id]
    finally:
        harness.clock.advance(-601)


async def test_rotation_grace_limits_and_idempotency(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user))
    too_long = auth_pb2.RotateApiKeyRequest(
        id=created.api_key.id, grace_period=duration_pb2.Duration(seconds=7200)
    )
    code, _, details = await failure(harness.stub.RotateApiKey(too_long, metadata=session(user)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "grace_period"
    request = auth_pb2.RotateApiKeyRequest(
        id=created.api_key.id, grace_period=duration_pb2.Duration(seconds=0), request_id="rotate-1"
    )
    first = await harness.stub.RotateApiKey(request, metadata=session(user))
    again = await harness.stub.RotateApiKey(request, metadata=session(user))
    assert first.secret and again.secret == "" and again.api_key.id == first.api_key.id
    assert again.previous_api_key.id == created.api_key.id
    # Zero grace: the old secret stopped at once.
    code, reason, _ = await failure(
        harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=created.secret))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_ROTATED")
    assert await count_keys(harness.pool, user) == 2


async def test_revoke_stops_the_key_and_notifies(
    harness: Harness, user_factory: UserFactory, database_url: str
) -> None:
    user = await user_factory()
    created = await create(harness, session(user))
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener("api_key_changes", lambda *args: heard.put_nowait(args[3]))
        revoked = await harness.stub.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=session(user)
        )
        assert await asyncio.wait_for(heard.get(), 5) == created.api_key.id
    finally:
        await listener.close()
    assert revoked.state == auth_pb2.ApiKey.REVOKED and revoked.HasField("revoke_time")
    code, reason, _ = await failure(
        harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=created.secret))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    again = await harness.stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=session(user)
    )
    assert again.revoke_time == revoked.revoke_time
    assert (
        await harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=session(user))
    ).api_keys == []
    shown = await harness.stub.ListApiKeys(
        auth_pb2.ListApiKeysRequest(show_revoked=True), metadata=session(user)
    )
    assert [key.id for key in shown.api_keys] == [created.api_key.id]
    code, reason, _ = await failure(
        harness.stub.RotateApiKey(auth_pb2.RotateApiKeyRequest(id=created.api_key.id), metadata=session(user))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "API_KEY_NOT_ACTIVE")


async def test_expired_keys_stop_working(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    expiry = timestamp_pb2.Timestamp()
    expiry.FromDatetime(harness.clock.now + dt.timedelta(minutes=5))
    created = await create(harness, session(user), new_key(expire_time=expiry))
    assert (
        await harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=created.secret))
    ).user_id == str(user)
    harness.clock.advance(301)
    try:
        code, reason, _ = await failure(
            harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=created.secret))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED")
        key = await harness.stub.GetApiKey(
            auth_pb2.GetApiKeyRequest(id=created.api_key.id), metadata=session(user)
        )
        assert key.state == auth_pb2.ApiKey.EXPIRED
    finally:
        harness.clock.advance(-301)


async def test_validate_refuses_bad_secrets(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user), new_key(permissions=(READ,)))
    secret = created.secret
    cases = {
        "": "MISSING_CREDENTIALS",
        secret[:-1]: "MALFORMED_API_KEY",
        secret[:-1] + ("A" if secret[-1] != "A" else "B"): "BAD_API_KEY_CHECKSUM",
        "kdb_live_" + "0" * 32 + "000000": "BAD_API_KEY_CHECKSUM",
    }
    for presented, expected in cases.items():
        code, reason, _ = await failure(
            harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=presented))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, expected), presented
    unknown = generate_key().plaintext
    code, reason, _ = await failure(
        harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=unknown))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_API_KEY")
    code, reason, _ = await failure(
        harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=secret, required_permission=WRITE))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    ok = await harness.stub.ValidateApiKey(
        auth_pb2.ValidateApiKeyRequest(secret=secret, required_permission=READ)
    )
    assert ok.api_key_id == created.api_key.id and list(ok.permissions) == [READ] and ok.rate_limit == 60
    # A session JWT is validated too: the user, no key.
    token = session(user)[0][1].removeprefix("Bearer ")
    as_user = await harness.stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(secret=token))
    assert as_user.user_id == str(user) and as_user.api_key_id == ""


async def test_who_may_manage_keys(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    reader = await create(harness, session(user), new_key("reader", (READ,)))
    admin = await create(harness, session(user), new_key("admin", (READ, ADMIN)))

    code, reason, _ = await failure(create(harness, bearer(reader.secret)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    code, reason, _ = await failure(
        harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=bearer(reader.secret))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Any key may read its own usage.
    own = await harness.stub.GetUsage(auth_pb2.GetUsageRequest(), metadata=bearer(reader.secret))
    assert own.api_key_id == reader.api_key.id

    made = await create(harness, bearer(admin.secret), new_key("made-by-admin", (READ,)))
    assert made.api_key.user_id == str(user)
    code, reason, _ = await failure(create(harness, bearer(admin.secret), new_key("escalate", (WRITE,))))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_ESCALATION")

    limits = auth_pb2.UpdateApiKeyRequest(
        api_key=auth_pb2.ApiKey(id=reader.api_key.id, rate_limit=500),
        update_mask=field_mask_pb2.FieldMask(paths=["rate_limit"]),
    )
    code, reason, _ = await failure(harness.stub.UpdateApiKey(limits, metadata=session(user)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    updated = await harness.stub.UpdateApiKey(limits, metadata=bearer(admin.secret))
    assert updated.rate_limit == 500
    over = auth_pb2.UpdateApiKeyRequest(
        api_key=auth_pb2.ApiKey(id=reader.api_key.id, rate_limit=5000),
        update_mask=field_mask_pb2.FieldMask(paths=["rate_limit"]),
    )
    code, _, _ = await failure(harness.stub.UpdateApiKey(over, metadata=bearer(admin.secret)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await harness.stub.UpdateApiKey(over, metadata=service_role())).rate_limit == 5000

    code, _, details = await failure(create(harness, service_role()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "user_id"
    by_service = await create(harness, service_role(), user_id=str(user))
    assert by_service.api_key.user_id == str(user)

    code, reason, _ = await failure(harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest()))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
    expired = session(user, exp=int(time.time()) - 60)
    code, reason, _ = await failure(harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=expired))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_EXPIRED")


async def test_update_name_permissions_and_expiry(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user))
    expiry = timestamp_pb2.Timestamp()
    expiry.FromDatetime(harness.clock.now + dt.timedelta(days=30))
    updated = await harness.stub.UpdateApiKey(
        auth_pb2.UpdateApiKeyRequest(
            api_key=auth_pb2.ApiKey(
                id=created.api_key.id, name="renamed", permissions=[READ, WRITE], expire_time=expiry
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "permissions", "expire_time"]),
        ),
        metadata=session(user),
    )
    assert (updated.name, list(updated.permissions), updated.expire_time) == (
        "renamed",
        [READ, WRITE],
        expiry,
    )
    cleared = await harness.stub.UpdateApiKey(
        auth_pb2.UpdateApiKeyRequest(
            api_key=auth_pb2.ApiKey(id=created.api_key.id),
            update_mask=field_mask_pb2.FieldMask(paths=["expire_time"]),
        ),
        metadata=session(user),
    )
    assert not cleared.HasField("expire_time") and cleared.name == "renamed"
    for paths in ([], ["user_id"], ["usage_count"]):
        code, _, details = await failure(
            harness.stub.UpdateApiKey(
                auth_pb2.UpdateApiKeyRequest(
                    api_key=auth_pb2.ApiKey(id=created.api_key.id, name="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                ),
                metadata=session(user),
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details["BadRequest"].field_violations[0].field == "update_mask"
    row = await harness.pool.fetchrow(
        "select name from public.api_keys where id = $1", uuid.UUID(created.api_key.id)
    )
    assert row is not None and row["name"] == "renamed"


async def test_list_pages_are_stable(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    made = [(await create(harness, session(user), new_key(f"k{i}"))).api_key.id for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(page_size=2, page_token=token), metadata=session(user)
        )
        seen.extend(key.id for key in page.api_keys)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(made) and len(seen) == 5
    created_times = [
        await harness.pool.fetchval("select created_at from public.api_keys where id = $1", uuid.UUID(i))
        for i in seen
    ]
    assert created_times == sorted(created_times, reverse=True)
    for bad in (
        auth_pb2.ListApiKeysRequest(page_token="garbage!"),
        auth_pb2.ListApiKeysRequest(page_size=-1),
        auth_pb2.ListApiKeysRequest(page_size=1001),
    ):
        code, _, _ = await failure(harness.stub.ListApiKeys(bad, metadata=session(user)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    first = await harness.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(page_size=2), metadata=session(user))
    code, _, details = await failure(
        harness.stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(page_size=2, page_token=first.next_page_token, show_revoked=True),
            metadata=session(user),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "page_token"


async def test_usage_reports_window_month_and_endpoints(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    created = await create(harness, session(user), new_key(rate_limit=10, monthly_quota=1000))
    key_id = uuid.UUID(created.api_key.id)
    now = harness.clock.now
    window = now.replace(second=0, microsecond=0)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    await harness.pool.execute(
        "insert into public.rate_limit_windows (key_id, user_id, window_start, count) values ($1, $2, $3, 4)",
        key_id,
        user,
        window,
    )
    await harness.pool.execute(
        "update public.api_keys set usage_count = 42, usage_period = $2 where id = $1", key_id, month.date()
    )
    rows = [
        ("/kotadb.v1.SearchService/SearchCode", "POST", 200, 0, 10),
        ("/kotadb.v1.SearchService/SearchCode", "POST", 200, 7, 30),
        ("/v1/documents", "POST", 403, None, 5),
    ]
    for endpoint, method, status, grpc_status, ms in rows:
        await harness.pool.execute(
            "insert into public.usage_metrics (key_id, user_id, endpoint, method, status_code, grpc_status,"
            " response_time_ms, occurred_at) values ($1, $2, $3, $4, $5, $6, $7, $8)",
            key_id,
            user,
            endpoint,
            method,
            status,
            grpc_status,
            ms,
            now - dt.timedelta(seconds=1),
        )
    usage = await harness.stub.GetUsage(
        auth_pb2.GetUsageRequest(api_key_id=str(key_id)), metadata=session(user)
    )
    assert (usage.window_count, usage.window_remaining, usage.rate_limit) == (4, 6, 10)
    assert (usage.month_usage, usage.monthly_quota) == (42, 1000)
    assert usage.window_start_time.ToDatetime(tzinfo=dt.UTC) == window
    assert usage.month_start_time.ToDatetime(tzinfo=dt.UTC) == month
    totals = {(e.endpoint, e.method): e for e in usage.endpoints}
    search = totals[("/kotadb.v1.SearchService/SearchCode", "POST")]
    assert (search.request_count, search.error_count) == (2, 1)
    assert search.mean_response_time.ToMilliseconds() == 20
    assert (
        totals[("/v1/documents", "POST")].request_count,
        totals[("/v1/documents", "POST")].error_count,
    ) == (1, 1)
    empty = auth_pb2.GetUsageRequest(
        api_key_id=str(key_id), end_time=timestamp_pb2.Timestamp(seconds=int(month.timestamp()) + 1)
    )
    assert list((await harness.stub.GetUsage(empty, metadata=session(user))).endpoints) == []
    code, _, details = await failure(
        harness.stub.GetUsage(auth_pb2.GetUsageRequest(), metadata=session(user))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "api_key_id"


async def test_concurrent_rotations_issue_one_successor(harness: Harness, user_factory: UserFactory) -> None:
    user = await user_factory()
    retried = await create(harness, session(user))
    request = auth_pb2.RotateApiKeyRequest(id=retried.api_key.id, request_id="rotate-concurrently")
    answers = await asyncio.gather(
        *(harness.stub.RotateApiKey(request, metadata=session(user), timeout=10) for _ in range(4))
    )
    assert len({answer.api_key.id for answer in answers}) == 1
    assert sum(1 for answer in answers if answer.secret) == 1

    raced = await create(harness, session(user))
    plain = auth_pb2.RotateApiKeyRequest(id=raced.api_key.id)
    outcomes = await asyncio.gather(
        *(harness.stub.RotateApiKey(plain, metadata=session(user), timeout=10) for _ in range(3)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, auth_pb2.RotateApiKeyResponse)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 2
    assert all(loser.code() == grpc.StatusCode.FAILED_PRECONDITION for loser in losers)
    successors = await harness.pool.fetchval(
        "select count(*) from public.api_keys where rotated_from = any($1::uuid[])",
        [uuid.UUID(retried.api_key.id), uuid.UUID(raced.api_key.id)],
    )
    assert successors == 2
