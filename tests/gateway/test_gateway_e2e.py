"""Real HTTP and gRPC through a real Envoy in front of the three real services.

The stack is tests/gateway/conftest.py's: `kotadb serve` subprocesses on port 0 against the
session's migrated test database, and Envoys running the config `kotadb gateway render`
produces, so auth's Check guards every route and requests carry an API key written into the
database for this package. The auth cases themselves are in tests/auth/test_gateway_auth.py;
size limits and memory in test_gateway_limits.py; secrets in logs and files in
test_gateway_secrets.py.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kotadb.v1 import search_pb2, search_pb2_grpc

from tests.gateway.conftest import Gateways, Reply, request


def _request(method: str, url: str, body: bytes | None = None, key: str | None = None) -> Reply:
    reply = request(method, url, body, key)
    assert reply.body is not None  # every answer is JSON
    return reply


def _answered_by_gateway(reply: Reply) -> bool:
    """_answered_by_gateway is true for Envoy's own replies: no upstream answered."""
    return reply.status >= 400 and not reply.reached_service


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


def test_a_service_error_is_json_with_its_reason(gateways: Gateways) -> None:
    # An unbalanced parenthesis: the search service refuses the query with a rich status, which
    # the transcoder renders as the API's JSON error with the matching HTTP status.
    body = json.dumps({"query": "(needle"}).encode()
    reply = _request("POST", f"{gateways.main.url}/v1/code:search", body, key=gateways.key)
    assert reply.status == 400, reply
    assert reply.content_type.startswith("application/json")
    assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = _error_info(reply.body)
    assert info["reason"] == "INVALID_QUERY"
    assert info["domain"] == "kotadb.dev"
    assert "position" in info["metadata"]


def test_batch_bodies_beyond_envoys_buffers_reach_the_service(gateways: Gateways) -> None:
    # Far larger than the 32 KiB connection buffer and the 1 MiB default body limit, within the
    # batch limit: the transcoder carries it to the ingest service, which answers.
    document = {"path": "big.txt", "text": "x" * (3 * 1024 * 1024)}
    big = json.dumps({"documents": [document]}).encode()
    reply = _request("POST", f"{gateways.main.url}/v1/documents:batchUpsert", big, key=gateways.key)
    assert reply.reached_service, (reply.status, reply.raw[:300])
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
        answer = stub.SearchCode(
            search_pb2.SearchCodeRequest(query="needle"), metadata=credentials, timeout=30
        )
        assert answer.stats is not None  # a real (empty) answer from the search service
        with pytest.raises(grpc.RpcError) as raised:
            stub.SearchCode(search_pb2.SearchCodeRequest(query="(needle"), metadata=credentials, timeout=30)
        call = raised.value
        assert isinstance(call, grpc.Call)
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The rich status comes from the service's error interceptor, so the call got there.
        rich = rpc_status.from_call(call)
        assert rich is not None
        info = error_details_pb2.ErrorInfo()
        assert rich.details[0].Unpack(info)
        assert info.reason == "INVALID_QUERY" and info.domain == "kotadb.dev"

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
