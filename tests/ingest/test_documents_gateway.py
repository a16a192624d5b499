"""The document API through the real gateway: REST/JSON and gRPC via Envoy, API keys, two tenants.

The three services run as `kotadb serve` processes against the session database, Envoy in
front with auth's Check; each tenant has its own API key (read + write) written into the
database. REST batchUpsert must answer bad items per item with BadRequest field violations and
commit the rest; tenant B must not read, list or delete tenant A's documents, over REST or gRPC.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    seed_key,
    service_env,
    spawn_services,
    start_gateway,
)

IDENTITY_KEY = "ingest-gateway-tests-identity-key-0123456789"


@dataclass(frozen=True)
class Stack:
    """Stack is the gateway of this module and one API key for each of two tenants."""

    envoy: Envoy
    alice: str
    bob: str


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("ingest-gateway")
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_INGEST_SYMBOL_WORKERS="1")
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        envoy = start_gateway(supervisor, workdir, addresses, IDENTITY_KEY)
        alice = seed_key(
            database_url, email_prefix="ingest-alice", permissions=("read", "write"), rate_limit=6000
        )
        bob = seed_key(
            database_url, email_prefix="ingest-bob", permissions=("read", "write"), rate_limit=6000
        )
        yield Stack(envoy, alice, bob)


def _http(method: str, url: str, key: str, body: Any = None) -> tuple[int, dict[str, Any]]:
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
    parsed: dict[str, Any] = json.loads(raw)
    return code, parsed


def _reason(body: dict[str, Any]) -> str:
    infos = [d for d in body.get("details", []) if d["@type"].endswith("/google.rpc.ErrorInfo")]
    assert infos, body
    return str(infos[0]["reason"])


def test_batch_upsert_over_rest_answers_per_item(stack: Stack) -> None:
    url = f"{stack.envoy.url}/v1/documents:batchUpsert"
    body = {
        "requestId": "rest-1",
        "documents": [
            {
                "path": "src/main.py",
                "text": "def main():\n    return 1\n",
                "tags": ["cli"],
                "metadata": {"k": "v"},
            },
            {"path": "../../etc/passwd", "text": "root"},
            {"path": "blob.bin", "contentBytes": base64.b64encode(b"\x00\x01\x02").decode()},
            {"path": "latin.txt", "contentBytes": base64.b64encode("caf\xe9".encode("latin-1")).decode()},
        ],
    }
    code, answer = _http("POST", url, stack.alice, body)
    assert code == 200, answer
    results = answer["results"]
    assert [[(v["field"], v["reason"]) for v in r["fieldViolations"]] for r in results] == [
        [],
        [("documents[1].path", "PATH_TRAVERSAL")],
        [("documents[2].content_bytes", "CONTENT_BINARY")],
        [("documents[3].content_bytes", "CONTENT_NOT_UTF8")],
    ]
    main = results[0]
    assert main["created"] is True and main["indexState"] == "INDEXABLE"
    assert int(answer["revision"]) == int(main["revision"]) > 0

    # The retry returns the first answer; the document is unchanged by it.
    code, again = _http("POST", url, stack.alice, body)
    assert code == 200 and again == answer
    code, unchanged = _http("POST", url, stack.alice, {"documents": body["documents"][:1]})
    assert unchanged["results"][0]["unchanged"] is True
    assert unchanged["results"][0]["revision"] == main["revision"]

    code, got = _http("GET", f"{stack.envoy.url}/v1/documents/{main['id']}", stack.alice)
    assert code == 200 and got["text"] == "def main():\n    return 1\n" and got["language"] == "python"
    query = urllib.parse.urlencode({"pathPrefix": "src/", "readMask": "path,contentHash"})
    code, listed = _http("GET", f"{stack.envoy.url}/v1/documents?{query}", stack.alice)
    assert code == 200, listed
    assert [(d["path"], d["contentHash"]) for d in listed["documents"]] == [
        ("src/main.py", main["contentHash"])
    ]
    assert "text" not in listed["documents"][0] or listed["documents"][0]["text"] == ""

    code, refused = _http(
        "POST", url, stack.alice, {"documents": [{"path": f"f{i}", "text": "x"} for i in range(1001)]}
    )
    assert code == 400 and _reason(refused) == "TOO_MANY_DOCUMENTS"


def test_tenants_cannot_reach_each_other_over_rest_and_grpc(stack: Stack) -> None:
    base = stack.envoy.url
    code, written = _http(
        "POST",
        f"{base}/v1/documents:batchUpsert",
        stack.alice,
        {"documents": [{"path": "private.py", "text": "S = 1\n"}]},
    )
    assert code == 200, written
    doc_id = written["results"][0]["id"]

    code, body = _http("GET", f"{base}/v1/documents/{doc_id}", stack.bob)
    assert code == 404 and _reason(body) == "NOT_FOUND"
    code, body = _http("DELETE", f"{base}/v1/documents/{doc_id}", stack.bob)
    assert code == 404 and _reason(body) == "NOT_FOUND"
    code, body = _http("GET", f"{base}/v1/documents?showDeleted=true", stack.bob)
    assert code == 200 and body.get("documents", []) == []

    with grpc.insecure_channel(stack.envoy.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        as_bob = (("authorization", f"Bearer {stack.bob}"),)
        for call in (
            lambda: stub.GetDocument(ingest_pb2.GetDocumentRequest(id=doc_id), metadata=as_bob, timeout=30),
            lambda: stub.DeleteDocument(
                ingest_pb2.DeleteDocumentRequest(id=doc_id), metadata=as_bob, timeout=30
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert isinstance(caught.value, grpc.Call) and caught.value.code() == grpc.StatusCode.NOT_FOUND
        listed = stub.ListDocuments(
            ingest_pb2.ListDocumentsRequest(show_deleted=True), metadata=as_bob, timeout=30
        )
        assert list(listed.documents) == []
        as_alice = (("authorization", f"Bearer {stack.alice}"),)
        mine = stub.GetDocument(ingest_pb2.GetDocumentRequest(id=doc_id), metadata=as_alice, timeout=30)
        assert mine.text == "S = 1\n"

    # Alice's document survived every attempt, and she can delete it herself.
    code, body = _http("DELETE", f"{base}/v1/documents/{doc_id}", stack.alice)
    assert code == 200 and int(body["revision"]) > int(written["revision"])
