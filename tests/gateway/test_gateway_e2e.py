"""Real HTTP and gRPC through a real Envoy in front of the three real services.

The services run as `kotadb serve` subprocesses on port 0 against the session's migrated test
database, sharing one identity key; Envoy runs on free ports with the config `kotadb gateway
render` produces, so auth's Check guards every route and requests carry an API key written
into the database for this module. A second Envoy shares the same services but its search
cluster points at a port nobody listens on, so /health has something real to report. The auth
cases themselves are in tests/auth/test_gateway_auth.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.auth import keys
from services.cli import gateway, status
from services.common.errors import Unimplemented
from services.common.supervisor import ChildProcess, Supervisor

READY_LIMIT = 180.0
IDENTITY_KEY = "gateway-e2e-tests-identity-key-0123456789"


@dataclass(frozen=True)
class Gateway:
    """Gateway is one running Envoy: its base URL, gRPC target and admin URL."""

    url: str
    target: str
    admin: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(what: str, probe: Callable[[], tuple[bool, str]], supervisor: Supervisor) -> None:
    deadline = time.monotonic() + READY_LIMIT
    detail = ""
    while time.monotonic() < deadline:
        for child in supervisor.children:
            if not child.alive():
                pytest.fail(f"{child.name} exited ({child.returncode}):\n{child.log_tail()}")
        ok, detail = probe()
        if ok:
            return
        time.sleep(0.2)
    pytest.fail(f"{what} not ready after {READY_LIMIT}s: {detail}")


def _port_file_probe(path: Path) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        return path.exists() and path.read_text().strip().isdigit(), f"waiting for {path}"

    return probe


def _start_envoy(
    supervisor: Supervisor, workdir: Path, name: str, addresses: dict[str, str], **overrides: Any
) -> tuple[Gateway, ChildProcess]:
    port, admin = _free_port(), _free_port()
    config = gateway.GatewayConfig(gateway_port=port, admin_port=admin, **{**addresses, **overrides})
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(gateway.render(config))
    argv = [gateway.find_envoy(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
    child = supervisor.spawn(name, argv, log_path=workdir / f"{name}.log")
    found = Gateway(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
    _wait(f"{name} admin", functools.partial(status.probe_http, f"{found.admin}/ready"), supervisor)
    return found, child


@dataclass(frozen=True)
class Gateways:
    """Gateways are the two Envoys of this module, sharing one set of services, and an API key."""

    main: Gateway
    degraded: Gateway
    key: str


def _issue_key(database_url: str) -> str:
    """_issue_key writes a read+write key with a generous rate limit and returns its secret."""

    async def issue() -> str:
        connection = await asyncpg.connect(database_url)
        try:
            user = await connection.fetchval(
                "insert into auth.users (id, aud, role, email) values (gen_random_uuid(), 'authenticated',"
                " 'authenticated', 'gateway-e2e-' || gen_random_uuid() || '@example.test') returning id"
            )
            generated = keys.generate_key()
            await connection.execute(
                "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions, rate_limit)"
                " values ($1, 'gateway e2e', $2, $3, '{read,write}', 6000)",
                user,
                generated.display_prefix,
                generated.key_hash,
            )
            return generated.plaintext
        finally:
            await connection.close()

    return asyncio.run(issue())


@pytest.fixture(scope="module")
def gateways(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    workdir = tmp_path_factory.mktemp("gateway-e2e")
    env = dict(os.environ, KOTADB_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    env["KOTADB_SEARCH_DATA_DIR"] = str(workdir / "search-data")
    env["KOTADB_IDENTITY_KEY"] = IDENTITY_KEY
    with Supervisor(grace=20) as supervisor:
        addresses: dict[str, str] = {}
        for name in status.SERVICES:
            port_file = workdir / f"{name}.port"
            argv = [sys.executable, "-m", "services.cli", "serve", name, "--port", "0"]
            supervisor.spawn(
                name, [*argv, "--port-file", str(port_file)], log_path=workdir / f"{name}.log", env=env
            )
            _wait(f"{name} port", _port_file_probe(port_file), supervisor)
            addresses[name] = f"127.0.0.1:{port_file.read_text().strip()}"
        for name, address in addresses.items():
            _wait(name, functools.partial(status.probe_grpc_health, address), supervisor)

        main, _ = _start_envoy(supervisor, workdir, "envoy-main", addresses)
        dead_search = dict(addresses, search=f"127.0.0.1:{_free_port()}")
        degraded, _ = _start_envoy(supervisor, workdir, "envoy-degraded", dead_search)
        _wait("gateway /health", functools.partial(status.probe_http, f"{main.url}/health"), supervisor)
        yield Gateways(main=main, degraded=degraded, key=_issue_key(database_url))


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
