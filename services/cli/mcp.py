"""`kotadb mcp`: KotaDB's tools for coding agents over the Model Context Protocol (services/mcp).

* `kotadb mcp` speaks MCP on stdin/stdout, for an agent that starts it as a subprocess; it calls
  the gateway with the API key from `KOTADB_API_KEY` (or `--api-key`) at `KOTADB_URL` (or `--url`,
  else the running dev stack's), as `kotadb push` does.
* `kotadb mcp --http` serves Streamable HTTP at `/mcp` for Envoy's `/mcp` route: callers reach it
  through the gateway, which checks their key; it calls the ingest and search services directly
  (`--ingest`, `--search`; default `KOTADB_MCP_INGEST`/`KOTADB_MCP_SEARCH`, else the standard
  ports) with the identity the gateway signed. `--port 0` picks a free port (see `--port-file`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from services.cli import client

HELP = "MCP server for coding agents: stdio, or Streamable HTTP behind the gateway"
DEFAULT_HTTP_PORT = 50056


def register(subparsers: Any) -> None:
    """register adds `kotadb mcp [--http ...]`."""
    parser: argparse.ArgumentParser = subparsers.add_parser("mcp", help=HELP, description=__doc__)
    client.add_target_arguments(parser)
    parser.add_argument("--http", action="store_true", help="serve Streamable HTTP (behind the gateway)")
    parser.add_argument(
        "--host", default=os.environ.get("KOTADB_MCP_HOST", "127.0.0.1"), help="HTTP bind address"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("KOTADB_MCP_PORT", DEFAULT_HTTP_PORT)),
        help=f"HTTP port; 0 picks a free one (default: $KOTADB_MCP_PORT or {DEFAULT_HTTP_PORT})",
    )
    parser.add_argument("--port-file", type=Path, help="write the bound HTTP port here once listening")
    parser.add_argument(
        "--ingest",
        default=os.environ.get("KOTADB_MCP_INGEST", "127.0.0.1:50052"),
        help="ingest service host:port",
    )
    parser.add_argument(
        "--search",
        default=os.environ.get("KOTADB_MCP_SEARCH", "127.0.0.1:50053"),
        help="search service host:port",
    )
    parser.add_argument(
        "--max-output-chars",
        type=int,
        default=int(os.environ.get("KOTADB_MCP_MAX_OUTPUT_CHARS", "24000")),
        help="cap on one tool answer, in characters (default 24000)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from services.common.identity import IdentitySettings
    from services.common.settings import env_settings
    from services.mcp import server, tools  # the SDK and grpc load only for this command

    if args.max_output_chars < 1000:
        return client.fail("--max-output-chars must be at least 1000")
    limits = tools.Limits(output_chars=args.max_output_chars)
    if args.http:
        if not 0 <= args.port <= 65535:
            return client.fail(f"--port must be between 0 and 65535, got {args.port}")
        codec = env_settings(IdentitySettings).codec()
        if codec is None:
            return client.fail(
                "KOTADB_IDENTITY_KEY is not set: the HTTP server verifies the gateway's identities"
            )
        app = server.http_app(args.ingest, args.search, codec, limits)
        server.serve_http(app, host=args.host, port=args.port, port_file=args.port_file)
        return 0
    try:
        target = client.resolve_target(args)
    except client.ClientError as exc:
        return client.fail(str(exc))
    asyncio.run(server.serve_stdio(target, limits))
    return 0
