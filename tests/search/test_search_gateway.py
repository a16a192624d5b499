"""The search API through the real gateway: REST/JSON and gRPC via Envoy, API keys, two tenants.

The three services run as `kotadb serve` processes against the session database with Envoy in
front. Each tenant writes through ingest's REST route and searches with the returned revision;
tenant B must never see tenant A's files in code search, streaming search, symbol search (both
routes), index status, or through A's page token.
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
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    seed_key,
    service_env,
    spawn_services,
    start_gateway,
)

IDENTITY_KEY = "search-gateway-tests-identity-key-0123456789"
PY = "class Lexer:\n    def next_token(self):\n        return 'secret_alpha'\n"


@dataclass(frozen=True)
class Stack:
    """Stack is the gateway of this module and one API key for each of two tenants."""

    envoy: Envoy
    alice: str
    bob: str


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("search-gateway")
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_INGEST_SYMBOL_WORKERS="1")
    env["KOTADB_SEARCH_LISTEN_URL"] = database_url
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        envoy = start_gateway(supervisor, workdir, addresses, IDENTITY_KEY)
        alice = seed_key(
            database_url, email_prefix="search-alice", permissions=("read", "write"), rate_limit=6000
        )
        bob = seed_key(
            database_url, email_prefix="search-bob", permissions=("read", "write"), rate_limit=6000
        )
        yield Stack(envoy, alice, bob)


def _http(method: str, url: str, key: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {key}"}
    if data is not None:
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            code, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    text = raw.decode()
    try:
        return code, json.loads(text)
    except json.JSONDecodeError:
        # Streaming routes answer one JSON object per message, one after the other.
        decoder, messages, at = json.JSONDecoder(), [], 0
        while text[at:].strip():
            at += len(text[at:]) - len(text[at:].lstrip())
            message, at = decoder.raw_decode(text, at)
            messages.append(message)
        return code, messages


def _write(stack: Stack, key: str, files: dict[str, str]) -> int:
    body = {"documents": [{"path": p, "text": t} for p, t in files.items()]}
    code, answer = _http("POST", f"{stack.envoy.url}/v1/documents:batchUpsert", key, body)
    assert code == 200, answer
    return int(answer["revision"])


def test_each_tenant_sees_only_its_own_code_over_rest(stack: Stack) -> None:
    base = stack.envoy.url
    revision = _write(stack, stack.alice, {f"lex/l{i}.py": PY for i in range(3)})
    bob_revision = _write(stack, stack.bob, {"bob/notes.txt": "nothing to see\n"})

    code, found = _http(
        "POST",
        f"{base}/v1/code:search",
        stack.alice,
        {
            "query": "secret_alpha",
            "minRevision": str(revision),
            "pageSize": 2,
            "mode": "SEARCH_MODE_EXHAUSTIVE",
        },
    )
    assert code == 200, found
    assert [f["path"] for f in found["fileMatches"]] == ["lex/l0.py", "lex/l1.py"]
    assert int(found["totalFileCount"]) == 3 and int(found["indexRevision"]) >= revision
    line = found["fileMatches"][0]["lineMatches"][0]
    assert (
        line["lineNumber"] == 3 and line["ranges"][0]["endByte"] - line["ranges"][0].get("startByte", 0) == 12
    )

    code, theirs = _http(
        "POST",
        f"{base}/v1/code:search",
        stack.bob,
        {"query": "secret_alpha", "minRevision": str(bob_revision)},
    )
    assert code == 200 and theirs.get("fileMatches", []) == [] and int(theirs.get("totalFileCount", 0)) == 0

    code, refused = _http(
        "POST",
        f"{base}/v1/code:search",
        stack.bob,
        {
            "query": "secret_alpha",
            "pageSize": 2,
            "mode": "SEARCH_MODE_EXHAUSTIVE",
            "pageToken": found["nextPageToken"],
        },
    )
    assert code == 400, refused
    code, rest = _http(
        "POST",
        f"{base}/v1/code:search",
        stack.alice,
        {
            "query": "secret_alpha",
            "pageSize": 2,
            "mode": "SEARCH_MODE_EXHAUSTIVE",
            "pageToken": found["nextPageToken"],
        },
    )
    assert code == 200 and [f["path"] for f in rest["fileMatches"]] == ["lex/l2.py"]

    code, stream = _http("POST", f"{base}/v1/code:streamSearch", stack.alice, {"query": "secret_alpha"})
    assert code == 200, stream
    messages = stream if isinstance(stream, list) else [stream]
    streamed = [f["path"] for m in messages for f in m.get("fileMatches", [])]
    assert sorted(streamed) == ["lex/l0.py", "lex/l1.py", "lex/l2.py"] and messages[-1]["done"]
    code, bob_stream = _http("POST", f"{base}/v1/code:streamSearch", stack.bob, {"query": "secret_alpha"})
    bob_messages = bob_stream if isinstance(bob_stream, list) else [bob_stream]
    assert code == 200 and [m.get("fileMatches", []) for m in bob_messages] == [[]]

    code, symbols = _http(
        "POST", f"{base}/api/v1/symbols/search", stack.alice, {"pattern": "next_tok", "limit": 10}
    )
    assert code == 200 and {s["path"] for s in symbols["symbols"]} == {f"lex/l{i}.py" for i in range(3)}
    for route, body in (
        ("/api/v1/symbols/search", {"pattern": "next_tok", "limit": 10}),
        ("/v1/symbols:search", {"query": "Lexer"}),
    ):
        code, none = _http("POST", f"{base}{route}", stack.bob, body)
        assert code == 200 and none.get("symbols", []) == [] and int(none.get("totalCount", 0)) == 0

    code, mine = _http("GET", f"{base}/v1/index", stack.alice)
    code_b, bobs = _http("GET", f"{base}/v1/index", stack.bob)
    assert code == code_b == 200
    assert int(mine["documentCount"]) == 3 and int(bobs["documentCount"]) == 1


def test_grpc_through_the_gateway_is_scoped_to_the_key(stack: Stack) -> None:
    revision = _write(stack, stack.alice, {"grpc/only_alice.txt": "gateway_grpc_marker\n"})
    with grpc.insecure_channel(stack.envoy.target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        alice = (("authorization", f"Bearer {stack.alice}"),)
        bob = (("authorization", f"Bearer {stack.bob}"),)
        request = search_pb2.SearchCodeRequest(query="gateway_grpc_marker", min_revision=revision)
        assert [f.path for f in stub.SearchCode(request, metadata=alice, timeout=30).file_matches] == [
            "grpc/only_alice.txt"
        ]
        assert list(stub.SearchCode(request, metadata=bob, timeout=30).file_matches) == []
        with pytest.raises(grpc.RpcError) as raised:
            stub.SearchCode(search_pb2.SearchCodeRequest(query="(unclosed"), metadata=alice, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
