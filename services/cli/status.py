"""The `kotadb status` command: the health of each part of a running `kotadb dev` stack.

It reads `<data-dir>/stack.json` (written by `kotadb dev`) and probes every component for real:
Postgres with `select 1`, each service with the gRPC health protocol, Envoy with its admin
`/ready`, and the gateway with `GET /health` (which itself reflects Envoy's health checks of
all three services). The probes are also what `kotadb dev` waits on before declaring the stack
up, so "dev says ready" and "status says ok" mean the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STACK_FILE = "stack.json"
SERVICES: tuple[str, ...] = ("auth", "ingest", "search")

# Per-probe limit: long enough for a loaded CI machine, short enough that `status` stays snappy.
PROBE_TIMEOUT = 3.0


def default_data_dir() -> Path:
    """default_data_dir is where `kotadb dev` keeps its state: $XDG_CACHE_HOME/kotadb/dev.

    It falls back to ~/.cache/kotadb/dev, and can be overridden with KOTADB_DEV_DATA_DIR or
    `--data-dir`. A cache directory fits: everything there can be rebuilt.
    """
    explicit = os.environ.get("KOTADB_DEV_DATA_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kotadb" / "dev"


@dataclass(frozen=True)
class ComponentHealth:
    """ComponentHealth is one probe's verdict: the component, where it is, and what was seen."""

    name: str
    target: str
    ok: bool
    detail: str


def load_stack(data_dir: Path) -> dict[str, Any]:
    """load_stack reads stack.json from data_dir; raises FileNotFoundError when none is running."""
    data: dict[str, Any] = json.loads((data_dir / STACK_FILE).read_text())
    return data


def probe_grpc_health(address: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """probe_grpc_health asks a process's grpc.health.v1.Health for its overall status."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def http_get(url: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """http_get fetches url and returns (status, body); status 0 means no HTTP answer at all."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


def probe_http(url: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """probe_http is healthy when url answers 200; the detail is the status and a short body."""
    status, body = http_get(url, timeout)
    if status == 0:
        return False, body
    return status == 200, f"HTTP {status} {' '.join(body.split())[:120]}"


async def _select_version(database_url: str, limit: float) -> str:
    """_select_version connects, runs `select version()`, and returns the server's version line."""
    async with asyncio.timeout(limit):
        connection = await asyncpg.connect(database_url, statement_cache_size=0)
        try:
            version: str = await connection.fetchval("select version()")
        finally:
            await connection.close()
    return version


def probe_postgres(database_url: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """probe_postgres is healthy when the database answers a query."""
    try:
        version = asyncio.run(_select_version(database_url, timeout))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, " ".join(version.split()[:2])


def probe_stack(stack: dict[str, Any]) -> list[ComponentHealth]:
    """probe_stack probes every component named in a stack.json document, in start order."""
    results: list[ComponentHealth] = []
    database_url = str(stack["database_url"])
    ok, detail = probe_postgres(database_url)
    results.append(ComponentHealth("postgres", _redact(database_url), ok, detail))
    for name in SERVICES:
        address = str(stack["grpc"][name])
        ok, detail = probe_grpc_health(address)
        results.append(ComponentHealth(name, address, ok, detail))
    admin = str(stack["envoy_admin"])
    ok, detail = probe_http(f"{admin}/ready")
    results.append(ComponentHealth("envoy", admin, ok, detail))
    health_url = f"{stack['gateway']}/health"
    ok, detail = probe_http(health_url)
    results.append(ComponentHealth("gateway", health_url, ok, detail))
    return results


def _redact(url: str) -> str:
    """_redact hides a password in a connection URL so status output is safe to paste."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def register(subparsers: Any) -> None:
    """register adds `kotadb status`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="health of each component of the running `kotadb dev` stack"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"the dev stack's data dir (default {default_data_dir()})"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of lines")
    parser.set_defaults(func=_status_command)


def _status_command(args: argparse.Namespace) -> int:
    """_status_command implements `kotadb status`: exit 0 only when every component is healthy."""
    data_dir: Path = args.data_dir or default_data_dir()
    try:
        stack = load_stack(data_dir)
    except FileNotFoundError:
        message = f"no stack running: {data_dir / STACK_FILE} does not exist (start one with `kotadb dev`)"
        if args.json:
            print(json.dumps({"error": message}))
        else:
            print(message, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"cannot read {data_dir / STACK_FILE}: {exc}", file=sys.stderr)
        return 1
    results = probe_stack(stack)
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=2))
    else:
        width = max(len(result.name) for result in results)
        for result in results:
            verdict = "ok  " if result.ok else "DOWN"
            print(f"{result.name:<{width}}  {verdict}  {result.target}  {result.detail}")
    return 0 if all(result.ok for result in results) else 1
