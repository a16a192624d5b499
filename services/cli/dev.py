"""The `kotadb dev` command: the whole stack on this machine with one command.

Start order, each step waiting for the previous one to be healthy:

1. Postgres: `KOTADB_DATABASE_URL` when set, else an embedded cluster in `<data-dir>/postgres`
   (services/common/pgembed.py), reused by later runs with the same data dir.
2. The Supabase compatibility bootstrap, pending migrations and the seed data.
3. `kotadb serve auth|ingest|search`, each a child process on its own port; ready once its
   gRPC health says SERVING (which the services only say once their database is reachable).
4. Envoy, with a config rendered from deploy/envoy/envoy.yaml.tmpl into `<data-dir>/envoy/`;
   ready once the admin `/ready` is LIVE and `GET /health` through the gateway answers 200.

Between steps 2 and 3 a fresh demo API key (read and write) is issued to the seed's demo user,
every run, because its secret exists only at creation (the database keeps a SHA-256 hash);
the previous run's demo key is revoked.
Then the endpoints, the demo key and a curl example are printed and written to
`<data-dir>/stack.json` (mode 0600, as `demo_api_key`) for `kotadb status`, tests and scripts.
SIGTERM or Ctrl-C stops everything in reverse order and removes stack.json
(services/common/supervisor.py makes sure no child outlives the command).

The default data dir is `$XDG_CACHE_HOME/kotadb/dev` (usually `~/.cache/kotadb/dev`); see
`services.cli.status.default_data_dir`. Child logs go to `<data-dir>/logs/<name>.log`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from services.auth.config import AuthSettings
from services.auth.management import MAX_PAGE_SIZE, KeyManager, KeySpec
from services.auth.store import AuthStore
from services.cli import gateway, status
from services.cli.keys import DEMO_USER_ID
from services.common import db, migrate
from services.common.identity import READ, WRITE, Identity, access_log_token
from services.common.pgembed import EmbeddedPostgres, free_port, port_is_free
from services.common.server import listener_port_file
from services.common.settings import env_settings
from services.common.supervisor import ChildExited, ChildProcess, StopRequested, Supervisor

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 8080,
    "admin": 9901,
    "auth": 50051,
    "auth_check": 50055,
    "ingest": 50052,
    "search": 50053,
}

# How long each component may take to become healthy. Generous because CI machines are shared:
# a service's first start imports tree-sitter grammars and opens its pool.
READY_TIMEOUT = 120.0
POLL_INTERVAL = 0.25

# The demo key goes to DEMO_USER_ID (services/cli/keys.py), the user deploy/supabase/seed.sql makes.
DEMO_KEY_NAME = "kotadb dev demo"
# A read route that answers for any valid read key: the calling key's own usage (GetUsage).
DEMO_PATH = "/v1/usage"


class StackError(RuntimeError):
    """StackError is a startup failure with a message meant for the person running `kotadb dev`."""


@dataclass(frozen=True)
class Ports:
    """Ports are the TCP ports every component listens on, all on 127.0.0.1."""

    gateway: int
    admin: int
    auth: int
    ingest: int
    search: int
    # The auth process's lean Check listener (KOTADB_AUTH_CHECK_PORT), what Envoy's ext_authz calls.
    auth_check: int = 0


def choose_ports(gateway_port: int, admin_port: int | None) -> Ports:
    """choose_ports fixes every port before anything starts.

    `gateway_port == 0` puts every component on a free port (services get 0 and report what
    they bound). Otherwise the fixed defaults are
    used (with the given gateway and admin ports), and a port that is already taken is an error
    naming it, rather than a child dying later with a bind failure in its log.
    """
    if gateway_port == 0:
        # Services bind port 0 themselves and report it (`--port-file`), so only Envoy's two
        # ports are picked here, just before it starts.
        return Ports(
            gateway=free_port(), admin=admin_port or free_port(), auth=0, ingest=0, search=0, auth_check=0
        )
    wanted = dict(DEFAULT_PORTS, gateway=gateway_port)
    if admin_port is not None:
        wanted["admin"] = admin_port
    taken = [f"{name} {port}" for name, port in wanted.items() if port and not port_is_free(port)]
    if taken:
        raise StackError(
            "port(s) already in use: "
            + ", ".join(taken)
            + " (is another stack running? `kotadb dev --gateway-port 0` picks free ports)"
        )
    return Ports(**{name: port or free_port() for name, port in wanted.items()})


def _migrate(database_url: str, log: Callable[[str], None]) -> None:
    """_migrate applies the compatibility bootstrap, pending migrations and the seed data."""
    migrate.apply_bootstrap(database_url)
    applied = migrate.apply_migrations(database_url)
    log("migrations applied: " + (", ".join(applied) if applied else "none, up to date"))
    migrate.seed(database_url)


def issue_demo_key(database_url: str) -> tuple[str, str]:
    """issue_demo_key creates a read+write API key for the demo user; returns (secret, key id).

    The demo keys of earlier runs are revoked first, so one demo key is valid at a time.

    It runs the auth service's own key rules (services/auth/management.py) as the service role,
    straight against the database, so the key exists before any service starts.
    """

    async def issue() -> tuple[str, str]:
        pool = await db.create_pool(database_url, min_size=1, max_size=1, statement_cache_size=0)
        try:
            manager = KeyManager(AuthStore(pool), env_settings(AuthSettings))
            service = Identity.service()
            await manager.ensure_user(DEMO_USER_ID)
            # Each run's key replaces the last one, whose secret was printed and kept in a
            # stack.json that is gone now: nobody should be holding it.
            active, _ = await manager.list(service, user_id=DEMO_USER_ID, page_size=MAX_PAGE_SIZE)
            for record in active:
                if record.name == DEMO_KEY_NAME:
                    await manager.revoke(service, record.id)
            spec = KeySpec(name=DEMO_KEY_NAME, permissions=frozenset({READ, WRITE}))
            issued = await manager.create(service, spec, user_id=DEMO_USER_ID)
        finally:
            await pool.close()
        return issued.secret, str(issued.record.id)

    return asyncio.run(issue())


def _wait_until(
    what: str,
    probe: Callable[[], tuple[bool, str]],
    supervisor: Supervisor,
    child: ChildProcess | None = None,
    timeout: float = READY_TIMEOUT,
) -> None:
    """_wait_until polls probe until it passes, failing fast if any child exits meanwhile."""
    deadline = time.monotonic() + timeout
    detail = ""
    while True:
        try:
            supervisor.check()
        except ChildExited as exc:
            raise StackError(f"{exc}; last lines of {exc.child.log_path}:\n{exc.child.log_tail()}") from None
        ok, detail = probe()
        if ok:
            return
        if time.monotonic() >= deadline:
            tail = f"\nlast lines of {child.log_path}:\n{child.log_tail()}" if child is not None else ""
            raise StackError(f"{what} not healthy after {timeout:.0f}s: {detail}{tail}")
        time.sleep(POLL_INTERVAL)


def _read_port(path: Path) -> tuple[bool, str]:
    """_read_port is a probe that passes once a service has written its bound port to path."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return False, f"{path} not written yet"
    return text.isdigit() and int(text) > 0, f"{path} holds {text!r}"


