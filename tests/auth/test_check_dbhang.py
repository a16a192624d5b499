"""Check against a database that hangs: answers from memory when it can, a JSON 503 when it cannot.

A database that refuses connections is easy: every query fails at once. One that hangs — the
server stopped (SIGSTOP) with its connections open — answers nothing and closes nothing, so an
unbounded query waits forever and Envoy's 2 s ext_authz timeout answers an empty 503 instead of
Check. The test stops a dedicated embedded cluster (postmaster and every backend) and checks:

* what Check can decide from memory is still decided: a session JWT, and a cached key whose
  window is known to be spent (429, not 503);
* what needs the database fails closed with 503 `DATABASE_UNAVAILABLE`, the JSON error body and
  `Retry-After` — an answer, not a hang (without bounded waits this test never gets one);
* once the server resumes (SIGCONT), checks succeed again by themselves.

The cluster is resumed in a `finally`, whatever happens, before it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import jwt
import psutil
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from services.auth import quota
from services.auth.check import AuthorizationServicer, Authorizer
from services.auth.config import AuthSettings
from services.auth.keycache import KeyCache
from services.auth.ratelimit import Admitter
from services.auth.routes import RouteTable
from services.auth.sessions import SessionVerifier
from services.common import migrate
from services.common.identity import IdentityCodec
from services.common.pgembed import EmbeddedPostgres
from tests.auth.conftest import open_lazy_pool
from tests.auth.test_check import Answer
from tests.auth.test_ratelimit import insert_key

IDENTITY_KEY = "dbhang-tests-identity-key-0123456789abcdef"
JWT_SECRET = "dbhang-tests-jwt-secret-0123456789abcdef"
SEARCH = ("POST", "/v1/code:search")
KEYS = ("GET", "/v1/apiKeys")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    """cluster is a migrated embedded Postgres of this module's own, so it can be stopped."""
    home = Path(tempfile.mkdtemp(prefix="kotadb-dbhang-pg-"))
    home.chmod(0o711)
    embedded = EmbeddedPostgres(home, durable=False)
    try:
        dsn = embedded.start()
        migrate.apply_bootstrap(dsn)
        migrate.apply_migrations(dsn)
        yield embedded
    finally:
        embedded.stop()


def _server_processes(cluster: EmbeddedPostgres) -> list[psutil.Process]:
    """_server_processes are the postmaster and all its children (every backend and helper)."""
    pid = cluster.postmaster_pid or int((cluster.pgdata / "postmaster.pid").read_text().splitlines()[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def _signal_all(processes: list[psutil.Process], signum: signal.Signals) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _session(user_id: uuid.UUID) -> str:
    claims = {
        "sub": str(user_id),
        "role": "authenticated",
        "aud": "authenticated",
        "exp": int(time.time()) + 600,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _request(route: tuple[str, str], key: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = route
    http.headers.update({"authorization": f"Bearer {key}", "x-request-id": uuid.uuid4().hex})
    return request


async def test_a_hung_database_gets_answers_from_memory_or_a_json_503(cluster: EmbeddedPostgres) -> None:
    dsn = cluster.dsn
    admin = await asyncpg.connect(dsn)
    try:
        user = await admin.fetchval(
            "insert into auth.users (id, aud, role, email) values (gen_random_uuid(), 'authenticated',"
            " 'authenticated', 'dbhang-' || gen_random_uuid() || '@example.test') returning id"
        )
    finally:
        await admin.close()
    lazy = await open_lazy_pool(dsn, size=4)
    helper = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    spent_key, _ = await insert_key(helper, user, rate_limit=1)
    fresh_key, _ = await insert_key(helper, user)
    await helper.close()

    clock = quota.SystemClock()
    cache = KeyCache(lazy, dsn, ttl=300.0, db_timeout=0.5)
    admitter = Admitter(lazy, clock, db_timeout=0.5)
    servicer = AuthorizationServicer(
        Authorizer(
            routes=RouteTable(),
            cache=cache,
            admitter=admitter,
            sessions=SessionVerifier(AuthSettings(database_url=dsn, jwt_secret=JWT_SECRET)),
            codec=IdentityCodec(IDENTITY_KEY),
            clock=clock,
        )
    )

    async def check(route: tuple[str, str], key: str) -> Answer:
        request = _request(route, key)
        response = servicer.decide_now(request)
        if response is None:
            # A bound far above Check's own: reaching it means Check hung, which is the bug.
            response = await asyncio.wait_for(servicer.decide_later(request), timeout=30)
        return Answer(response)

    cache.start()
    processes: list[psutil.Process] = []
    try:
        assert await cache.wait_listening(20)
        # Stay clear of a minute boundary: the spent window must still be this one's below.
        if datetime.datetime.now(datetime.UTC).second >= 45:
            await asyncio.sleep(61 - datetime.datetime.now(datetime.UTC).second)
        assert (await check(SEARCH, spent_key)).allowed
        assert (await check(SEARCH, spent_key)).status == 429  # the window is spent, and known so

        processes = _server_processes(cluster)
        _signal_all(processes, signal.SIGSTOP)

        # From memory: a session needs no database, a spent window is known to be spent.
        assert (await check(KEYS, _session(user))).allowed
        refused = await check(SEARCH, spent_key)
        assert refused.status == 429 and refused.reason == "RATE_LIMITED"
        # A key never seen needs the database: fail closed, with an answer.
        for _ in range(3):
            down = await check(SEARCH, fresh_key)
            assert not down.allowed and down.status == 503, down.response
            assert down.reason == "DATABASE_UNAVAILABLE"
            assert int(down.headers["retry-after"]) >= 1
            assert down.headers["content-type"] == "application/json"
            body = down.body
            assert set(body) == {"code", "message", "reason", "details"}
            assert (body["code"], body["reason"]) == (14, "DATABASE_UNAVAILABLE")
            assert body["details"][0]["reason"] == "DATABASE_UNAVAILABLE"

        _signal_all(processes, signal.SIGCONT)
        processes = []
        deadline = time.monotonic() + 60
        answer = await check(SEARCH, fresh_key)
        while not answer.allowed and time.monotonic() < deadline:
            assert answer.status == 503, answer.response
            await asyncio.sleep(0.2)
            answer = await check(SEARCH, fresh_key)
        assert answer.allowed, answer.response
    finally:
        _signal_all(processes, signal.SIGCONT)
        await admitter.close()
        await cache.close()
        await lazy.close(wait=5)
