"""The MCP server's two transports: stdio for a local agent, Streamable HTTP behind the gateway.

* `serve_stdio(target)` — `kotadb mcp`: the agent starts it as a subprocess; every tool call is
  made to the gateway with the API key from the environment (services/cli/client.py resolves it
  as `kotadb push` does).
* `http_app(...)` / `serve_http(...)` — `kotadb mcp --http`: a Starlette app at `/mcp`, run by
  uvicorn, meant to be reached only through Envoy (the `/mcp` route, ext_authz on). It is
  stateless (`stateless_http`, JSON responses): no session lives in the process, so nothing a
  client opens is held between requests and any replica can answer any request. Each tool call
  runs as the identity Check signed for its own HTTP request, re-signed for each RPC it makes
  (services/common/delegation.py).

The SDK's DNS-rebinding guard (Host/Origin allow-lists) is off for HTTP: it protects servers
that trust whoever reaches them, while this one answers only requests the gateway authenticated
with an API key a browser page cannot forge, and it cannot know the gateway's public host name.
`GET /healthz` answers 200 for Envoy's health checks.
"""

from __future__ import annotations

import socket
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from services.cli.client import Target, call_metadata
from services.common.delegation import delegating_interceptors, on_behalf
from services.common.errors import Unauthenticated
from services.common.identity import IDENTITY_HEADER, IdentityCodec
from services.mcp import tools
from services.mcp.backend import Backend, Channels

SERVER_NAME = "kotadb"
MCP_PATH = "/mcp"
# Largest MCP request body: a push of files up to the gateway's batch body limit (16 MiB).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Requests one HTTP process serves at once; each holds at most one RPC at a time.
MAX_CONNECTIONS = 256


async def serve_stdio(target: Target, limits: tools.Limits = tools.DEFAULT_LIMITS) -> None:
    """serve_stdio runs the MCP server on stdin/stdout, calling the gateway as `target`'s key."""
    channels = Channels(target.address, target.address, secure=target.secure)
    metadata = call_metadata(target)

    async def backend_for(ctx: Context) -> Backend:
        return channels.backend(metadata)

    server = tools.build(SERVER_NAME, backend_for, limits)
    try:
        await server.run_stdio_async()
    finally:
        await channels.close()


def http_app(
    ingest: str, search: str, codec: IdentityCodec, limits: tools.Limits = tools.DEFAULT_LIMITS
) -> Starlette:
    """http_app builds the Streamable HTTP app calling the ingest and search services at these addresses.

    Each tool call verifies the identity Check signed for its `/mcp` request with `codec` (the
    identity key every service holds), then calls the services on that caller's behalf, each
    call signed for its own method (services/common/delegation.py).
    """
    channels = Channels(ingest, search, interceptors=delegating_interceptors(codec))

    async def backend_for(ctx: Context) -> Backend:
        headers = ctx.headers or {}
        token = headers.get(IDENTITY_HEADER, "")
        if not token:
            # Only the gateway's Check adds the header: this request did not come through it.
            raise ToolError(
                "UNAUTHENTICATED: no verified caller — reach this server through the KotaDB gateway"
            )
        try:
            identity = codec.verify(token, method=MCP_PATH)
        except Unauthenticated as exc:
            raise ToolError(f"UNAUTHENTICATED {exc.reason}: {exc}") from None
        return channels.backend(on_behalf(identity))

    server = tools.build(SERVER_NAME, backend_for, limits)

    @server.custom_route("/healthz", methods=["GET"], include_in_schema=False)  # type: ignore[untyped-decorator]
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        max_request_body_size=MAX_REQUEST_BYTES,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )


def serve_http(
    app: Starlette, *, host: str, port: int, port_file: Path | None = None, log_level: str = "warning"
) -> None:
    """serve_http runs `app` with uvicorn on host:port (0 picks a free port) until SIGTERM or SIGINT.

    The socket is bound here, so the port is known (and written to `port_file`) before serving.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made before uvicorn starts wait in the backlog
    bound = sock.getsockname()[1]
    # Bounded: at most MAX_CONNECTIONS requests in progress (more get 503), idle keep-alive
    # connections closed after 30 s. The gateway logs every request; uvicorn's access log would
    # only repeat it.
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    if port_file is not None:
        port_file.write_text(f"{bound}\n")
    print(f'{{"msg": "listening", "service": "mcp", "port": {bound}}}', flush=True)
    server.run(sockets=[sock])
