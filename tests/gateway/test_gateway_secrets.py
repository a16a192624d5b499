"""Secrets never reach a log or a readable file: credentials sent to the real gateway, then grepped.

Requests carry credentials every way a client might send them (query parameters, the
Authorization, x-api-key and Cookie headers, gRPC metadata), admitted, refused and oversize.
Then every file under the stack's working directory (Envoy's log and config, the services'
logs and data) is searched for each secret: there must be none. The rendered config itself is
readable by its owner only, since it holds the access-log token.
"""

from __future__ import annotations

import secrets
import stat
import uuid
from pathlib import Path

import grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.auth import keys
from services.common.identity import access_log_token
from tests.gateway.conftest import IDENTITY_KEY, Gateways, raw_request, request
from tests.harness import seed_key, wait_until


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


def _hits(root: Path, secret: str) -> list[str]:
    """_hits names every file under `root` whose bytes contain `secret`."""
    needle = secret.encode()
    return [str(path) for path in _files_under(root) if needle in path.read_bytes()]


def test_credentials_never_reach_a_file(gateways: Gateways) -> None:
    url = gateways.main.url
    admitted = seed_key(gateways.database_url, email_prefix="gateway-secrets", permissions=("read",))
    unknown = keys.generate_key().plaintext
    in_query = keys.generate_key().plaintext
    opaque = f"secret-{secrets.token_hex(16)}"
    sent = [admitted, unknown, in_query, opaque]

    # Admitted: a real key in each header that carries one.
    assert request("GET", f"{url}/v1/index", key=admitted).reached_service
    assert request("GET", f"{url}/v1/index", headers={"x-api-key": admitted}).reached_service
    # Refused: unknown keys, and keys in the query string (headers only; the gateway strips them).
    for name in ("key", "api_key", "access_token", "token"):
        reply = request("GET", f"{url}/v1/index?{name}={in_query}")
        assert reply.status == 401 and reply.body["reason"] == "MISSING_CREDENTIALS", (name, reply.raw)
    assert request("GET", f"{url}/v1/index?page_size=1&key={in_query}", key=unknown).status == 401
    assert request("GET", f"{url}/v1/index", headers={"cookie": f"session={opaque}"}).status == 401
    assert request("GET", f"{url}/v1/index", headers={"x-api-key": unknown}).status == 401
    # Oversize: Envoy's own error line for a refused body prints the path, without the secret.
    head = (
        f"POST /v1/code:search?key={in_query} HTTP/1.1\nhost: gateway\n"
        f"content-type: application/json\ncontent-length: {64 * 1024 * 1024}\n"
        f"authorization: Bearer {admitted}\n"
    )
    assert raw_request(gateways.main, head).status == 413
    # Native gRPC, with the key in metadata: admitted, whatever the service then answers.
    credentials = (("authorization", f"Bearer {admitted}"),)
    with grpc.insecure_channel(gateways.main.target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        try:
            stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), metadata=credentials, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, exc

    # Envoy writes its access log in batches: wait for a marker sent last, then search.
    marker = f"/v1/marker-{uuid.uuid4().hex}"
    request("GET", f"{url}{marker}", key=admitted)
    log = gateways.main.child.log_path
    wait_until(
        "the marker in Envoy's access log",
        lambda: (marker in log.read_text(errors="replace"), str(log)),
        gateways.supervisor,
    )
    # The log is the one the requests went to, and it records them, query strings aside.
    text = log.read_text(errors="replace")
    assert '"path":"/v1/index"' in text and '"path":"/v1/code:search"' in text
    assert "?" not in "".join(line for line in text.splitlines() if '"logger":"envoy.access"' in line)
    for secret in sent:
        assert _hits(gateways.workdir, secret) == [], secret


def test_rendered_config_is_owner_only_and_holds_the_token(gateways: Gateways) -> None:
    config = gateways.main.config_path
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert access_log_token(IDENTITY_KEY) in config.read_text()
