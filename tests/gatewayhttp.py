"""The gateway stack the REST/gRPC test modules share, with two tenants, and their HTTP client.

`two_tenants(database_url, workdir, identity_key, name, **env)` runs auth, ingest and search as
`kotadb serve` processes (tests/harness.py's `spawn_services`) with Envoy in front, seeds one
read-write API key for each of two users, and yields a `GatewayStack`; everything stops when
the block ends. `fetch` sends one request with a bearer key and returns a `Reply` (status,
headers, body); `http` returns the status and raw body; `http_json` decodes the body: one JSON
object, or the list of objects a streaming route writes one after another (`messages` makes
either a list).
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.supervisor import Supervisor
from tests.harness import Envoy, seed_key, service_env, spawn_services, start_gateway

# Seconds one REST call may take on a shared, busy machine.
HTTP_TIMEOUT = 120.0


@dataclass(frozen=True)
class GatewayStack:
    """GatewayStack is a running gateway, its work directory (every process's log) and two tenants.

    `alice` and `bob` are API key secrets; `alice_name` is the name of alice's key (unique per
    stack), by which a test finds her user in the database.
    """

    envoy: Envoy
    workdir: Path
    alice: str
    alice_name: str
    bob: str


@contextmanager
def two_tenants(
    database_url: str, workdir: Path, identity_key: str, name: str, **env: str
) -> Iterator[GatewayStack]:
    """two_tenants runs the services and Envoy with `env` on top of the harness's settings."""
    environment = service_env(database_url, workdir, identity_key, **env)
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, environment)
        envoy = start_gateway(supervisor, workdir, addresses, identity_key)
        alice_name = f"{name}-alice-{secrets.token_hex(4)}"
        alice = seed_key(
            database_url, email_prefix=alice_name, permissions=("read", "write"), rate_limit=6000
        )
        bob = seed_key(
            database_url, email_prefix=f"{name}-bob", permissions=("read", "write"), rate_limit=6000
        )
        yield GatewayStack(envoy, workdir, alice, alice_name, bob)


@dataclass(frozen=True)
class Reply:
    """Reply is an HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        """body is the answer decoded as one JSON object."""
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed

    @property
    def reached_service(self) -> bool:
        """reached_service is true when an upstream service produced the answer, not the gateway."""
        return "x-envoy-upstream-service-time" in self.headers and "x-kotadb-error-reason" not in self.headers


def fetch(
    method: str,
    url: str,
    key: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Reply:
    """fetch sends one request (`body` as JSON, or raw bytes) and returns the answer, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    sent = dict(headers or {})
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    if data is not None:
        sent.setdefault("content-type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(
                response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
            )
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def http(
    method: str,
    url: str,
    key: str | None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, bytes]:
    """http is `fetch` as (status, raw body)."""
    reply = fetch(method, url, key, body, headers, timeout)
    return reply.status, reply.raw


def http_json(
    method: str,
    url: str,
    key: str | None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, Any]:
    """http_json is `http` with the body decoded (`{}` when empty, a list for a stream)."""
    code, raw = http(method, url, key, body, headers, timeout)
    return code, decode(raw)


def decode(raw: bytes) -> Any:
    """decode parses one JSON object, or several written one after another (a list of them).

    A body that is not JSON (Envoy's own plain-text answers, such as "no healthy upstream")
    comes back as its text.
    """
    text = raw.decode(errors="replace")
    if not text.strip():
        return {}
    decoder, messages, at = json.JSONDecoder(), [], 0
    try:
        while text[at:].strip():
            at += len(text[at:]) - len(text[at:].lstrip())
            message, at = decoder.raw_decode(text, at)
            messages.append(message)
    except json.JSONDecodeError:
        return text
    return messages[0] if len(messages) == 1 else messages


def messages(answer: Any) -> list[Any]:
    """messages is a streaming route's decoded answer as a list (one message decodes alone)."""
    return answer if isinstance(answer, list) else [answer]


def error_reason(body: dict[str, Any]) -> str:
    """error_reason is the `reason` of the google.rpc.ErrorInfo in an error answer's details."""
    infos = [d for d in body.get("details", []) if d["@type"].endswith("/google.rpc.ErrorInfo")]
    assert infos, body
    return str(infos[0]["reason"])
