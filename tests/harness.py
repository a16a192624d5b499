"""Process harness for tests that run the real stack: `kotadb serve` children, Envoy, seeded keys.

The spawning, port-file and health-wait code is services/common/stack.py's, the same `kotadb dev`
and `kotadb bench auth` use; this module adapts it to pytest (a failure is `pytest.fail`, files
go to the test's directory). Tests that need services as separate processes start them under a
`Supervisor` (so a failing test never leaves one running) with the helpers here:

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
* `DevStack` runs `kotadb dev` as a user does (a subprocess on free ports with its own embedded
  Postgres) and reads its stack.json; `kotadb` runs one CLI command.
* `free_port` is re-exported from services/common/pgembed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from services.auth import keys
from services.cli import gateway
from services.common import stack
from services.common.identity import access_log_token
from services.common.pgembed import free_port
from services.common.stack import SERVICES
from services.common.supervisor import ChildProcess, Supervisor

__all__ = [
    "READY_LIMIT",
    "DevStack",
    "Envoy",
    "Probe",
    "free_port",
    "kotadb",
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

Probe = Callable[[], tuple[bool, str]]


def wait_until(what: str, probe: Probe, supervisor: Supervisor, limit: float = READY_LIMIT) -> None:
    """wait_until polls `probe` until it reports ready, failing the test on timeout or a dead child.

    `probe` returns (ready, detail); the last detail is in the failure message. Every child of
    `supervisor` is checked on each round, so a service that crashed on start fails the test
    with its log tail rather than after `limit` seconds.
    """
    try:
        stack.wait_until(what, probe, supervisor, limit)
    except stack.StackError as exc:
        pytest.fail(str(exc))


def port_file_probe(path: Path) -> Probe:
    """port_file_probe is a probe that passes once `path` holds a port number."""
    return stack.port_file_probe(path)


def service_env(database_url: str, workdir: Path, identity_key: str, **extra: str) -> dict[str, str]:
    """service_env is the environment `kotadb serve` children share: database, identity, data dir.

    It starts from this process's environment (so the children find the same interpreter and
    Envoy); `extra` adds or overrides variables, e.g. `KOTADB_AUTH_KEY_CACHE_TTL="0"`.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["KOTADB_DATABASE_URL"] = database_url
    env["KOTADB_IDENTITY_KEY"] = identity_key
    env["KOTADB_SEARCH_DATA_DIR"] = str(workdir / "search-data")
    # Tests run many processes of one service at once: fixed metrics ports would collide.
    stack.metrics_on_free_ports(env)
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
    started = stack.spawn_service(
        supervisor,
        name,
        service,
        port_file=workdir / f"{name}.port",
        log_path=workdir / f"{name}.log",
        env=env,
    )
    wait_until(f"{name} port", port_file_probe(started.port_file), supervisor)
    if started.check_address:
        # The auth service's lean Check listener: start_envoy points ext_authz at it.
        CHECK_LISTENERS[started.address] = started.check_address
    return started.address, started.child


def wait_healthy(address: str, supervisor: Supervisor) -> None:
    """wait_healthy waits until the gRPC health service at `address` reports SERVING."""
    wait_until(address, functools.partial(stack.probe_grpc_health, address), supervisor)


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
    Gateway and admin ports are free ports; the config is `workdir/<name>.yaml` (0600), the log
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
    child = stack.start_envoy(
        supervisor,
        name,
        envoy_bin=gateway.find_envoy(),
        config_text=gateway.render(config),
        config_path=config_path,
        log_path=workdir / f"{name}.log",
    )
    found = Envoy(
        url=f"http://127.0.0.1:{port}",
        target=f"127.0.0.1:{port}",
        admin=f"http://127.0.0.1:{admin}",
        config_path=config_path,
        child=child,
    )
    wait_until(f"{name} admin", functools.partial(stack.probe_http, f"{found.admin}/ready"), supervisor)
    return found


def wait_gateway_healthy(envoy: Envoy, supervisor: Supervisor) -> None:
    """wait_gateway_healthy waits until the gateway's `/health` answers 200: every upstream SERVING."""
    wait_until(f"{envoy.url}/health", functools.partial(stack.probe_http, f"{envoy.url}/health"), supervisor)


def spawn_services(supervisor: Supervisor, workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """spawn_services runs auth, ingest and search as `kotadb serve` processes and waits until each
    is healthy; it returns each service's address by name."""
    addresses = {name: spawn_service(supervisor, workdir, name, name, env)[0] for name in SERVICES}
    for address in addresses.values():
        wait_healthy(address, supervisor)
    return addresses


def start_gateway(
    supervisor: Supervisor, workdir: Path, addresses: dict[str, str], identity_key: str
) -> Envoy:
    """start_gateway puts Envoy in front of `addresses` (spawn_services) and waits for its /health."""
    envoy = start_envoy(
        supervisor,
        workdir,
        "envoy",
        auth=addresses["auth"],
        ingest=addresses["ingest"],
        search=addresses["search"],
        identity_key=identity_key,
    )
    wait_gateway_healthy(envoy, supervisor)
    return envoy


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


# Seconds: the first `kotadb dev` run creates a cluster and imports every service.
STARTUP_LIMIT = 240.0
STOP_LIMIT = 90.0


class DevStack:
    """DevStack is one `kotadb dev` subprocess and what it printed.

    The stack under test always uses its own embedded cluster, whatever the test session uses;
    `env` adds variables (e.g. a JWT secret) to the command's environment.
    """

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.output_path = data_dir.parent / f"{data_dir.name}-dev-{time.monotonic_ns()}.out"
        environment = dict(os.environ, **(env or {}))
        environment.pop("KOTADB_DATABASE_URL", None)
        with self.output_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "dev", "--data-dir", str(data_dir), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                cwd=gateway.REPO_ROOT,
            )

    @property
    def output(self) -> str:
        """output is everything the command printed so far."""
        return self.output_path.read_text(errors="replace")

    def wait_for_stack(self) -> dict[str, Any]:
        """wait_for_stack returns stack.json once written, failing if the command exits first."""
        stack_path = self.data_dir / stack.STACK_FILE
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"kotadb dev exited with {self.process.returncode}:\n{self.output}")
            if stack_path.exists():
                with contextlib.suppress(ValueError):
                    document: dict[str, Any] = json.loads(stack_path.read_text())
                    return document
            time.sleep(0.25)
        pytest.fail(f"no stack.json after {STARTUP_LIMIT}s:\n{self.output}")

    def descendants(self, document: dict[str, Any]) -> list[psutil.Process]:
        """descendants lists every process the stack runs: children, grandchildren, Postgres."""
        found = psutil.Process(self.process.pid).children(recursive=True)
        postmaster_pid = document["pids"].get("postgres")
        if postmaster_pid:
            postmaster = psutil.Process(postmaster_pid)
            found += [postmaster, *postmaster.children(recursive=True)]
        return found

    def info(self) -> stack.StackInfo:
        """info is the stack's current stack.json, typed."""
        return stack.StackInfo.load(self.data_dir / stack.STACK_FILE)

    def terminate(self, signum: int = signal.SIGTERM) -> int:
        """terminate sends signum and waits for the command to finish stopping the stack."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=STOP_LIMIT)

    def kill_if_running(self) -> None:
        """kill_if_running stops the command (SIGTERM, then SIGKILL) if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_LIMIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kotadb(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """kotadb runs one `kotadb` command to completion and returns it (output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=gateway.REPO_ROOT,
    )
