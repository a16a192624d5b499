"""Real HTTP and gRPC through a real Envoy in front of the three real services.

The services run as `kotadb serve` subprocesses on port 0 against the session's migrated test
database, sharing one identity key; Envoy runs on free ports with the config `kotadb gateway
render` produces, so auth's Check guards every route and requests carry an API key written
into the database for this module. A second Envoy shares the same services but its search
cluster points at a port nobody listens on, so /health has something real to report. The auth
cases themselves are in tests/auth/test_gateway_auth.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.cli import status
from services.common.errors import Unimplemented
from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    free_port,
    seed_key,
    service_env,
    spawn_service,
    start_envoy,
    wait_gateway_healthy,
    wait_healthy,
)

IDENTITY_KEY = "gateway-e2e-tests-identity-key-0123456789"


@dataclass(frozen=True)
class Gateways:
    """Gateways are the two Envoys of this module, sharing one set of services, and an API key."""

    main: Envoy
    degraded: Envoy
    key: str


@pytest.fixture(scope="module")
def gateways(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    workdir = tmp_path_factory.mktemp("gateway-e2e")
    env = service_env(database_url, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        addresses = {name: spawn_service(supervisor, workdir, name, name, env)[0] for name in status.SERVICES}
        for address in addresses.values():
            wait_healthy(address, supervisor)
        auth, ingest, search = addresses["auth"], addresses["ingest"], addresses["search"]
        main = start_envoy(
            supervisor,
            workdir,
            "envoy-main",
            auth=auth,
            ingest=ingest,
            search=search,
            identity_key=IDENTITY_KEY,
        )
        dead_search = f"127.0.0.1:{free_port()}"
        degraded = start_envoy(
            supervisor,
            workdir,
            "envoy-degraded",
            auth=auth,
            ingest=ingest,
            search=dead_search,
            identity_key=IDENTITY_KEY,
        )
        wait_gateway_healthy(main, supervisor)
        key = seed_key(
            database_url, email_prefix="gateway-e2e", permissions=("read", "write"), rate_limit=6000
        )
        yield Gateways(main=main, degraded=degraded, key=key)


@dataclass(frozen=True)
class Reply:
    """Reply is an HTTP answer: status, content type and the parsed JSON body."""

    status: int
    content_type: str
    body: dict[str, Any]


def _request(method: str, url: str, body: bytes | None = None, key: str | None = None) -> Reply:
    headers = {"content-type": "application/json"} if body is not None else {}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            code, content_type, raw = (
                response.status,
                response.headers.get("content-type", ""),
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        code, content_type, raw = exc.code, exc.headers.get("content-type", ""), exc.read()
    try:
        parsed = json.loads(raw)
    except ValueError:
        pytest.fail(f"{method} {url} → {code} with a non-JSON body: {raw!r}")
    return Reply(code, content_type, parsed)


def _answered_by_gateway(reply: Reply) -> bool:
    """_answered_by_gateway is true for Envoy's own replies, whose ErrorInfo reason is GATEWAY_*."""
    details = reply.body.get("details", []) if reply.status >= 400 else []
    return any(str(d.get("reason", "")).startswith("GATEWAY_") for d in details)


def _error_info(body: dict[str, Any]) -> dict[str, Any]:
    infos = [d for d in body.get("details", []) if d["@type"].endswith("/google.rpc.ErrorInfo")]
    assert infos, f"no ErrorInfo in {body}"
    info: dict[str, Any] = infos[0]
    return info


def test_health_is_json_and_needs_no_key(gateways: Gateways) -> None:
    for found in (gateways.main,):
        reply = _request("GET", f"{found.url}/health")
        assert reply.status == 200
        assert reply.content_type.startswith("application/json")
        assert reply.body["status"] == "SERVING"


def test_health_reflects_an_unhealthy_backend(gateways: Gateways) -> None:
    reply = _request("GET", f"{gateways.degraded.url}/health")
    assert reply.status == 503
    assert reply.content_type.startswith("application/json")
    assert reply.body["status"] == "NOT_SERVING"
    assert reply.body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]


def test_unimplemented_rpc_is_a_json_501_with_its_reason(gateways: Gateways) -> None:
    body = json.dumps({"query": "needle"}).encode()
    reply = _request("POST", f"{gateways.main.url}/v1/code:search", body, key=gateways.key)
    assert reply.status == 501
    assert reply.content_type.startswith("application/json")
    assert reply.body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    info = _error_info(reply.body)
    assert info["reason"] == Unimplemented.default_reason
    assert info["domain"] == "kotadb.dev"
    assert "capability" in info["metadata"]


