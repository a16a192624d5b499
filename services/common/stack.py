"""The one way a KotaDB stack is brought up: `kotadb dev`, the auth benchmark and the tests.

What every caller shares lives here, so the three cannot drift apart:

* `StackInfo`, the typed contents of `<data-dir>/stack.json` (what `kotadb dev` started, where it
  listens, the demo key), with `save` (atomic, mode 0600: it holds a key and maybe a database
  password) and `load` (which checks every field's type and names the one that is wrong);
* the probes that decide "healthy" (Postgres `select version()`, gRPC health, HTTP 200), shared
  with `kotadb status` so "dev says ready" and "status says ok" mean the same thing;
* `spawn_service` (`kotadb serve <service> --port-file …` as a supervised child), `read_port` and
  `wait_until`, which fails at once, with the end of the child's log, when a child dies;
* `start_envoy` (a rendered config written 0600, Envoy started on it);
* `EmbeddedDatabase`, the embedded Postgres cluster as something the supervisor can watch and
  restart on the same port, so services reconnect to the address they already have;
* private files: `private_dir` (0700) and `private_file` / `write_private` (0600) for everything
  under a data dir that holds a secret or a log.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pgembed import EmbeddedPostgres
from services.common.server import listener_port_file
from services.common.supervisor import ChildExited, ChildProcess, GaveUp, Supervisor

STACK_FILE = "stack.json"
SERVICES: tuple[str, ...] = ("auth", "ingest", "search")

# Per-probe limit: long enough for a loaded CI machine, short enough that `status` stays snappy.
PROBE_TIMEOUT = 3.0
POLL_INTERVAL = 0.1
# Seconds a restart waits for a killed postmaster to be reaped before pg_ctl can start anew.
REAP_WAIT = 5.0

Probe = Callable[[], tuple[bool, str]]


class StackError(RuntimeError):
    """StackError is a startup failure with a message meant for the person starting the stack."""


# -- stack.json ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StackInfo:
    """StackInfo is what `kotadb dev` writes to `<data-dir>/stack.json` for status, tests and scripts.

    Addresses are `127.0.0.1:port`; `gateway` and `envoy_admin` are base URLs. `grpc` maps
    each service child to its address: auth, ingest, search, then any further search replicas
    (search-2, …). `metrics` maps a
    component to its Prometheus URL: each service whose `<port file>.metrics` exists, and Envoy's
    admin `/stats/prometheus`. `log_files` maps each component to its log file. `pids` may hold
    None for a database the stack did not start.
    """

    gateway: str
    grpc: dict[str, str]
    auth_check: str
    database_url: str
    envoy_admin: str
    pid: int
    started_at: str
    data_dir: str
    logs: str
    pids: dict[str, int | None]
    demo_api_key: str
    demo_api_key_id: str
    demo_user_id: str
    metrics: dict[str, str] = field(default_factory=dict)
    log_files: dict[str, str] = field(default_factory=dict)
    # The MCP server's own HTTP address (the gateway serves it at /mcp); empty when none runs.
    mcp: str = ""

    def to_json(self) -> dict[str, Any]:
        """to_json is the document written to stack.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: object) -> StackInfo:
        """from_json checks a parsed stack.json and builds the StackInfo; ValueError names a bad field."""
        if not isinstance(document, dict):
            raise ValueError("stack.json is not a JSON object")
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name not in document:
                if item.default_factory is not dataclasses.MISSING or item.default is not dataclasses.MISSING:
                    continue
                raise ValueError(f"stack.json has no {item.name!r}")
            value = document[item.name]
            if not _has_type(value, str(item.type)):
                raise ValueError(f"stack.json field {item.name!r} is not a {item.type}: {value!r}")
            values[item.name] = value
        return cls(**values)

    def save(self, path: Path) -> None:
        """save replaces path atomically with this stack, readable only by its owner (0600)."""
        write_private(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StackInfo:
        """load reads a stack.json; FileNotFoundError when there is none, ValueError when malformed."""
        return cls.from_json(json.loads(path.read_text()))

    @staticmethod
    def now() -> str:
        """now is the `started_at` stamp: UTC, ISO 8601, whole seconds."""
        return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _has_type(value: object, annotation: str) -> bool:
    """_has_type checks a JSON value against one of StackInfo's (string) field annotations."""
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "dict[str, str]":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if annotation == "dict[str, int | None]":
        return isinstance(value, dict) and all(
            v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value.values()
        )
    raise TypeError(f"no check for {annotation}")


def metrics_urls(port_files: Mapping[str, Path], envoy_admin: str | None) -> dict[str, str]:
    """metrics_urls lists the Prometheus endpoints that exist: services' `.metrics` ports, Envoy's.

    A service writes `<port file>.metrics` only when it runs a metrics listener, so a missing
    file just leaves that service out.
    """
    urls: dict[str, str] = {}
    for name, port_file in port_files.items():
        port = read_port(listener_port_file(port_file, "metrics"))
        if port is not None:
            urls[name] = f"http://127.0.0.1:{port}/metrics"
    if envoy_admin:
        urls["envoy"] = f"{envoy_admin}/stats/prometheus"
    return urls


def metrics_on_free_ports(env: dict[str, str], *, keep: bool = False) -> dict[str, str]:
    """metrics_on_free_ports puts every service's metrics listener on a free port (0) in env.

    Each listener then reports its port in `<port file>.metrics`. With `keep`, ports the
    environment already fixes stay; without it (several processes of one service) they go.
    """
    for name in SERVICES:
        variable = f"KOTADB_{name.upper()}_METRICS_PORT"
        if not (keep and variable in env):
            env[variable] = "0"
    return env


# -- private files -------------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """private_dir creates path (and missing parents) and makes it 0700, also when it existed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """private_file creates path empty if missing and makes it 0600 (for logs and secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    path.chmod(0o600)
    return path


def write_private(path: Path, text: str) -> None:
    """write_private replaces path atomically with text, mode 0600 from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


# -- probes --------------------------------------------------------------------------------


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


def redact(url: str) -> str:
    """redact hides a password in a connection URL so output is safe to paste."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def read_port(path: Path) -> int | None:
    """read_port is the port a server wrote to path, or None while the file is missing or partial.

    Servers write the file and rename it into place (server.write_port_file), so a reader never
    sees half a number.
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def port_file_probe(path: Path) -> Probe:
    """port_file_probe is a probe that passes once path holds a port number."""

    def probe() -> tuple[bool, str]:
        return read_port(path) is not None, f"waiting for {path}"

    return probe


def wait_until(
    what: str,
    probe: Probe,
    watch: Supervisor | Sequence[ChildProcess],
    limit: float,
    child: ChildProcess | None = None,
) -> None:
    """wait_until polls probe until it passes; StackError on timeout or when a child dies.

    `watch` is a supervisor (its `check()` runs each round, so a child that may be restarted is
    restarted and one that may not ends the wait) or a list of children that must stay alive.
    The error carries the end of the dead child's log, or of `child`'s on timeout.
    """
    deadline = time.monotonic() + limit
    detail = ""
    while True:
        try:
            if isinstance(watch, Supervisor):
                watch.check()
            else:
                for member in watch:
                    if not member.alive():
                        raise ChildExited(member)
        except ChildExited as exc:
            raise StackError(f"{exc}; last lines of {exc.child.log_path}:\n{exc.child.log_tail()}") from None
        except GaveUp as exc:
            raise StackError(str(exc)) from None
        ok, detail = probe()
        if ok:
            return
        if time.monotonic() >= deadline:
            tail = f"\nlast lines of {child.log_path}:\n{child.log_tail()}" if child is not None else ""
            raise StackError(f"{what} not healthy after {limit:.0f}s: {detail}{tail}")
        time.sleep(POLL_INTERVAL)


# -- processes -----------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """ServiceProcess is one `kotadb serve` child and the port file it reports its port in."""

    name: str
    service: str
    child: ChildProcess
    port_file: Path

    @property
    def address(self) -> str:
        """address is `127.0.0.1:<bound port>`; StackError before the port file is written."""
        port = read_port(self.port_file)
        if port is None:
            raise StackError(f"{self.name} has not written {self.port_file}")
        return f"127.0.0.1:{port}"

    @property
    def check_address(self) -> str:
        """check_address is auth's lean Check listener (`<port file>.check`), or '' when there is none."""
        port = read_port(listener_port_file(self.port_file, "check"))
        return f"127.0.0.1:{port}" if port is not None else ""

    def pin_ports(self) -> None:
        """pin_ports makes a restart bind the ports this process bound, so its peers still find it.

        Envoy's clusters and the other services hold these addresses (and stack.json the metrics
        URL); a restarted service on a fresh port 0 would be unreachable to them.
        """
        argv = list(self.child.argv)
        argv[argv.index("--port") + 1] = str(int(self.address.rsplit(":", 1)[1]))
        self.child.argv = argv
        env = dict(self.child.env or os.environ)
        check = self.check_address
        if check:
            env["KOTADB_AUTH_CHECK_PORT"] = check.rsplit(":", 1)[1]
        metrics = read_port(listener_port_file(self.port_file, "metrics"))
        if metrics is not None:
            env[f"KOTADB_{self.service.upper()}_METRICS_PORT"] = str(metrics)
        self.child.env = env


def serve_argv(service: str, port: int, port_file: Path) -> list[str]:
    """serve_argv is the command line of `kotadb serve service` on port, reporting to port_file."""
    return [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        service,
        "--port",
        str(port),
        "--port-file",
        str(port_file),
    ]


def spawn_service(
    supervisor: Supervisor,
    name: str,
    service: str,
    *,
    port_file: Path,
    log_path: Path,
    env: Mapping[str, str],
    port: int = 0,
    restart: bool = False,
) -> ServiceProcess:
    """spawn_service starts `kotadb serve service` as child `name`, writing its port to port_file.

    It returns at once: wait with `wait_until(..., port_file_probe(port_file), ...)` for the
    port, then `probe_grpc_health` for SERVING. Stale port files are removed first so a reader
    never takes an earlier run's port. `restart` lets the supervisor restart it when it dies.
    """
    port_file.unlink(missing_ok=True)
    listener_port_file(port_file, "check").unlink(missing_ok=True)
    listener_port_file(port_file, "metrics").unlink(missing_ok=True)
    child = supervisor.spawn(
        name, serve_argv(service, port, port_file), log_path=log_path, env=env, restart=restart
    )
    return ServiceProcess(name=name, service=service, child=child, port_file=port_file)


def envoy_argv(envoy_bin: str, config_path: Path) -> list[str]:
    """envoy_argv runs Envoy on config_path.

    --disable-hot-restart: hot restart shares memory keyed by --base-id, so a second Envoy on the
    machine (another stack, a test) would otherwise refuse to start.
    """
    return [envoy_bin, "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]


def start_envoy(
    supervisor: Supervisor,
    name: str,
    *,
    envoy_bin: str,
    config_text: str,
    config_path: Path,
    log_path: Path,
    restart: bool = False,
) -> ChildProcess:
    """start_envoy writes the rendered config (0600: it holds the access-log token) and starts Envoy.

    It returns at once; wait on the admin `/ready` (and the gateway's `/health` when upstreams
    must be healthy too).
    """
    write_private(config_path, config_text)
    return supervisor.spawn(name, envoy_argv(envoy_bin, config_path), log_path=log_path, restart=restart)


class EmbeddedDatabase:
    """EmbeddedDatabase is the embedded Postgres cluster as a restartable part of a stack.

    The cluster daemonizes (pg_ctl), so it is not a child the supervisor can wait on; this gives
    the supervisor what it needs to watch it (`alive`) and bring it back (`restart`) on the same
    port, so every service's database URL stays valid and their pools reconnect by themselves.
    """

    name = "postgres"

    def __init__(self, directory: Path) -> None:
        # Only the port is kept here (the cluster itself is the unprivileged user's 0700 `pg/`),
        # but nothing in it is anyone else's business either.
        self.directory = private_dir(directory)
        self.cluster = EmbeddedPostgres(directory)
        self._port = 0

    @property
    def reused(self) -> bool:
        """reused reports whether the cluster already existed (a later run on the same data dir)."""
        return (self.cluster.pgdata / "PG_VERSION").exists()

    @property
    def pid(self) -> int | None:
        """pid is the postmaster's process id while it runs."""
        return self.cluster.postmaster_pid

    @property
    def log_path(self) -> Path:
        """log_path is the server's own log file."""
        return self.cluster.log_path

    def start(self) -> str:
        """start brings the cluster up (creating it on first use) and returns its DSN."""
        dsn = self.cluster.start()
        self._port = self.cluster.port
        return dsn

    def alive(self) -> bool:
        """alive reports whether the postmaster is still running."""
        pid = self.cluster.postmaster_pid
        if pid is None:
            return False
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def restart(self) -> None:
        """restart starts the cluster again on the port it had (after its postmaster died).

        pg_ctl takes a postmaster that has died but is not yet reaped (a zombie) for a running
        server, so the restart first waits a little for it to go; if it does not, this attempt
        fails and the supervisor tries again later.
        """
        old = self.cluster.postmaster_pid
        deadline = time.monotonic() + REAP_WAIT
        while old is not None and psutil.pid_exists(old) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        # The dead cluster object's exit hook would otherwise `pg_ctl stop` its successor.
        atexit.unregister(self.cluster.stop)
        self.cluster = EmbeddedPostgres(self.directory, port=self._port)
        self.cluster.start()

    def stop(self) -> None:
        """stop shuts the cluster down."""
        self.cluster.stop()
