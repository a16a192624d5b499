"""The real stack for MCP tests: the three services, Envoy with the `/mcp` route, `kotadb mcp --http`.

`mcp_stack` starts auth, ingest and search as `kotadb serve` processes on the session database,
Envoy in front (ext_authz on), and the MCP server's HTTP process behind Envoy's `/mcp` route,
then seeds API keys: two tenants with read + write, a read-only key, and a key allowed two
requests a minute. `connect(transport, key)` opens the MCP SDK's own client over stdio (a
`kotadb mcp` subprocess talking to the gateway) or Streamable HTTP (through the gateway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from services.auth import keys
from services.cli import gateway
from services.common import stack as stack_module
from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    free_port,
    port_file_probe,
    seed_key,
    service_env,
    spawn_services,
    start_envoy,
    wait_gateway_healthy,
    wait_until,
)
from tests.ingest.jobhelpers import SECRET_KEYS

IDENTITY_KEY = "mcp-tests-identity-key-0123456789abcdef"


@dataclasses.dataclass(frozen=True)
class McpStack:
    """McpStack is the gateway, the MCP HTTP server's own address and the seeded keys."""

    envoy: Envoy
    mcp_direct: str
    database_url: str
    alice: str
    bob: str
    reader: str
    limited: str
    limited_http: str
    workdir: Path


@pytest.fixture(scope="session")
def mcp_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpStack]:
    workdir = tmp_path_factory.mktemp("mcp-stack")
    # One job worker that may fetch file:// repositories, so sync_repository syncs a real git repository.
    env = service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        KOTADB_INGEST_WORKERS="1",
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_POLL_INTERVAL="0.1",
        KOTADB_INGEST_WORK_DIR=str(workdir / "ingest-work"),
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
    )
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        mcp_port = free_port()
        envoy = start_envoy(
            supervisor,
            workdir,
            "envoy",
            auth=addresses["auth"],
            ingest=addresses["ingest"],
            search=addresses["search"],
            identity_key=IDENTITY_KEY,
            limits={"mcp": f"127.0.0.1:{mcp_port}"},
        )
        port_file = workdir / "mcp.port"
        argv = [
            sys.executable,
            "-m",
            "services.cli",
            "mcp",
            "--http",
            "--port",
            str(mcp_port),
            "--port-file",
            str(port_file),
            "--ingest",
            addresses["ingest"],
            "--search",
            addresses["search"],
        ]
        supervisor.spawn("mcp", argv, log_path=workdir / "mcp.log", env=env, restart=False)
        wait_until("mcp port", port_file_probe(port_file), supervisor)
        direct = f"http://127.0.0.1:{mcp_port}"
        wait_until("mcp health", functools.partial(stack_module.probe_http, f"{direct}/healthz"), supervisor)
        wait_gateway_healthy(envoy, supervisor)
        seeded = {
            name: seed_key(database_url, email_prefix=f"mcp-{name}", permissions=perms, rate_limit=limit)
            for name, perms, limit in (
                ("alice", ("read", "write"), 6000),
                ("bob", ("read", "write"), 6000),
                ("reader", ("read",), 6000),
                ("limited", ("read",), 2),
                ("limited_http", ("read",), 2),
            )
        }
        yield McpStack(envoy=envoy, mcp_direct=direct, database_url=database_url, workdir=workdir, **seeded)


TRANSPORTS = ("stdio", "http")


def stdio_client(stack: McpStack, key: str) -> Client:
    """stdio_client is the SDK's client running `kotadb mcp` as a subprocess with `key`."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "services.cli", "mcp"],
        env={"KOTADB_URL": stack.envoy.url, "KOTADB_API_KEY": key},
        cwd=str(gateway.REPO_ROOT),
    )
    return Client(params, read_timeout_seconds=120)


@contextlib.asynccontextmanager
async def connect(stack: McpStack, transport: str, key: str, url: str | None = None) -> AsyncIterator[Client]:
    """connect opens an MCP client session over `transport` as `key` (HTTP: `url` or the gateway's /mcp)."""
    if transport == "stdio":
        async with stdio_client(stack, key) as client:
            yield client
        return
    headers = {"authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120))
    async with (
        http,
        Client(streamable_http_client(url or f"{stack.envoy.url}/mcp", http_client=http)) as client,
    ):
        yield client


async def user_of(database_url: str, key: str) -> str:
    """user_of is the user id owning API key `key`."""
    connection = await asyncpg.connect(database_url)
    try:
        return str(
            await connection.fetchval(
                "select user_id from public.api_keys where key_hash = $1", keys.hash_key(key)
            )
        )
    finally:
        await connection.close()


async def add_repository(database_url: str, key: str, full_name: str) -> str:
    """add_repository inserts a repository for the owner of `key` (as the database owner); returns its id."""
    user = await user_of(database_url, key)
    connection = await asyncpg.connect(database_url)
    try:
        return str(
            await connection.fetchval(
                "insert into public.repositories (user_id, full_name, url) values ($1, $2,"
                " 'https://example.test/r') returning id",
                uuid.UUID(user),
                full_name,
            )
        )
    finally:
        await connection.close()
