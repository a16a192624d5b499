"""Every error a REST client receives has one JSON shape, whoever produced it.

The shape is services/common/errors.py's `error_body`: exactly `code`, `message`, `reason`,
`details`, in that order, `reason` equal to `details[0].reason` (the ErrorInfo). Services'
errors come back through Envoy's transcoder, which writes a google.rpc.Status without `reason`;
the gateway's Lua filter (deploy/envoy/errorshape.lua) inserts it. Check's denials and Envoy's
own replies already have the shape. Successful answers, unary and streamed (NDJSON), pass
through as the transcoder wrote them. The stack is tests/gateway/conftest.py's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.gateway.conftest import Gateways, Reply, request
from tests.harness import seed_key

KEYS = ["code", "message", "reason", "details"]
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
REQUEST_INFO = "type.googleapis.com/google.rpc.RequestInfo"


def _ordered_keys(reply: Reply) -> list[str]:
    """_ordered_keys is the body's top-level keys in the order the bytes hold them."""
    pairs: list[tuple[str, Any]] = json.loads(reply.raw, object_pairs_hook=lambda items: items)
    return [key for key, _ in pairs]


def _assert_shape(reply: Reply, status: int, code: grpc.StatusCode, reason: str) -> dict[str, Any]:
    """_assert_shape checks one error reply against the API's error shape and returns its body."""
    assert reply.status == status, (reply.status, reply.raw[:400])
    assert reply.content_type.startswith("application/json"), reply.headers
    assert _ordered_keys(reply) == KEYS, reply.raw[:400]
    body = reply.body
    assert body["code"] == code.value[0]
    assert isinstance(body["message"], str) and body["message"]
    assert body["reason"] == reason
    assert body["details"][0]["@type"] == ERROR_INFO
    assert body["details"][0]["reason"] == reason
    assert body["details"][0]["domain"] == "kotadb.dev"
    # The header marks answers from the gateway or Check; a service's error does not carry it.
    if reply.reached_service:
        assert "x-kotadb-error-reason" not in reply.headers, reply.headers
    else:
        assert reply.headers.get("x-kotadb-error-reason") == reason
    return body


@pytest.fixture(scope="module")
def admin_key(gateways: Gateways) -> str:
    """admin_key is a key that may manage keys but not write: it cannot grant `write`."""
    return seed_key(gateways.database_url, email_prefix="errshape-admin", permissions=("read", "admin"))


