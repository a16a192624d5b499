"""The document API through the real gateway: REST/JSON and gRPC via Envoy, API keys, two tenants.

The three services run as `kotadb serve` processes against the session database, Envoy in
front with auth's Check; each tenant has its own API key (read + write) written into the
database. REST batchUpsert must answer bad items per item with BadRequest field violations and
commit the rest; tenant B must not read, list or delete tenant A's documents, over REST or gRPC.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from tests.gatewayhttp import GatewayStack, error_reason, http_json, two_tenants

IDENTITY_KEY = "ingest-gateway-tests-identity-key-0123456789"


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    workdir = tmp_path_factory.mktemp("ingest-gateway")
    with two_tenants(
        database_url,
        workdir,
        IDENTITY_KEY,
        "ingest",
        KOTADB_INGEST_SYMBOL_WORKERS="1",
    ) as stack:
        yield stack


def test_batch_upsert_over_rest_answers_per_item(stack: GatewayStack) -> None:
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
    code, answer = http_json("POST", url, stack.alice, body)
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
    code, again = http_json("POST", url, stack.alice, body)
    assert code == 200 and again == answer
    code, unchanged = http_json("POST", url, stack.alice, {"documents": body["documents"][:1]})
    assert unchanged["results"][0]["unchanged"] is True
    assert unchanged["results"][0]["revision"] == main["revision"]

    code, got = http_json("GET", f"{stack.envoy.url}/v1/documents/{main['id']}", stack.alice)
    assert code == 200 and got["text"] == "def main():\n    return 1\n" and got["language"] == "python"
    query = urllib.parse.urlencode({"pathPrefix": "src/", "readMask": "path,contentHash"})
    code, listed = http_json("GET", f"{stack.envoy.url}/v1/documents?{query}", stack.alice)
    assert code == 200, listed
    assert [(d["path"], d["contentHash"]) for d in listed["documents"]] == [
        ("src/main.py", main["contentHash"])
    ]
    assert "text" not in listed["documents"][0] or listed["documents"][0]["text"] == ""

    code, refused = http_json(
        "POST", url, stack.alice, {"documents": [{"path": f"f{i}", "text": "x"} for i in range(1001)]}
    )
    assert code == 400 and error_reason(refused) == "TOO_MANY_DOCUMENTS"


def test_tenants_cannot_reach_each_other_over_rest_and_grpc(stack: GatewayStack) -> None:
    base = stack.envoy.url
    code, written = http_json(
        "POST",
        f"{base}/v1/documents:batchUpsert",
        stack.alice,
        {"documents": [{"path": "private.py", "text": "S = 1\n"}]},
    )
    assert code == 200, written
    doc_id = written["results"][0]["id"]

    code, body = http_json("GET", f"{base}/v1/documents/{doc_id}", stack.bob)
    assert code == 404 and error_reason(body) == "NOT_FOUND"
    code, body = http_json("DELETE", f"{base}/v1/documents/{doc_id}", stack.bob)
    assert code == 404 and error_reason(body) == "NOT_FOUND"
    code, body = http_json("GET", f"{base}/v1/documents?showDeleted=true", stack.bob)
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
    code, body = http_json("DELETE", f"{base}/v1/documents/{doc_id}", stack.alice)
    assert code == 200 and int(body["revision"]) > int(written["revision"])