def test_bodies_beyond_envoys_buffer_reach_the_service(gateways: Gateways) -> None:
    # Larger than Envoy's default 1 MiB buffer: the service, not the gateway, decides on size.
    big = json.dumps({"query": "x" * (3 * 1024 * 1024)}).encode()
    reply = _request("POST", f"{gateways.main.url}/v1/code:search", big, key=gateways.key)
    assert not _answered_by_gateway(reply), reply.status


def test_unknown_path_is_a_json_404(gateways: Gateways) -> None:
    for method, path in (("GET", "/nope"), ("GET", "/v1/no-such-collection"), ("DELETE", "/v1/usage")):
        reply = _request(method, f"{gateways.main.url}{path}", key=gateways.key)
        assert reply.status == 404, (method, path, reply)
        assert reply.content_type.startswith("application/json")
        assert reply.body["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert path in reply.body["message"]


def test_malformed_json_body_is_a_json_400(gateways: Gateways) -> None:
    reply = _request("POST", f"{gateways.main.url}/v1/code:search", b'{"query": ', key=gateways.key)
    assert reply.status == 400
    assert reply.content_type.startswith("application/json")
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _error_info(reply.body)["reason"] == "GATEWAY_INVALID_ARGUMENT"


def test_unknown_query_parameter_is_a_json_400(gateways: Gateways) -> None:
    reply = _request("GET", f"{gateways.main.url}/v1/index?bogus_parameter=1", key=gateways.key)
    assert reply.status == 400
    assert reply.content_type.startswith("application/json")
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "bogus_parameter" in reply.body["message"]


def test_grpc_through_the_gateway_reaches_the_service(gateways: Gateways) -> None:
    credentials = (("authorization", f"Bearer {gateways.key}"),)
    with grpc.insecure_channel(gateways.main.target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SearchCode(search_pb2.SearchCodeRequest(query="needle"), metadata=credentials, timeout=30)
        call = raised.value
        assert isinstance(call, grpc.Call)
        assert call.code() == grpc.StatusCode.UNIMPLEMENTED
        # The rich status comes from the service's error interceptor, so the call got there.
        rich = rpc_status.from_call(call)
        assert rich is not None
        info = error_details_pb2.ErrorInfo()
        assert rich.details[0].Unpack(info)
        assert info.reason == Unimplemented.default_reason and info.domain == "kotadb.dev"

        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/no.such.Service/Method", None, None)(b"", metadata=credentials, timeout=30)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The JSON rewriting of local replies is for REST clients only; gRPC keeps plain messages.
        details = unknown.value.details() if isinstance(unknown.value, grpc.Call) else ""
        assert details and not details.lstrip().startswith("{"), details


def _denied_by_check(reply: Reply) -> bool:
    """_denied_by_check tells auth Check's refusal (a reason in its JSON body) from a service answer."""
    return reply.status in (401, 403, 404) and reply.body.get("reason") in (
        "MISSING_CREDENTIALS",
        "MISSING_PERMISSION",
        "ROUTE_NOT_FOUND",
    )


def test_ext_authz_guards_everything_but_the_webhook(gateways: Gateways) -> None:
    denied = _request("GET", f"{gateways.main.url}/v1/usage")
    assert denied.status == 401 and _denied_by_check(denied), denied
    assert denied.content_type.startswith("application/json")

    # The webhook route opts out of ext_authz: the request reaches the ingest service, whatever
    # that answers (an HMAC failure would be the service's error, not the gateway's).
    webhook = _request("POST", f"{gateways.main.url}/v1/webhooks/github/some-repository", b"{}")
    assert not _denied_by_check(webhook), webhook
    assert webhook.status != 401, webhook

    # Only POST on exactly that path is exempt.
    for method, path in (
        ("GET", "/v1/webhooks/github/some-repository"),
        ("POST", "/v1/webhooks/github/some-repository/extra"),
        ("POST", "/v1/code:search"),
    ):
        reply = _request(method, f"{gateways.main.url}{path}", b"{}" if method == "POST" else None)
        assert _denied_by_check(reply), (method, path, reply)

    # With a key, the same request gets through to the service.
    assert not _denied_by_check(_request("GET", f"{gateways.main.url}/v1/usage", key=gateways.key))