def identity_key(data_dir: Path) -> str:
    """identity_key is the stack's shared identity-signing secret, made once per data dir.

    Auth's Check signs the caller identity it forwards with it, and every service verifies that
    signature (services/common/identity.py), so all children must share it. It lives in
    `<data-dir>/identity.key`, mode 0600, and survives restarts like the database does.
    """
    path = data_dir / "identity.key"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if len(existing) >= 32:
        return existing
    created = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(created + "\n")
    return created


def _stack_identity_key(data_dir: Path) -> str:
    """_stack_identity_key is KOTADB_IDENTITY_KEY when set, else the data dir's own key."""
    return os.environ.get("KOTADB_IDENTITY_KEY") or identity_key(data_dir)


def _child_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """_child_env is the environment every service process gets."""
    env = dict(os.environ)
    env["KOTADB_DATABASE_URL"] = database_url
    env["KOTADB_IDENTITY_KEY"] = _stack_identity_key(data_dir)
    env.setdefault("KOTADB_SEARCH_DATA_DIR", str(data_dir / "search"))
    # Unbuffered, so a crash's last log lines are in the log file when we print them.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _refuse_running_stack(stack_path: Path) -> None:
    """_refuse_running_stack stops a second `kotadb dev` on a data dir whose stack is still up."""
    try:
        previous = json.loads(stack_path.read_text())
        pid = int(previous["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        stack_path.unlink(missing_ok=True)
        return
    if pid != os.getpid() and _is_dev_process(pid):
        raise StackError(f"a stack is already running from {stack_path.parent} (pid {pid}); stop it first")
    stack_path.unlink(missing_ok=True)


def _is_dev_process(pid: int) -> bool:
    """_is_dev_process reports whether pid is a live `kotadb dev` (not a reused pid)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "dev" in cmdline


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """_write_json replaces path atomically, readable only by us (it may hold a database password)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def run_stack(data_dir: Path, gateway_port: int, admin_port: int | None) -> int:
    """run_stack starts the stack, waits for a stop signal or a crash, and stops it again."""
    data_dir = data_dir.expanduser().absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    stack_path = data_dir / status.STACK_FILE
    logs = data_dir / "logs"

    def log(message: str) -> None:
        print(f"kotadb dev: {message}", flush=True)

    supervisor = Supervisor()
    supervisor.handle_signals()
    code = 0
    owns_stack_file = False
    try:
        _refuse_running_stack(stack_path)
        ports = choose_ports(gateway_port, admin_port)
        database_url, postgres_pid = _start_database(data_dir, supervisor, log)
        _migrate(database_url, log)
        try:
            demo_key, demo_key_id = issue_demo_key(database_url)
        except Exception as exc:  # settings, database or key-rule errors, all fatal here
            raise StackError(f"could not issue the demo API key: {exc}") from exc
        log(f"issued demo API key {demo_key_id} (read, write) to user {DEMO_USER_ID}")

        ports, children = _start_services(data_dir, ports, database_url, supervisor, log)
        children["envoy"] = _start_envoy(data_dir, ports, supervisor, logs)
        log(f"started envoy (pid {children['envoy'].pid})")
        admin_url = f"http://127.0.0.1:{ports.admin}"
        gateway_url = f"http://127.0.0.1:{ports.gateway}"
        for what, url in (("envoy", f"{admin_url}/ready"), ("gateway /health", f"{gateway_url}/health")):
            _wait_until(what, functools.partial(status.probe_http, url), supervisor, children["envoy"])

        stack = {
            "gateway": gateway_url,
            "grpc": {name: f"127.0.0.1:{getattr(ports, name)}" for name in status.SERVICES},
            # The auth process's Check-only listener, which Envoy's ext_authz calls.
            "auth_check": f"127.0.0.1:{ports.auth_check}",
            "database_url": database_url,
            "envoy_admin": admin_url,
            "pid": os.getpid(),
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "data_dir": str(data_dir),
            "logs": str(logs),
            "pids": {"postgres": postgres_pid, **{name: child.pid for name, child in children.items()}},
            "demo_api_key": demo_key,
            "demo_api_key_id": demo_key_id,
            "demo_user_id": str(DEMO_USER_ID),
        }
        _write_json(stack_path, stack)
        owns_stack_file = True
        _print_endpoints(stack)
        while True:
            supervisor.check()
            # The embedded cluster daemonizes, so the supervisor cannot see it exit; look here.
            if postgres_pid is not None and not psutil.pid_exists(postgres_pid):
                raise StackError(f"postgres (pid {postgres_pid}) exited; see {data_dir / 'postgres'}")
            time.sleep(0.5)
    except StopRequested as stop:
        log(f"{stop} received, stopping")
    except ChildExited as exc:
        log(f"{exc}; stopping the stack. Last lines of {exc.child.log_path}:\n{exc.child.log_tail()}")
        code = 1
    except StackError as exc:
        log(f"error: {exc}")
        code = 1
    finally:
        # Signals arriving from here on are ignored by the supervisor: shutdown runs to the end.
        with contextlib.suppress(StopRequested):
            supervisor.stop_all(log)
        if owns_stack_file:  # never remove the stack.json of another, still running, stack
            stack_path.unlink(missing_ok=True)
        log("stopped")
    return code


def _start_database(
    data_dir: Path, supervisor: Supervisor, log: Callable[[str], None]
) -> tuple[str, int | None]:
    """_start_database returns the database URL, starting the embedded cluster unless one is given."""
    external = os.environ.get("KOTADB_DATABASE_URL")
    if external:
        log("using KOTADB_DATABASE_URL")
        ok, detail = status.probe_postgres(external)
        if not ok:
            raise StackError(f"KOTADB_DATABASE_URL is not reachable: {detail}")
        return external, None
    cluster = EmbeddedPostgres(data_dir / "postgres")
    reused = (cluster.pgdata / "PG_VERSION").exists()
    log(("reusing" if reused else "creating") + f" the embedded Postgres cluster in {data_dir / 'postgres'}")
    # Registered before start, so a stop signal that lands mid-start still stops the cluster.
    supervisor.on_stop("postgres", cluster.stop)
    try:
        dsn = cluster.start()
    except Exception as exc:  # pgembed raises EmbeddedPostgresError and OSError variants
        raise StackError(f"could not start Postgres: {exc}") from exc
    log(f"postgres is up (pid {cluster.postmaster_pid}): {dsn}")
    return dsn, cluster.postmaster_pid


def _start_services(
    data_dir: Path, ports: Ports, database_url: str, supervisor: Supervisor, log: Callable[[str], None]
) -> tuple[Ports, dict[str, ChildProcess]]:
    """_start_services runs `kotadb serve` for each service and waits until all are SERVING.

    Each service writes the port it bound to a file (`--port-file`), which is how port 0 turns
    into a real port; the returned Ports carry those.
    """
    env = _child_env(database_url, data_dir)
    logs = data_dir / "logs"
    children: dict[str, ChildProcess] = {}
    port_files = {name: data_dir / "run" / f"{name}.port" for name in status.SERVICES}
    for name in status.SERVICES:
        port_files[name].parent.mkdir(parents=True, exist_ok=True)
        port_files[name].unlink(missing_ok=True)
        argv = [sys.executable, "-m", "services.cli", "serve", name]
        argv += ["--port", str(getattr(ports, name)), "--port-file", str(port_files[name])]
        child_env = dict(env)
        if name == "auth":
            child_env["KOTADB_AUTH_CHECK_PORT"] = str(ports.auth_check)
        children[name] = supervisor.spawn(name, argv, log_path=logs / f"{name}.log", env=child_env)
        log(f"started {name} (pid {children[name].pid})")
        if name == "auth" and "KOTADB_AUTH_ADDRESS" not in os.environ:
            # Ingest and search check API keys presented to them directly through auth, so they
            # start once auth's port is known.
            _wait_until(
                "auth port file", functools.partial(_read_port, port_files[name]), supervisor, children[name]
            )
            env["KOTADB_AUTH_ADDRESS"] = f"127.0.0.1:{port_files[name].read_text().strip()}"
    bound: dict[str, int] = {}
    for name, child in children.items():
        port_probe = functools.partial(_read_port, port_files[name])
        _wait_until(f"{name} port file", port_probe, supervisor, child)
        bound[name] = int(port_files[name].read_text().strip())
        address = f"127.0.0.1:{bound[name]}"
        _wait_until(name, functools.partial(status.probe_grpc_health, address), supervisor, child)
        log(f"{name} is SERVING on {address}")
    bound["auth_check"] = int(listener_port_file(port_files["auth"], "check").read_text().strip())
    return dataclasses.replace(ports, **bound), children


def _start_envoy(data_dir: Path, ports: Ports, supervisor: Supervisor, logs: Path) -> ChildProcess:
    """_start_envoy renders the gateway config into the data dir and starts Envoy on it."""
    config = gateway.GatewayConfig(
        gateway_port=ports.gateway,
        admin_port=ports.admin,
        auth=f"127.0.0.1:{ports.auth}",
        auth_check=f"127.0.0.1:{ports.auth_check}",
        # The same key the services get (_child_env), so auth accepts Envoy's access log.
        access_log_token=access_log_token(_stack_identity_key(data_dir)),
        ingest=f"127.0.0.1:{ports.ingest}",
        search=f"127.0.0.1:{ports.search}",
    )
    config_path = data_dir / "envoy" / "envoy.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(gateway.render(config))
    try:
        envoy_bin = gateway.find_envoy()
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from None
    # --disable-hot-restart: hot restart shares memory keyed by --base-id, so a second Envoy on
    # the machine (another stack, a test) would otherwise refuse to start.
    argv = [envoy_bin, "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
    return supervisor.spawn("envoy", argv, log_path=logs / "envoy.log")


def _print_endpoints(stack: dict[str, Any]) -> None:
    """_print_endpoints tells the person at the terminal where everything is."""
    lines = [
        "stack is up:",
        f"  gateway      {stack['gateway']}   (REST and gRPC; GET /health needs no key)",
        *(f"  {name:<12} {address}" for name, address in stack["grpc"].items()),
        f"  postgres     {status._redact(stack['database_url'])}",
        f"  envoy admin  {stack['envoy_admin']}",
        f"  logs         {stack['logs']}",
        f"  stack.json   {Path(stack['data_dir']) / status.STACK_FILE}",
        f"  demo key     {stack['demo_api_key']}   (read, write; shown once, also in stack.json)",
        "try it:",
        f"  {demo_curl(stack)}",
        "Ctrl-C stops everything.",
    ]
    print("kotadb dev: " + "\n".join(lines), flush=True)


def demo_curl(stack: dict[str, Any]) -> str:
    """demo_curl is a curl command that calls the gateway with the demo key (its own usage)."""
    return f'curl -H "Authorization: Bearer {stack["demo_api_key"]}" {stack["gateway"]}{DEMO_PATH}'


def register(subparsers: Any) -> None:
    """register adds `kotadb dev`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dev", help="run Postgres, the three services and Envoy locally until Ctrl-C"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"state directory: database, logs, stack.json (default {status.default_data_dir()})",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=DEFAULT_PORTS["gateway"],
        help="gateway port; 0 puts every component on a free port",
    )
    parser.add_argument(
        "--admin-port", type=int, default=None, help=f"Envoy admin port (default {DEFAULT_PORTS['admin']})"
    )
    parser.set_defaults(func=_dev_command)


def _dev_command(args: argparse.Namespace) -> int:
    """_dev_command implements `kotadb dev`."""
    return run_stack(args.data_dir or status.default_data_dir(), args.gateway_port, args.admin_port)
