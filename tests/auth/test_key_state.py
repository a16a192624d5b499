"""One rule per concept in auth: key usability, the caller, the key row, the admission.

Whether a key works: Check, ValidateApiKey and the API's key state agree.

Every combination of revoked, expired, rotated-out and rotating is written to real rows; each
key is then asked about through Check (a real CheckRig), through `KeyManager.validate` (what
ValidateApiKey runs) and through `ApiKeyRecord.state` (what GetApiKey/ListApiKeys report). The
three must give the same answer, in the one documented order (services/auth/store.py
`key_state`): revoked, then expired, then rotated out.
"""

from __future__ import annotations

import datetime
import importlib.util
import itertools
import typing
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.auth import keycache, keyrequests, management, quota, ratelimit
from services.auth.config import AuthSettings
from services.auth.management import KeyManager
from services.auth.sessions import SessionVerifier
from services.auth.store import ApiKeyRecord, AuthStore, key_state
from services.common.errors import Unauthenticated
from services.common.identity import Identity
from services.common.server import LazyPool
from tests.auth.test_check import SEARCH_REST, CheckRig
from tests.auth.test_ratelimit import insert_key

UTC = datetime.UTC

# API error reason, ApiKey.State name, for each outcome of key_state.
EXPECTED = {
    "REVOKED": ("API_KEY_REVOKED", "REVOKED"),
    "EXPIRED": ("API_KEY_EXPIRED", "EXPIRED"),
    "ROTATED": ("API_KEY_ROTATED", "REVOKED"),
    "ROTATING": ("", "ROTATING"),
    "ACTIVE": ("", "ACTIVE"),
}


@pytest.fixture
async def rig(lazy: LazyPool, database_url: str) -> AsyncIterator[CheckRig]:
    started = CheckRig(lazy, database_url, quota.SystemClock())
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def _expected(revoked: bool, expired: bool, rotated_out: bool, rotating: bool) -> str:
    if revoked:
        return "REVOKED"
    if expired:
        return "EXPIRED"
    if rotated_out:
        return "ROTATED"
    return "ROTATING" if rotating else "ACTIVE"


async def test_check_validate_and_state_agree_on_every_combination(
    rig: CheckRig, lazy: LazyPool, database_url: str, pool: asyncpg.Pool, user_factory: Any
) -> None:
    user = await user_factory()
    now = datetime.datetime.now(UTC)
    past, future = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)
    store = AuthStore(lazy)
    manager = KeyManager(store, AuthSettings(database_url=database_url))
    for revoked, expired, rotated_out, rotating in itertools.product((False, True), repeat=4):
        if rotated_out and rotating:
            continue  # one grace_until: past or future
        grace = past if rotated_out else future if rotating else None
        secret, key_id = await insert_key(
            pool,
            user,
            revoked_at=past if revoked else None,
            expires_at=past if expired else future,
            grace_until=grace,
        )
        case = (revoked, expired, rotated_out, rotating)
        outcome = _expected(*case)
        reason, state = EXPECTED[outcome]

        answer = await rig.check(SEARCH_REST, key=secret)
        if reason:
            assert (answer.status, answer.reason) == (401, reason), case
            with pytest.raises(Unauthenticated) as refused:
                await manager.validate(secret)
            assert refused.value.reason == reason, case
        else:
            assert answer.allowed, case
            assert (await manager.validate(secret)).record.id == key_id

        async with store.transaction(Identity.service()) as conn:
            record = await store.get(conn, key_id)
        assert key_state(record, datetime.datetime.now(UTC)) == outcome, case
        assert record.state(datetime.datetime.now(UTC)) == state, case


async def test_an_expired_key_past_its_rotation_grace_is_expired_everywhere(
    rig: CheckRig, lazy: LazyPool, database_url: str, pool: asyncpg.Pool, user_factory: Any
) -> None:
    # The case the issue reported: Check said API_KEY_EXPIRED, ValidateApiKey API_KEY_ROTATED.
    user = await user_factory()
    past = datetime.datetime.now(UTC) - datetime.timedelta(minutes=1)
    secret, key_id = await insert_key(pool, user, expires_at=past, grace_until=past)
    assert (await rig.check(SEARCH_REST, key=secret)).reason == "API_KEY_EXPIRED"
    manager = KeyManager(AuthStore(lazy), AuthSettings(database_url=database_url))
    with pytest.raises(Unauthenticated) as refused:
        await manager.validate(secret)
    assert refused.value.reason == "API_KEY_EXPIRED"
    record = await manager.get(Identity.service(), key_id)
    assert record.state(datetime.datetime.now(UTC)) == "EXPIRED"


def test_one_type_per_concept() -> None:
    # The caller was Principal (auth) and Identity (common), converted in three places; the key
    # row KeyRecord and ApiKeyRecord; an admission two Admission types. One of each now.
    assert importlib.util.find_spec("services.auth.principal") is None
    assert not hasattr(keycache, "KeyRecord")
    assert vars(keyrequests)["Admission"] is ratelimit.Admission
    assert management.Admission is ratelimit.Admission
    assert typing.get_type_hints(keyrequests.RequestMeter.admit)["return"] is ratelimit.Admission
    assert typing.get_type_hints(keycache.KeyCache.lookup)["return"] == ApiKeyRecord | None
    assert typing.get_type_hints(SessionVerifier.verify)["return"] is Identity


def test_one_permission_rule_for_every_caller() -> None:
    user, key = uuid.uuid4(), uuid.uuid4()
    callers = {
        "session": Identity.user(user),
        "reader": Identity.api_key(user, key, frozenset({"read"})),
        "admin key": Identity.api_key(user, key, frozenset({"admin"})),
        "service": Identity.service(),
    }
    # permission → callers that have it ("" needs nothing, "service" is internal).
    table = {
        "": {"session", "reader", "admin key", "service"},
        "read": {"session", "reader", "service"},
        "write": {"session", "service"},
        "admin": {"session", "admin key", "service"},
        "service": {"service"},
    }
    for permission, holders in table.items():
        assert {name for name, caller in callers.items() if caller.has(permission)} == holders, permission
    assert {name for name, caller in callers.items() if caller.may_manage_keys()} == {
        "session",
        "admin key",
        "service",
    }
    with pytest.raises(ValueError):
        Identity(user_id=None, kind="user", permissions=frozenset())
    with pytest.raises(ValueError):
        Identity(user_id=user, kind="api_key", permissions=frozenset({"read"}))
