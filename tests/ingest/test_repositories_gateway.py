"""Repositories and webhooks through the real gateway: REST/JSON and gRPC via Envoy, two tenants.

The three services run as `kotadb serve` processes against the session database with the
production URL policy (no local URLs), Envoy in front with auth's Check; each tenant has its own
API key. Tenant B must not read, list, change, sync, rotate or delete tenant A's repositories over
REST or gRPC; SSRF URLs are refused over REST; the webhook route works with no API key while every
other route still needs one; and no secret ever reaches a service's or the gateway's log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc

from services.ingest.secretbox import generate_key_spec
from tests.gatewayhttp import GatewayStack, error_reason, http_json, two_tenants

IDENTITY_KEY = "ingest-repos-gateway-identity-key-0123456789"
SECRET_KEYS = generate_key_spec("gw1")
TOKEN = "ghp_GatewayAccessToken9876543210zyxwvu"
# A public literal address: the production URL policy accepts it without any DNS lookup.
PUBLIC_URL = "https://140.82.112.3/octo/{name}.git"


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    workdir = tmp_path_factory.mktemp("repos-gateway")
    with two_tenants(
        database_url,
        workdir,
        IDENTITY_KEY,
        "repos",
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        # No job workers: queued jobs stay queued, so a sync request folds into them.
        KOTADB_INGEST_WORKERS="0",
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
        KOTADB_LOG_LEVEL="DEBUG",
    ) as stack:
        yield stack


def _create(stack: GatewayStack, key: str, name: str, **extra: Any) -> dict[str, Any]:
    code, body = http_json(
        "POST",
        f"{stack.envoy.url}/v1/repositories",
        key,
        {"repository": {"fullName": f"octo/{name}", "url": PUBLIC_URL.format(name=name)}, **extra},
    )
    assert code == 200 and isinstance(body, dict), body
    return body


def test_rest_lifecycle_of_a_repository(stack: GatewayStack) -> None:
    base = f"{stack.envoy.url}/v1/repositories"
    created = _create(stack, stack.alice, "life", accessToken=TOKEN, sync=True)
    repo = created["repository"]
    assert created["webhookSecret"] and repo["hasAccessToken"] is True and "accessToken" not in repo
    assert repo["webhookUrl"] == f"/v1/webhooks/github/{repo['id']}"
    assert created["job"]["kind"] == "FULL_SYNC" and created["job"]["state"] == "QUEUED"

    code, patched = http_json(
        "PATCH",
        f"{base}/{repo['id']}?updateMask=defaultBranch,excludeGlobs",
        stack.alice,
        {"defaultBranch": "release", "excludeGlobs": ["vendor/**"], "maxFileBytes": "5"},
    )
    assert code == 200, patched
    assert (patched["defaultBranch"], patched["excludeGlobs"], patched["maxFileBytes"]) == (
        "release",
        ["vendor/**"],
        "0",
    )
    code, rotated = http_json("POST", f"{base}/{repo['id']}:rotateWebhookSecret", stack.alice, {})
    assert code == 200 and rotated["webhookSecret"] not in ("", created["webhookSecret"]), rotated
    code, job = http_json("POST", f"{base}/{repo['id']}:sync", stack.alice, {"full": True})
    assert code == 200 and job["id"] == created["job"]["id"], job  # folded into the queued job
    code, listed = http_json("GET", f"{base}?pageSize=100", stack.alice)
    assert code == 200 and repo["id"] in [r["id"] for r in listed["repositories"]]
    code, _ = http_json("DELETE", f"{base}/{repo['id']}", stack.alice)
    assert code == 200
    code, gone = http_json("GET", f"{base}/{repo['id']}", stack.alice)
    assert code == 404 and error_reason(gone) == "REPOSITORY_NOT_FOUND"


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "[::1]", "10.0.0.1"])
def test_rest_refuses_internal_urls(stack: GatewayStack, host: str) -> None:
    code, body = http_json(
        "POST",
        f"{stack.envoy.url}/v1/repositories",
        stack.alice,
        {"repository": {"fullName": f"octo/ssrf-{uuid.uuid4().hex[:6]}", "url": f"https://{host}/o/r.git"}},
    )
    assert code == 400, body
    requests = [d for d in body["details"] if d["@type"].endswith("/google.rpc.BadRequest")]
    assert requests[0]["fieldViolations"][0]["field"] == "repository.url"
    assert requests[0]["fieldViolations"][0]["reason"] == "URL_HOST_FORBIDDEN"


def test_tenant_b_cannot_touch_tenant_a_repositories(stack: GatewayStack) -> None:
    base = f"{stack.envoy.url}/v1/repositories"
    repo = _create(stack, stack.alice, f"private-{uuid.uuid4().hex[:6]}")["repository"]
    attempts = [
        ("GET", f"{base}/{repo['id']}", None),
        ("PATCH", f"{base}/{repo['id']}?updateMask=defaultBranch", {"defaultBranch": "x"}),
        ("POST", f"{base}/{repo['id']}:sync", {}),
        ("POST", f"{base}/{repo['id']}:rotateWebhookSecret", {}),
        ("DELETE", f"{base}/{repo['id']}", None),
    ]
    for method, url, body in attempts:
        code, answer = http_json(method, url, stack.bob, body)
        assert code == 404 and error_reason(answer) == "REPOSITORY_NOT_FOUND", (method, url, answer)
    code, listed = http_json("GET", f"{base}?pageSize=1000", stack.bob)
    assert code == 200 and repo["id"] not in [r["id"] for r in listed.get("repositories", [])]
    # The same over gRPC through the gateway.
    with grpc.insecure_channel(stack.envoy.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRepository(
                ingest_pb2.GetRepositoryRequest(id=repo["id"]),
                metadata=(("authorization", f"Bearer {stack.bob}"),),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as deleting:
            stub.DeleteRepository(
                ingest_pb2.DeleteRepositoryRequest(id=repo["id"]),
                metadata=(("authorization", f"Bearer {stack.bob}"),),
                timeout=30,
            )
        assert deleting.value.code() == grpc.StatusCode.NOT_FOUND
        mine = stub.GetRepository(
            ingest_pb2.GetRepositoryRequest(id=repo["id"]),
            metadata=(("authorization", f"Bearer {stack.alice}"),),
            timeout=30,
        )
        assert mine.id == repo["id"]


def test_webhook_needs_no_api_key_but_other_routes_do(stack: GatewayStack) -> None:
    created = _create(stack, stack.alice, f"hooked-{uuid.uuid4().hex[:6]}")
    repo, secret = created["repository"], created["webhookSecret"]
    payload = json.dumps(
        {"ref": "refs/heads/main", "after": "3" * 40, "repository": {"default_branch": "main"}}
    ).encode()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest(),
    }
    url = f"{stack.envoy.url}{repo['webhookUrl']}"
    code, answer = http_json("POST", url, None, payload, headers)
    assert code == 200 and answer["job"]["kind"] == "INCREMENTAL_SYNC", answer
    # A client-supplied identity header on the webhook route is dropped, never trusted.
    code, answer = http_json(
        "POST", url, None, payload, {**headers, "X-GitHub-Delivery": "forged", "x-kotadb-identity": "x.y"}
    )
    assert code == 200, answer
    code, answer = http_json("POST", url, None, payload, {**headers, "X-Hub-Signature-256": "sha256=00"})
    assert code == 401, answer
    # Every other route still needs the key.
    code, _ = http_json("GET", f"{stack.envoy.url}/v1/repositories/{repo['id']}", None)
    assert code == 401


def test_no_secret_reaches_any_log(stack: GatewayStack) -> None:
    created = _create(stack, stack.alice, f"logged-{uuid.uuid4().hex[:6]}", accessToken=TOKEN)
    code, refused = http_json(
        "POST",
        f"{stack.envoy.url}/v1/repositories",
        stack.alice,
        {"repository": {"fullName": "octo/leaky", "url": f"https://u:{TOKEN}@140.82.112.3/o/r.git"}},
    )
    assert code == 400 and TOKEN not in json.dumps(refused)
    logs = "".join(path.read_text(errors="replace") for path in stack.workdir.glob("*.log"))
    assert "ingest" in logs  # the logs exist and are read
    for secret in (TOKEN, created["webhookSecret"], SECRET_KEYS.split(":", 1)[1]):
        assert secret not in logs
