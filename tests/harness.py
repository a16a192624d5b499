"""Process harness for tests that run the real stack: `kotadb serve` children, Envoy, seeded keys.

Tests that need services as separate processes start them under a `Supervisor` (so a failing
test never leaves one running) with the helpers here:

* `spawn_service` starts `kotadb serve <service> --port 0 --port-file …` and returns the address
  it bound once the port file holds a number; `wait_healthy` then waits for gRPC health.
  Starting every service first and waiting for health afterwards lets them start in parallel.
* `serve` is both steps for one service.
* `start_envoy` renders the gateway config `kotadb gateway render` would, on free ports, runs
  Envoy and waits for its admin `/ready`; `wait_gateway_healthy` waits for its `/health`.
* `wait_until` polls a probe until it passes, failing the test at once if any supervised child
  exits (with the end of its log) instead of waiting out the limit.
* `seed_key` writes a user and an API key straight into a database, for stacks whose database
  is not the session's pool (or from synchronous fixtures).
* `free_port` is re-exported from services/common/pgembed.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.auth import keys
from services.cli import gateway, status
from services.common.identity import access_log_token
from services.common.pgembed import free_port
from services.common.server import listener_port_file
from services.common.supervisor import ChildProcess, Supervisor

__all__ = [
    "READY_LIMIT",
    "Envoy",
    "Probe",
    "free_port",
    "port_file_probe",
    "seed_key",
    "serve",
    "service_env",
    "spawn_service",
    "start_envoy",
    "wait_gateway_healthy",
    "wait_healthy",
    "wait_until",
]

# Seconds; a cold start imports every service module and may share the CPU with other suites.
READY_LIMIT = 180.0
POLL_INTERVAL = 0.1

Probe = Callable[[], tuple[bool, str]]


def wait_until(what: str, probe: Probe, supervisor: Supervisor, limit: float = READY_LIMIT) -> None:
    """wait_until polls `probe` until it reports ready, failing the test on timeout or a dead child.

    `probe` returns (ready, detail); the last detail is in the failure message. Every child of
    `supervisor` is checked on each round, so a service that crashed on start fails the test
    with its log tail rather than after `limit` seconds.
    """
    deadline = time.monotonic() + limit
    detail = ""
    while time.monotonic() < deadline:
        for child in supervisor.children:
            if not child.alive():
                pytest.fail(f"{child.name} exited ({child.returncode}):\n{child.log_tail()}")
        ok, detail = probe()
        if ok:
            return
        time.sleep(POLL_INTERVAL)
    pytest.fail(f"{what} not ready after {limit}s: {detail}")


def port_file_probe(path: Path) -> Probe:
    """port_file_probe is a probe that passes once `path` holds a port number.

    The server writes the file and renames it into place, so a reader never sees half of it.
    """

    def probe() -> tuple[bool, str]:
        text = path.read_text().strip() if path.exists() else ""
        return text.isdigit(), f"waiting for {path}"

    return probe


def service_env(database_url: str, workdir: Path, identity_key: str, **extra: str) -> dict[str, str]:
    """service_env is the environment `kotadb serve` children share: database, identity, data dir.

    It starts from this process's environment (so the children find the same interpreter and
    Envoy); `extra` adds or overrides variables, e.g. `KOTADB_AUTH_KEY_CACHE_TTL="0"`.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["KOTADB_DATABASE_URL"] = database_url
    env["KOTADB_IDENTITY_KEY"] = identity_key
    env["KOTADB_SEARCH_DATA_DIR"] = str(workdir / "search-data")
    env.update(extra)
    return env


# Auth gRPC address -> the same process's Check listener, as spawn_service found them.
CHECK_LISTENERS: dict[str, str] = {}


def spawn_service(
    supervisor: Supervisor, workdir: Path, name: str, service: str, env: dict[str, str]
) -> tuple[str, ChildProcess]:
    """spawn_service starts `kotadb serve service` on port 0 as child `name`; returns its address.

    It returns once the port file is written, which is before the service is healthy (see
    `wait_healthy`). The child's log is `workdir/<name>.log`.
    """
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "services.cli", "serve", service, "--port", "0"]
    child = supervisor.spawn(
        name, [*argv, "--port-file", str(port_file)], log_path=workdir / f"{name}.log", env=env
    )
    wait_until(f"{name} port", port_file_probe(port_file), supervisor)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    check_file = listener_port_file(port_file, "check")
    if check_file.exists():
        # The auth service's lean Check listener: start_envoy points ext_authz at it.
        CHECK_LISTENERS[address] = f"127.0.0.1:{check_file.read_text().strip()}"
    return address, child


