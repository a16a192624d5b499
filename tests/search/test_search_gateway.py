"""The search API through the real gateway: REST/JSON and gRPC via Envoy, API keys, two tenants.

The three services run as `kotadb serve` processes against the session database with Envoy in
front. Each tenant writes through ingest's REST route and searches with the returned revision;
tenant B must never see tenant A's files in code search, streaming search, symbol search (both
routes), index status, or through A's page token.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from kotadb.v1 import search_pb2, search_pb2_grpc

from tests.gatewayhttp import GatewayStack, http_json, two_tenants

IDENTITY_KEY = "search-gateway-tests-identity-key-0123456789"
PY = "class Lexer:\n    def next_token(self):\n        return 'secret_alpha'\n"


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    workdir = tmp_path_factory.mktemp("search-gateway")
    env = {"KOTADB_INGEST_SYMBOL_WORKERS": "1", "KOTADB_SEARCH_LISTEN_URL": database_url}
    with two_tenants(database_url, workdir, IDENTITY_KEY, "search", **env) as stack:
        yield stack


def _write(stack: GatewayStack, key: str, files: dict[str, str]) -> int:
    body = {"documents": [{"path": p, "text": t} for p, t in files.items()]}
    code, answer = http_json("POST", f"{stack.envoy.url}/v1/documents:batchUpsert", key, body)
    assert code == 200, answer
    return int(answer["revision"])


def test_each_tenant_sees_only_its_own_code_over_rest(stack: GatewayStack) -> None:
    base = stack.envoy.url
    revision = _write(stack, stack.alice, {f"lex/l{i}.py": PY for i in range(3)})
    bob_revision = _write(stack, stack.bob, {"bob/notes.txt": "nothing to see\n"})

    code, found = http_json(
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

    code, theirs = http_json(
        "POST",
        f"{base}/v1/code:search",
        stack.bob,
        {"query": "secret_alpha", "minRevision": str(bob_revision)},
    )
    assert code == 200 and theirs.get("fileMatches", []) == [] and int(theirs.get("totalFileCount", 0)) == 0

    code, refused = http_json(
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
    code, rest = http_json(
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

    code, stream = http_json("POST", f"{base}/v1/code:streamSearch", stack.alice, {"query": "secret_alpha"})
    assert code == 200, stream
    messages = stream if isinstance(stream, list) else [stream]
    streamed = [f["path"] for m in messages for f in m.get("fileMatches", [])]
    assert sorted(streamed) == ["lex/l0.py", "lex/l1.py", "lex/l2.py"] and messages[-1]["done"]
    code, bob_stream = http_json("POST", f"{base}/v1/code:streamSearch", stack.bob, {"query": "secret_alpha"})
    bob_messages = bob_stream if isinstance(bob_stream, list) else [bob_stream]
    assert code == 200 and [m.get("fileMatches", []) for m in bob_messages] == [[]]

    code, symbols = http_json(
        "POST", f"{base}/api/v1/symbols/search", stack.alice, {"pattern": "next_tok", "limit": 10}
    )
    assert code == 200 and {s["path"] for s in symbols["symbols"]} == {f"lex/l{i}.py" for i in range(3)}
    for route, body in (
        ("/api/v1/symbols/search", {"pattern": "next_tok", "limit": 10}),
        ("/v1/symbols:search", {"query": "Lexer"}),
    ):
        code, none = http_json("POST", f"{base}{route}", stack.bob, body)
        assert code == 200 and none.get("symbols", []) == [] and int(none.get("totalCount", 0)) == 0

    code, mine = http_json("GET", f"{base}/v1/index", stack.alice)
    code_b, bobs = http_json("GET", f"{base}/v1/index", stack.bob)
    assert code == code_b == 200
    assert int(mine["documentCount"]) == 3 and int(bobs["documentCount"]) == 1


def test_grpc_through_the_gateway_is_scoped_to_the_key(stack: GatewayStack) -> None:
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