def test_a_refused_query_from_the_search_service(gateways: Gateways) -> None:
    body = json.dumps({"query": "(x"}).encode()
    reply = request("POST", f"{gateways.main.url}/v1/code:search", body, gateways.key)
    assert reply.reached_service
    found = _assert_shape(reply, 400, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY")
    # The service's own details follow, untouched: the RequestInfo second.
    assert found["details"][1]["@type"] == REQUEST_INFO
    assert found["details"][1]["requestId"] == found["details"][0]["metadata"]["request_id"]


def test_an_unknown_document_from_the_ingest_service(gateways: Gateways) -> None:
    reply = request("GET", f"{gateways.main.url}/v1/documents/{uuid.uuid4()}", key=gateways.key)
    assert reply.reached_service
    _assert_shape(reply, 404, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


def test_an_unknown_job_on_a_streaming_method(gateways: Gateways) -> None:
    # WatchJob streams NDJSON; refused before its first message, it is a plain error reply.
    reply = request("GET", f"{gateways.main.url}/v1/jobs/{uuid.uuid4()}:watch", key=gateways.key)
    assert reply.reached_service
    _assert_shape(reply, 404, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")


def test_a_permission_refused_by_the_auth_service_itself(gateways: Gateways, admin_key: str) -> None:
    # Check lets an admin key manage keys; the auth service refuses a grant beyond the key's own.
    body = json.dumps({"apiKey": {"name": "escalate", "permissions": ["WRITE"]}}).encode()
    reply = request("POST", f"{gateways.main.url}/v1/apiKeys", body, admin_key)
    assert reply.reached_service
    _assert_shape(reply, 403, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_ESCALATION")


def test_a_rate_limit_from_check(gateways: Gateways) -> None:
    key = seed_key(gateways.database_url, email_prefix="errshape-rate", rate_limit=1)
    url = f"{gateways.main.url}/v1/index"
    replies = [request("GET", url, key=key) for _ in range(3)]
    limited = [r for r in replies if r.status == 429]
    assert limited, [r.status for r in replies]
    body = _assert_shape(limited[0], 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert not limited[0].reached_service
    assert body["details"][1]["@type"] == REQUEST_INFO


def test_envoys_own_reply(gateways: Gateways) -> None:
    # Malformed JSON: the transcoder refuses it before any service sees it.
    reply = request("POST", f"{gateways.main.url}/v1/code:search", b'{"query": ', gateways.key)
    assert not reply.reached_service
    _assert_shape(reply, 400, grpc.StatusCode.INVALID_ARGUMENT, "GATEWAY_INVALID_ARGUMENT")


def test_an_unknown_path_from_check(gateways: Gateways) -> None:
    reply = request("GET", f"{gateways.main.url}/v1/no/such/path", key=gateways.key)
    _assert_shape(reply, 404, grpc.StatusCode.NOT_FOUND, "ROUTE_NOT_FOUND")


def test_a_missing_key_from_check(gateways: Gateways) -> None:
    reply = request("GET", f"{gateways.main.url}/v1/index")
    _assert_shape(reply, 401, grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")


def _lines(reply: Reply) -> Iterator[dict[str, Any]]:
    for line in reply.raw.splitlines():
        if line.strip():
            parsed: dict[str, Any] = json.loads(line)
            yield parsed


def test_successes_pass_through(gateways: Gateways) -> None:
    documents = [
        {"path": f"errshape/{n}.py", "text": f"def errshape_marker_{n}():\n    return {n}\n"}
        for n in range(3)
    ]
    written = request(
        "POST",
        f"{gateways.main.url}/v1/documents:batchUpsert",
        json.dumps({"documents": documents}).encode(),
        gateways.key,
    )
    assert written.status == 200, written.raw[:400]
    assert "reason" not in written.body and "x-kotadb-error-reason" not in written.headers
    revision = int(written.body["revision"])
    # A unary success: the transcoder's JSON, byte for byte what the gRPC answer prints as.
    query = {"query": "errshape_marker_", "minRevision": str(revision)}
    found = request("POST", f"{gateways.main.url}/v1/code:search", json.dumps(query).encode(), gateways.key)
    assert found.status == 200, found.raw[:400]
    assert "x-kotadb-error-reason" not in found.headers
    assert {m["path"] for m in found.body["fileMatches"]} == {d["path"] for d in documents}
    # A streamed success: newline-delimited messages, each its own JSON object, none rewritten.
    streamed = request(
        "POST", f"{gateways.main.url}/v1/code:streamSearch", json.dumps(query).encode(), gateways.key
    )
    assert streamed.status == 200, streamed.raw[:400]
    assert "x-kotadb-error-reason" not in streamed.headers
    messages = list(_lines(streamed))
    assert messages and messages[-1]["done"] is True
    assert all("reason" not in m for m in messages)
    paths = {m["path"] for message in messages for m in message.get("fileMatches", [])}
    assert paths == {d["path"] for d in documents}


def test_a_body_refused_before_check(gateways: Gateways) -> None:
    # The body limit answers before ext_authz and the transcoder: the Lua filter, first in the
    # chain, still sees its reply.
    big = json.dumps({"query": "x" * (2 * 1024 * 1024)}).encode()
    reply = request("POST", f"{gateways.main.url}/v1/code:search", big, gateways.key)
    assert not reply.reached_service
    _assert_shape(reply, 413, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE")
