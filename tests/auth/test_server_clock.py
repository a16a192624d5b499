"""The auth server as `build` composes it reads one clock everywhere: Check and AuthService alike.

A clock injected into `build` (or the `check_clock_offset` setting) moves rate-limit windows
for Check; key states and usage reports from AuthService must follow the same clock, or a
key Check refuses as expired would still be listed as active.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import jwt
import pytest
from google.protobuf import timestamp_pb2
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth import quota, server
from services.auth.config import AuthSettings
from services.common.identity import IdentitySettings
from tests.conftest import UserFactory

SECRET = "server-clock-test-jwt-secret-0123456789abcdef"
IDENTITY_KEY = "server-clock-test-identity-key-0123456789"


@pytest.fixture
async def running(
    database_url: str,
) -> AsyncIterator[tuple[auth_pb2_grpc.AuthServiceAsyncStub, quota.FixedClock]]:
    settings = AuthSettings(
        database_url=database_url, port=0, metrics_port=0, readiness_interval=0.2, jwt_secret=SECRET
    )
    clock = quota.FixedClock(dt.datetime.now(dt.UTC))
    built = server.build(settings, identity=IdentitySettings(identity_key=IDENTITY_KEY), clock=clock)
    port = await built.start()
    await built.wait_checked()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield auth_pb2_grpc.AuthServiceStub(channel), clock
    finally:
        await channel.close(None)
        await built.stop(0)


def _session(user_id: uuid.UUID) -> list[tuple[str, str]]:
    # JWT lifetimes are checked against the real clock, so the token is minted from time.time().
    now = int(time.time())
    claims = {
        "sub": str(user_id),
        "role": "authenticated",
        "aud": "authenticated",
        "iat": now,
        "exp": now + 600,
    }
    return [("authorization", f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}")]


async def test_key_state_and_usage_follow_the_injected_clock(
    running: tuple[auth_pb2_grpc.AuthServiceAsyncStub, quota.FixedClock], user_factory: UserFactory
) -> None:
    stub, clock = running
    user = await user_factory()
    expires = clock.now() + dt.timedelta(days=1)
    expire_time = timestamp_pb2.Timestamp()
    expire_time.FromDatetime(expires)
    key = auth_pb2.ApiKey(name="clock", permissions=[auth_pb2.ApiKey.READ], expire_time=expire_time)
    created = await stub.CreateApiKey(auth_pb2.CreateApiKeyRequest(api_key=key), metadata=_session(user))
    assert created.api_key.state == auth_pb2.ApiKey.ACTIVE

    # Forty days on by the server's clock (the real clock has not moved): past the expiry and
    # into another month.
    clock.advance(40 * 86400)
    got = await stub.GetApiKey(auth_pb2.GetApiKeyRequest(id=created.api_key.id), metadata=_session(user))
    assert got.state == auth_pb2.ApiKey.EXPIRED
    usage = await stub.GetUsage(
        auth_pb2.GetUsageRequest(api_key_id=created.api_key.id), metadata=_session(user)
    )
    assert usage.window_start_time.ToDatetime(tzinfo=dt.UTC) == quota.window_start(clock.now())
    assert usage.month_start_time.ToDatetime(tzinfo=dt.UTC).date() == quota.month_start(clock.now())
