"""The `kotadb status` command: the health of each part of a running `kotadb dev` stack.

It reads `<data-dir>/stack.json` (written by `kotadb dev`, typed by services/common/stack.py's
StackInfo) and probes every component for real:
Postgres with `select 1`, each service with the gRPC health protocol, Envoy with its admin
`/ready`, and the gateway with `GET /health` (which itself reflects Envoy's health checks of
all three services). The probes are also what `kotadb dev` waits on before declaring the stack
up, so "dev says ready" and "status says ok" mean the same thing. The Prometheus endpoints the
stack has (each service's metrics listener, Envoy's `/stats/prometheus`) follow the verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.common.stack import (
    PROBE_TIMEOUT,
    SERVICES,
    STACK_FILE,
    StackInfo,
    http_get,
    probe_grpc_health,
    probe_http,
    probe_postgres,
    redact,
)

__all__ = [
    "PROBE_TIMEOUT",
    "SERVICES",
    "STACK_FILE",
    "ComponentHealth",
    "default_data_dir",
    "http_get",
    "load_stack",
    "probe_grpc_health",
    "probe_http",
    "probe_postgres",
    "probe_stack",
]


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


def load_stack(data_dir: Path) -> StackInfo:
    """load_stack reads stack.json from data_dir; FileNotFoundError when none is running."""
    return StackInfo.load(data_dir / STACK_FILE)


def probe_stack(stack: StackInfo) -> list[ComponentHealth]:
    """probe_stack probes every component of a running stack, in start order."""
    results: list[ComponentHealth] = []
    ok, detail = probe_postgres(stack.database_url)
    results.append(ComponentHealth("postgres", redact(stack.database_url), ok, detail))
    # Every service child: auth, ingest and each search replica (search, search-2, …).
    for name, address in stack.grpc.items():
        ok, detail = probe_grpc_health(address)
        results.append(ComponentHealth(name, address, ok, detail))
    if stack.mcp:
        healthz = f"http://{stack.mcp}/healthz"
        ok, detail = probe_http(healthz)
        results.append(ComponentHealth("mcp", healthz, ok, detail))
    ok, detail = probe_http(f"{stack.envoy_admin}/ready")
    results.append(ComponentHealth("envoy", stack.envoy_admin, ok, detail))
    health_url = f"{stack.gateway}/health"
    ok, detail = probe_http(health_url)
    results.append(ComponentHealth("gateway", health_url, ok, detail))
    return results


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
        # After the verdicts, so the first word of each of those lines stays the component.
        for name, url in stack.metrics.items():
            print(f"metrics: {name} {url}")
    return 0 if all(result.ok for result in results) else 1
