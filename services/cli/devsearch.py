"""devsearch: the dev stack's search replicas and its MCP server (`kotadb dev`, services/cli/dev.py).

Search replicas (`kotadb dev --search-replicas N`): the first is `search`, the others
`search-2` … `search-N`, each a `kotadb serve search` on its own port with its own data
directory (`<data-dir>/search`, `<data-dir>/search-2`, …) and its own name in
IndexStatus.replica (KOTADB_SEARCH_REPLICA). They share the page-token secret (derived from
the stack's identity key), so a page token stays good when its tenant moves to another replica.
Envoy spreads them with a ring hash on the tenant (deploy/envoy/envoy.yaml.tmpl).

The MCP server (`kotadb mcp --http`) runs behind the gateway's `/mcp` route, calling ingest and
the first search replica directly with the identity Check signed, so it needs the identity key
(KOTADB_IDENTITY_KEY) like the services. It reports its port through `<data-dir>/run/mcp.port`
and is ready once `GET /healthz` answers 200.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

from services.common.stack import (
    StackError,
    port_file_probe,
    probe_http,
    read_port,
    wait_until,
)
from services.common.supervisor import ChildProcess, Supervisor

# The MCP server's fixed dev port (`kotadb mcp`'s own default), unless every port is free-picked.
MCP_PORT = 50056
MAX_REPLICAS = 8


def replica_names(count: int) -> list[str]:
    """replica_names are the child names of `count` search replicas: search, search-2, …"""
    if not 1 <= count <= MAX_REPLICAS:
        raise StackError(f"--search-replicas must be between 1 and {MAX_REPLICAS}, got {count}")
    return ["search", *(f"search-{i}" for i in range(2, count + 1))]


def replica_env(env: dict[str, str], name: str, identity_key: str) -> dict[str, str]:
    """replica_env is one search replica's environment: its data dir, its name, the shared cursor secret."""
    child = dict(env)
    base = Path(env["KOTADB_SEARCH_DATA_DIR"])
    if name != "search":
        child["KOTADB_SEARCH_DATA_DIR"] = str(base.parent / f"{base.name}-{name.rsplit('-', 1)[1]}")
    child["KOTADB_SEARCH_REPLICA"] = name
    if not env.get("KOTADB_SEARCH_CURSOR_SECRET"):
        # Derived, not stored: the identity key already lives 0600 in the data dir.
        label = b"kotadb dev search cursor secret\x00" + identity_key.encode()
        child["KOTADB_SEARCH_CURSOR_SECRET"] = hashlib.sha256(label).hexdigest()
    return child


def search_addresses(ports: dict[str, int]) -> str:
    """search_addresses lists the replicas' `host:port`, comma-separated, for the gateway config."""
    return ",".join(f"127.0.0.1:{port}" for name, port in ports.items() if name.startswith("search"))


def start_mcp(
    supervisor: Supervisor,
    *,
    port: int,
    run_dir: Path,
    log_path: Path,
    env: dict[str, str],
    ingest: str,
    search: str,
    timeout: float,
) -> tuple[ChildProcess, int]:
    """start_mcp runs `kotadb mcp --http` until its /healthz answers; returns the child and its port.

    The child is then pinned to the port it bound (a restart comes back where Envoy's `mcp`
    cluster looks) and watched by the supervisor.
    """
    port_file = run_dir / "mcp.port"
    port_file.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        "mcp",
        "--http",
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        "--ingest",
        ingest,
        "--search",
        search,
    ]
    child = supervisor.spawn("mcp", argv, log_path=log_path, env=env)
    wait_until("mcp port file", port_file_probe(port_file), supervisor, timeout, child)
    bound = read_port(port_file)
    if bound is None:
        raise StackError(f"the MCP server wrote no port to {port_file}")
    probe = functools.partial(probe_http, f"http://127.0.0.1:{bound}/healthz")
    wait_until("mcp /healthz", probe, supervisor, timeout, child)
    pinned = list(child.argv)
    pinned[pinned.index("--port") + 1] = str(bound)
    child.argv = pinned
    supervisor.watch(child)
    return child, bound


def search_example(where: str) -> str:
    """search_example is the `kotadb search` line `kotadb dev` prints: the demo repository's own code."""
    command = f"kotadb search --regex 'def run_stack\\(' --context 2{where}"
    return f"  {command}   # search the demo repository once its sync is done"
