"""The auth process's lean Check listener (services/common/h2unary.py) against real processes.

Two `kotadb serve auth` processes on port 0 stand in for two replicas; each also serves Check on
its own HTTP/2 listener, the port Envoy's ext_authz uses. These tests call that listener with a
real grpcio client, as Envoy would: decisions match the gRPC port's, a burst over both replicas
admits exactly the key's limit, and the listener answers gRPC health for Envoy's health checks.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import quota
from services.auth.check import AuthorizationServicer, Authorizer, Grant, allowed
from services.auth.ratelimit import Admission
from services.bench.auth import check_request
from services.common.identity import Identity
from services.common.supervisor import Supervisor
from tests.harness import CHECK_LISTENERS, seed_key, service_env, spawn_service, wait_healthy

IDENTITY_KEY = "check-listener-tests-identity-key-0123456789"


@dataclasses.dataclass(frozen=True)
class Replicas:
    grpc: list[str]
    check: list[str]


@pytest.fixture(scope="module")
def replicas(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir: Path = tmp_path_factory.mktemp("check-listener")
    env = service_env(database_url, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        addresses = [spawn_service(supervisor, workdir, f"auth{i}", "auth", env)[0] for i in range(2)]
        for address in addresses:
            wait_healthy(address, supervisor)
        yield Replicas(grpc=addresses, check=[CHECK_LISTENERS[a] for a in addresses])


def _checks(targets: list[str], key: str, count: int) -> list[external_auth_pb2.CheckResponse]:
    """_checks sends `count` concurrent Checks spread over `targets` (sync grpc futures, no event loop)."""
    channels = [grpc.insecure_channel(target) for target in targets]
    try:
        stubs = [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]
        request = check_request(key, "/v1/index")
        request.attributes.request.http.method = "GET"
        request.attributes.request.http.headers["content-type"] = "application/json"
        calls = [stubs[i % len(stubs)].Check.future(request, timeout=20) for i in range(count)]
        return [call.result() for call in calls]
    finally:
        for channel in channels:
            channel.close()


def test_a_burst_over_both_listeners_admits_exactly_the_limit(database_url: str, replicas: Replicas) -> None:
    key = seed_key(database_url, email_prefix="listener-burst", rate_limit=50)
    answers = _checks(replicas.check, key, 200)
    allowed = [a for a in answers if a.status.code == 0]
    refused = [a for a in answers if a.status.code != 0]
    assert len(allowed) == 50
    assert {a.denied_response.status.code for a in refused} == {429}
    for answer in refused:
        headers = {h.header.key: h.header.value for h in answer.denied_response.headers}
        assert headers["x-kotadb-error-reason"] == "RATE_LIMITED"
        assert int(headers["retry-after"]) >= 1


def test_the_listener_and_the_grpc_port_decide_alike(database_url: str, replicas: Replicas) -> None:
    key = seed_key(database_url, email_prefix="listener-alike", rate_limit=1000)
    for targets in (replicas.check, replicas.grpc):
        answers = _checks(targets, key, 20)
        assert all(a.status.code == 0 for a in answers)
        for answer in answers:
            added = {h.header.key: h.header.value for h in answer.ok_response.headers}
            assert added["x-kotadb-identity"]
            removed = set(answer.ok_response.headers_to_remove)
            assert {"authorization", "x-api-key"} <= removed
    unknown = _checks(replicas.check, "kdb_live_" + "x" * 40, 1)[0]
    assert unknown.denied_response.status.code == 401


def test_the_listener_answers_health_and_refuses_garbage(replicas: Replicas) -> None:
    with grpc.insecure_channel(replicas.check[0]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for path, body, code in (
            ("/envoy.service.auth.v3.Authorization/Check", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),
            ("/kotadb.v1.AuthService/ListApiKeys", b"", grpc.StatusCode.UNIMPLEMENTED),
        ):
            raw = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as raised:
                raw(body, timeout=10)
            assert raised.value.code() == code, path


def test_the_serialized_fast_answer_equals_the_message_answer() -> None:
    # check_bytes appends the RateLimit headers to a per-token cached prefix as a second
    # serialized CheckResponse; parsed, it must be exactly the answer Check builds as a message.
    clock = quota.FixedClock(datetime.datetime(2031, 3, 4, 5, 6, 7, tzinfo=datetime.UTC))
    identity = Identity(
        user_id=uuid.uuid4(), kind="api_key", permissions=frozenset({"read"}), key_id=uuid.uuid4()
    )
    servicer = AuthorizationServicer(cast(Authorizer, None))
    for remaining in (41, 40):
        admission = Admission(
            admitted=True,
            found=True,
            revoked=False,
            rate_limit=60,
            window_count=60 - remaining,
            monthly_quota=1000,
            usage_count=7,
            now=clock.now(),
            window_reset=quota.window_end(clock.now()),
            month_reset=quota.next_month_start(clock.now()),
        )
        grant = Grant(identity=identity, token="signed.token", admission=admission)
        fast = external_auth_pb2.CheckResponse.FromString(servicer._allowed_bytes(grant))
        assert fast == allowed(grant)
        rates = {h.header.key: h.header.value for h in fast.ok_response.response_headers_to_add}
        assert rates["ratelimit-remaining"] == str(remaining)
