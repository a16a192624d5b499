"""Checks answered on auth's lean Check listener are counted like every other RPC.

Envoy asks auth's Check on the Check-only HTTP/2 listener (services/common/h2unary.py), not
through grpc.aio, so the interceptor that records `kotadb_rpc_handled_total` and
`kotadb_rpc_duration_seconds` never sees those calls; the listener records them itself with the
same labels. A real `kotadb serve auth` child answers Checks on its Check port (allowed, denied,
and one unparsable request), then its metrics port is scraped as Prometheus would.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.bench.auth import check_request
from services.common.server import listener_port_file
from services.common.supervisor import Supervisor
from tests.harness import CHECK_LISTENERS, seed_key, service_env, spawn_service, wait_healthy

IDENTITY_KEY = "check-metrics-identity-key-0123456789abcdef"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
SEARCH_PATH = "/kotadb.v1.SearchService/SearchCode"


@dataclass(frozen=True)
class Auth:
    """Auth is the auth child: its Check listener, its metrics URL and a usable key."""

    check_target: str
    metrics_url: str
    key: str


@pytest.fixture(scope="module")
def auth(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Auth]:
    workdir = tmp_path_factory.mktemp("check-metrics")
    env = service_env(database_url, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        address, _ = spawn_service(supervisor, workdir, "auth", "auth", env)
        wait_healthy(address, supervisor)
        metrics_port = int(listener_port_file(workdir / "auth.port", "metrics").read_text())
        key = seed_key(database_url, email_prefix="check-metrics", rate_limit=6000)
        yield Auth(CHECK_LISTENERS[address], f"http://127.0.0.1:{metrics_port}/metrics", key)


def _samples(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return 0.0


def _handled(samples: list[Sample], code: str) -> float:
    return _value(samples, "kotadb_rpc_handled_total", service="auth", method=CHECK_PATH, code=code)


def _durations(samples: list[Sample]) -> float:
    return _value(samples, "kotadb_rpc_duration_seconds_count", service="auth", method=CHECK_PATH)


def test_checks_on_the_check_listener_are_counted(auth: Auth) -> None:
    before = _samples(auth.metrics_url)
    allowed = denied = 0
    with grpc.insecure_channel(auth.check_target) as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
        for n in range(12):
            key = auth.key if n % 3 else "kdb_not_a_real_key"
            answer: external_auth_pb2.CheckResponse = check(check_request(key, SEARCH_PATH), timeout=30)
            if answer.status.code == 0:
                allowed += 1
            else:
                denied += 1
        # Bytes that are not a CheckRequest: the listener's handler refuses them itself.
        raw = channel.unary_unary(CHECK_PATH, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            raw(b"\xff\xff\xff", timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert allowed == 8 and denied == 4
    after = _samples(auth.metrics_url)
    # A denial is a Check answered OK (the verdict is in the message), as on the gRPC port.
    assert _handled(after, "OK") - _handled(before, "OK") == 12
    assert _handled(after, "INVALID_ARGUMENT") - _handled(before, "INVALID_ARGUMENT") == 1
    assert _durations(after) - _durations(before) == 13
    bucket = _value(after, "kotadb_rpc_duration_seconds_bucket", service="auth", method=CHECK_PATH, le="+Inf")
    assert bucket == _durations(after)