def wait_healthy(address: str, supervisor: Supervisor) -> None:
    """wait_healthy waits until the gRPC health service at `address` reports SERVING."""
    wait_until(address, functools.partial(status.probe_grpc_health, address), supervisor)


def serve(
    supervisor: Supervisor, workdir: Path, name: str, service: str, env: dict[str, str]
) -> tuple[str, ChildProcess]:
    """serve is spawn_service followed by wait_healthy: one service, started and SERVING."""
    address, child = spawn_service(supervisor, workdir, name, service, env)
    wait_healthy(address, supervisor)
    return address, child


@dataclasses.dataclass(frozen=True)
class Envoy:
    """Envoy is one running gateway: base URL, gRPC target, admin URL, config file and process."""

    url: str
    target: str
    admin: str
    config_path: Path
    child: ChildProcess


def start_envoy(
    supervisor: Supervisor,
    workdir: Path,
    name: str,
    *,
    auth: str,
    ingest: str,
    search: str,
    ext_authz: bool = True,
    identity_key: str = "",
    limits: dict[str, Any] | None = None,
) -> Envoy:
    """start_envoy runs Envoy with the rendered gateway config in front of the given services.

    `auth` may list several replicas separated by commas. `identity_key` is the services'
    (service_env); without it Envoy's access log carries no token and auth meters nothing.
    Gateway and admin ports are free ports; the config is `workdir/<name>.yaml`, the log
    `workdir/<name>.log`; `limits` overrides GatewayConfig's limit fields (`max_heap_mib`, …).
    It returns once the admin `/ready` answers, which is before the upstream clusters are
    healthy: wait on the gateway's `/health` when a test needs them.
    """
    port, admin = free_port(), free_port()
    replicas = auth.split(",")
    auth_check = (
        ",".join(CHECK_LISTENERS[a] for a in replicas) if all(a in CHECK_LISTENERS for a in replicas) else ""
    )
    config = gateway.GatewayConfig(
        gateway_port=port,
        admin_port=admin,
        auth=auth,
        auth_check=auth_check,
        ingest=ingest,
        search=search,
        ext_authz=ext_authz,
        access_log_token=access_log_token(identity_key),
    )
    config = dataclasses.replace(config, **(limits or {}))
    config_path = workdir / f"{name}.yaml"
    gateway.write_config(config_path, gateway.render(config))
    argv = [gateway.find_envoy(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
    child = supervisor.spawn(name, argv, log_path=workdir / f"{name}.log")
    found = Envoy(
        url=f"http://127.0.0.1:{port}",
        target=f"127.0.0.1:{port}",
        admin=f"http://127.0.0.1:{admin}",
        config_path=config_path,
        child=child,
    )
    wait_until(f"{name} admin", functools.partial(status.probe_http, f"{found.admin}/ready"), supervisor)
    return found


def wait_gateway_healthy(envoy: Envoy, supervisor: Supervisor) -> None:
    """wait_gateway_healthy waits until the gateway's `/health` answers 200: every upstream SERVING."""
    wait_until(f"{envoy.url}/health", functools.partial(status.probe_http, f"{envoy.url}/health"), supervisor)


def seed_key(
    database_url: str,
    *,
    email_prefix: str = "harness",
    permissions: Sequence[str] = ("read",),
    rate_limit: int = 1000,
) -> str:
    """seed_key inserts a new user and an API key for it into `database_url`; returns the secret.

    It opens its own connection, so it works on any migrated database and from synchronous
    code (it must not be called with an event loop running in this thread).
    """

    async def seed() -> str:
        connection = await asyncpg.connect(database_url)
        try:
            user = await connection.fetchval(
                "insert into auth.users (id, aud, role, email) values (gen_random_uuid(), 'authenticated',"
                " 'authenticated', $1 || '-' || gen_random_uuid() || '@example.test') returning id",
                email_prefix,
            )
            generated = keys.generate_key()
            await connection.execute(
                "insert into public.api_keys (user_id, name, key_prefix, key_hash, permissions, rate_limit)"
                " values ($1, $2, $3, $4, $5, $6)",
                user,
                email_prefix,
                generated.display_prefix,
                generated.key_hash,
                list(permissions),
                rate_limit,
            )
            return generated.plaintext
        finally:
            await connection.close()

    return asyncio.run(seed())
