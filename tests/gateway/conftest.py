"""The gateway stack shared by the tests in this directory, and the HTTP helpers they use.

The three services run once per package as `kotadb serve` subprocesses on port 0 against the
session's migrated test database, sharing one identity key. Three Envoys run in front of them
with the config `kotadb gateway render` produces, on free ports:

* `main`, with every default, so auth's Check guards every route;
* `degraded`, whose search cluster points at a port nobody listens on, so /health has something
  real to report;
* `tight`, with a small heap budget (TIGHT_HEAP_MIB), for the memory tests, so what they measure
  is not disturbed by the other tests' traffic.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    free_port,
    seed_key,
    service_env,
    spawn_services,
    start_envoy,
    wait_gateway_healthy,
)

IDENTITY_KEY = "gateway-e2e-tests-identity-key-0123456789"
TIGHT_HEAP_MIB = 96


@dataclass(frozen=True)
class Gateways:
    """Gateways are the package's Envoys, sharing one set of services, an API key and a workdir."""

    main: Envoy
    degraded: Envoy
    tight: Envoy
    key: str
    database_url: str
    workdir: Path
    supervisor: Supervisor


@pytest.fixture(scope="package")
def gateways(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    workdir = tmp_path_factory.mktemp("gateway-e2e")
    env = service_env(database_url, workdir, IDENTITY_KEY)
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        auth, ingest, search = addresses["auth"], addresses["ingest"], addresses["search"]

        def envoy(name: str, search: str = search, limits: dict[str, Any] | None = None) -> Envoy:
            return start_envoy(
                supervisor,
                workdir,
                name,
                auth=auth,
                ingest=ingest,
                search=search,
                identity_key=IDENTITY_KEY,
                limits=limits,
            )

        main = envoy("envoy-main")
        degraded = envoy("envoy-degraded", search=f"127.0.0.1:{free_port()}")
        tight = envoy("envoy-tight", limits={"max_heap_mib": TIGHT_HEAP_MIB})
        wait_gateway_healthy(main, supervisor)
        wait_gateway_healthy(tight, supervisor)
        key = seed_key(
            database_url, email_prefix="gateway-e2e", permissions=("read", "write"), rate_limit=6000
        )
        yield Gateways(
            main=main,
            degraded=degraded,
            tight=tight,
            key=key,
            database_url=database_url,
            workdir=workdir,
            supervisor=supervisor,
        )


@dataclass(frozen=True)
class Reply:
    """Reply is an HTTP answer: status, headers (lower-case names) and the raw body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def content_type(self) -> str:
        """content_type is the reply's Content-Type, empty when it has none."""
        return self.headers.get("content-type", "")

    @property
    def body(self) -> dict[str, Any]:
        """body is the parsed JSON body; a non-JSON body fails the test."""
        try:
            parsed: dict[str, Any] = json.loads(self.raw)
        except ValueError:
            pytest.fail(f"{self.status} with a non-JSON body: {self.raw[:300]!r}")
        return parsed

    @property
    def reached_service(self) -> bool:
        """reached_service is true when an upstream service produced the answer, not the gateway."""
        return "x-envoy-upstream-service-time" in self.headers


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """request sends one HTTP/1.1 request with urllib and returns the reply, errors included."""
    sent = {"content-type": "application/json"} if body is not None else {}
    sent.update(headers or {})
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    prepared = urllib.request.Request(url, data=body, method=method, headers=sent)
    try:
        with urllib.request.urlopen(prepared, timeout=60) as response:
            found = {k.lower(): v for k, v in response.headers.items()}
            return Reply(response.status, found, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def raw_request(envoy: Envoy, head: str, body_chunks: Iterator[bytes] | None = None) -> Reply:
    """raw_request writes an HTTP/1.1 request head (and body pieces) on a socket and reads the reply.

    It sends exactly what it is given, so a test can declare a Content-Length it never sends, or
    stream a chunked body, and see what the gateway answers before (or without) the rest. A
    gateway that answers early may close the connection while body pieces are still being
    sent; the rest is then dropped and the answer read. A connection closed or reset with no
    answer at all is a Reply with status 0.
    """
    host, port = envoy.target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        try:
            connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
            for chunk in body_chunks or iter(()):
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        while True:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            if _complete(received):
                break
    return _parse(received)


def _complete(received: bytes) -> bool:
    """_complete is true once a whole reply with a Content-Length (100 Continue skipped) is in."""
    while received.startswith(b"HTTP/1.1 100"):
        received = received.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in received else b""
    if b"\r\n\r\n" not in received:
        return False
    head, rest = received.split(b"\r\n\r\n", 1)
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False


def _parse(received: bytes) -> Reply:
    """_parse splits a raw HTTP/1.1 reply into a Reply, skipping interim 100 Continue answers."""
    while received.startswith(b"HTTP/1.1 100"):
        received = received.split(b"\r\n\r\n", 1)[1]
    if not received:
        return Reply(0)
    if b"\r\n\r\n" not in received:
        pytest.fail(f"no HTTP reply, got {received[:300]!r}")
    head, rest = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), found, rest)
