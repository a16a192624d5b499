"""The `kotadb dev` command: the whole stack on this machine with one command.

Start order, each step waiting for the previous one to be healthy:

1. Postgres: `KOTADB_DATABASE_URL` when set, else an embedded cluster in `<data-dir>/postgres`
   (services/common/pgembed.py), reused by later runs with the same data dir.
2. The Supabase compatibility bootstrap, pending migrations and the seed data.
3. `kotadb serve auth|ingest|search`, each a child process on its own port; ready once its
   gRPC health says SERVING (which the services only say once their database is reachable).
   `--search-replicas N` runs N search replicas, then `kotadb mcp --http` for the gateway's
   `/mcp` (services/cli/devsearch.py).
4. Envoy, with a config rendered from deploy/envoy/envoy.yaml.tmpl into `<data-dir>/envoy/`;
   ready once the admin `/ready` is LIVE and `GET /health` through the gateway answers 200.

Between steps 2 and 3 a fresh demo API key (read and write) is issued to the seed's demo user,
every run, because its secret exists only at creation (the database keeps a SHA-256 hash);
the previous run's demo key is revoked.
Once the gateway is healthy, the checkout `kotadb dev` runs from is registered for the demo user
as the repository `kotadb/kotadb` (a `file://` URL) and its sync is queued (services/cli/devrepo.py),
so the stack holds real code as soon as it is up. The ingest service gets
KOTADB_INGEST_ALLOW_LOCAL_URLS=true for that (dev only) and KOTADB_INGEST_SECRET_KEYS from
`<data-dir>/ingest-secret.keys` (made once, 0600), the key that encrypts webhook secrets and
access tokens in the database.
Then the endpoints, the demo key, a curl example and `kotadb push`/`repos`/`jobs` examples are
printed, and the endpoints written to `<data-dir>/stack.json` (services/common/stack.py's
StackInfo, mode 0600, the key as `demo_api_key`) for `kotadb status`, `kotadb keys`, the client
commands, tests and scripts.

While it runs, a part that dies (the embedded Postgres, a service, Envoy) is restarted on the same
ports after a backoff, with a bounded number of attempts in a row (supervisor.RestartPolicy); the
other parts reconnect by themselves. When the attempts are spent the stack stops, naming the
dead part's log file. SIGTERM or Ctrl-C stops everything in reverse order and removes stack.json
(services/common/supervisor.py makes sure no child outlives the command).

The default data dir is `$XDG_CACHE_HOME/kotadb/dev` (usually `~/.cache/kotadb/dev`); see
`services.cli.status.default_data_dir`. Every directory the command makes there is 0700, and
every log or secret 0600: child logs (`<data-dir>/logs/<name>.log`), stack.json, identity.key,
ingest-secret.keys and the rendered Envoy config (it holds the access-log token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from services.auth.config import AuthSettings
from services.auth.management import MAX_PAGE_SIZE, KeyManager, KeySpec
from services.auth.store import AuthStore
from services.cli import devrepo, devsearch, gateway, status
from services.cli.keys import DEMO_USER_ID
from services.common import db, migrate
from services.common.identity import READ, WRITE, Identity, access_log_token
from services.common.pgembed import free_port, port_is_free
from services.common.settings import env_settings
from services.common.stack import (
    POLL_INTERVAL,
    SERVICES,
    STACK_FILE,
    EmbeddedDatabase,
    ServiceProcess,
    StackError,
    StackInfo,
    metrics_on_free_ports,
    metrics_urls,
    port_file_probe,
    private_dir,
    probe_grpc_health,
    probe_http,
    probe_postgres,
    redact,
    spawn_service,
    start_envoy,
    wait_until,
)
from services.common.supervisor import ChildExited, ChildProcess, GaveUp, StopRequested, Supervisor
from services.ingest.secretbox import generate_key_spec

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 8080,
    "admin": 9901,
    "auth": 50051,
    "auth_check": 50055,
    "ingest": 50052,
    "search": 50053,
    "mcp": devsearch.MCP_PORT,
}

# How long each component may take to become healthy. Generous because CI machines are shared:
# a service's first start imports tree-sitter grammars and opens its pool.
READY_TIMEOUT = 120.0

# The demo key goes to DEMO_USER_ID (services/cli/keys.py), the user deploy/supabase/seed.sql makes.
DEMO_KEY_NAME = "kotadb dev demo"
# A read route that answers for any valid read key: the calling key's own usage (GetUsage).
DEMO_PATH = "/v1/usage"


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
    # The MCP server's Streamable HTTP listener, behind the gateway's /mcp.
    mcp: int = 0
    # Search replicas after the first (`--search-replicas N`): search-2 … search-N.
    search_replicas: tuple[int, ...] = ()

    def services(self) -> dict[str, int]:
        """services maps each service child (search replicas included) to its gRPC port."""
        named = {name: getattr(self, name) for name in SERVICES}
        return named | {f"search-{i}": port for i, port in enumerate(self.search_replicas, start=2)}


def choose_ports(gateway_port: int, admin_port: int | None, search_replicas: int = 1) -> Ports:
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
            gateway=free_port(),
            admin=admin_port or free_port(),
            auth=0,
            ingest=0,
            search=0,
            auth_check=0,
            search_replicas=(0,) * (search_replicas - 1),
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
    # Replicas after the first bind port 0 and report it, as with `--gateway-port 0`.
    extra = (0,) * (search_replicas - 1)
    return Ports(**{name: port or free_port() for name, port in wanted.items()}, search_replicas=extra)


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


def ingest_secret_keys(data_dir: Path) -> str:
    """ingest_secret_keys is the stack's KOTADB_INGEST_SECRET_KEYS, made once per data dir.

    The ingest service encrypts webhook secrets and access tokens with it (AES-GCM,
    services/ingest/secretbox.py); it lives in `<data-dir>/ingest-secret.keys`, mode 0600, next to
    the database whose rows it decrypts, so a restarted stack still reads its repositories.
    """
    path = data_dir / "ingest-secret.keys"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    created = generate_key_spec("dev1")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(created + "\n")
    return created


def _stack_identity_key(data_dir: Path) -> str:
    """_stack_identity_key is KOTADB_IDENTITY_KEY when set, else the data dir's own key."""
    return os.environ.get("KOTADB_IDENTITY_KEY") or identity_key(data_dir)


def _child_env(database_url: str, data_dir: Path, free_ports: bool) -> dict[str, str]:
    """_child_env is the environment every service process gets."""
    env = dict(os.environ)
    env["KOTADB_DATABASE_URL"] = database_url
    env["KOTADB_IDENTITY_KEY"] = _stack_identity_key(data_dir)
    env.setdefault("KOTADB_SEARCH_DATA_DIR", str(private_dir(data_dir / "search")))
    if not env.get("KOTADB_INGEST_SECRET_KEYS"):
        env["KOTADB_INGEST_SECRET_KEYS"] = ingest_secret_keys(data_dir)
    # Dev only: the demo repository is this checkout, a file:// URL the production policy refuses.
    env["KOTADB_INGEST_ALLOW_LOCAL_URLS"] = "true"
    if not os.environ.get("KOTADB_DATABASE_URL"):
        # The embedded cluster is a direct connection: job wake-ups and WatchJob LISTEN there (a
        # given URL may be a pooler that cannot, so it is left to KOTADB_INGEST_LISTEN_DATABASE_URL).
        env.setdefault("KOTADB_INGEST_LISTEN_DATABASE_URL", database_url)
        env.setdefault("KOTADB_SEARCH_LISTEN_URL", database_url)  # the search tailer's wake-ups too
    if free_ports:
        # Every component on a free port means the metrics listeners too.
        metrics_on_free_ports(env, keep=True)
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


@dataclass
class _Running:
    """_Running is what run_stack started, for stack.json and for rewriting it after restarts."""

    data_dir: Path
    ports: Ports
    database_url: str
    database: EmbeddedDatabase | None
    services: dict[str, ServiceProcess]
    envoy: ChildProcess
    mcp: ChildProcess
    demo_key: str
    demo_key_id: str
    started_at: str = dataclasses.field(default_factory=StackInfo.now)

    def info(self) -> StackInfo:
        """info is the current stack.json: pids and metrics ports change when parts restart."""
        admin_url = f"http://127.0.0.1:{self.ports.admin}"
        children = {name: service.child for name, service in self.services.items()}
        children["mcp"] = self.mcp
        children["envoy"] = self.envoy
        pids: dict[str, int | None] = {"postgres": self.database.pid if self.database else None}
        log_files = {name: str(child.log_path) for name, child in children.items()}
        if self.database is not None:
            log_files["postgres"] = str(self.database.log_path)
        return StackInfo(
            gateway=f"http://127.0.0.1:{self.ports.gateway}",
            grpc={name: f"127.0.0.1:{port}" for name, port in self.ports.services().items()},
            mcp=f"127.0.0.1:{self.ports.mcp}",
            auth_check=f"127.0.0.1:{self.ports.auth_check}",
            database_url=self.database_url,
            envoy_admin=admin_url,
            pid=os.getpid(),
            started_at=self.started_at,
            data_dir=str(self.data_dir),
            logs=str(self.data_dir / "logs"),
            pids=pids | {name: child.pid for name, child in children.items()},
            demo_api_key=self.demo_key,
            demo_api_key_id=self.demo_key_id,
            demo_user_id=str(DEMO_USER_ID),
            metrics=metrics_urls({n: s.port_file for n, s in self.services.items()}, admin_url),
            log_files=log_files,
        )


def run_stack(data_dir: Path, gateway_port: int, admin_port: int | None, search_replicas: int = 1) -> int:
    """run_stack starts the stack, keeps it running (restarting parts that die) until stopped."""
    data_dir = private_dir(data_dir.expanduser().absolute())
    stack_path = data_dir / STACK_FILE
    logs = private_dir(data_dir / "logs")

    def log(message: str) -> None:
        print(f"kotadb dev: {message}", flush=True)

    supervisor = Supervisor(log=log)
    supervisor.handle_signals()
    code = 0
    owns_stack_file = False
    try:
        _refuse_running_stack(stack_path)
        ports = choose_ports(gateway_port, admin_port, search_replicas)
        database_url, database = _start_database(data_dir, supervisor, log)
        _migrate(database_url, log)
        try:
            demo_key, demo_key_id = issue_demo_key(database_url)
        except Exception as exc:  # settings, database or key-rule errors, all fatal here
            raise StackError(f"could not issue the demo API key: {exc}") from exc
        log(f"issued demo API key {demo_key_id} (read, write) to user {DEMO_USER_ID}")

        env = _child_env(database_url, data_dir, free_ports=gateway_port == 0)
        ports, services = _start_services(data_dir, ports, env, supervisor, log)
        mcp, mcp_port = devsearch.start_mcp(
            supervisor,
            port=ports.mcp,
            run_dir=data_dir / "run",
            log_path=logs / "mcp.log",
            env=env,
            ingest=f"127.0.0.1:{ports.ingest}",
            search=f"127.0.0.1:{ports.search}",
            timeout=READY_TIMEOUT,
        )
        ports = dataclasses.replace(ports, mcp=mcp_port)
        log(f"mcp is serving on 127.0.0.1:{mcp_port} (pid {mcp.pid}), behind the gateway's /mcp")
        envoy = _start_envoy(data_dir, ports, supervisor, logs)
        log(f"started envoy (pid {envoy.pid})")
        admin_url = f"http://127.0.0.1:{ports.admin}"
        gateway_url = f"http://127.0.0.1:{ports.gateway}"
        for what, url in (("envoy", f"{admin_url}/ready"), ("gateway /health", f"{gateway_url}/health")):
            wait_until(what, functools.partial(probe_http, url), supervisor, READY_TIMEOUT, envoy)
        supervisor.watch(envoy)

        running = _Running(
            data_dir, ports, database_url, database, services, envoy, mcp, demo_key, demo_key_id
        )
        saved = running.info()
        # Registered before stack.json exists: whoever waits for the file finds the repository there.
        demo = devrepo.register_logged(saved, log)
        saved.save(stack_path)
        owns_stack_file = True
        _print_endpoints(saved, stack_path, demo)
        while True:
            # Parts that die are restarted here (backoff, bounded attempts); their peers
            # reconnect to the same addresses by themselves. stack.json follows new pids (and
            # metrics listeners that report their port late).
            supervisor.check()
            current = running.info()
            if current != saved:
                current.save(stack_path)
                saved = current
            time.sleep(POLL_INTERVAL)
    except StopRequested as stop:
        log(f"{stop} received, stopping")
    except ChildExited as exc:
        log(f"{exc}; stopping the stack. Its log: {exc.child.log_path}. Last lines:\n{exc.child.log_tail()}")
        code = 1
    except GaveUp as exc:
        log(f"error: {exc}; stopping the stack")
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
) -> tuple[str, EmbeddedDatabase | None]:
    """_start_database returns the database URL, starting the embedded cluster unless one is given.

    The embedded cluster is watched: when its postmaster dies, the supervisor restarts it on
    the same port.
    """
    external = os.environ.get("KOTADB_DATABASE_URL")
    if external:
        log("using KOTADB_DATABASE_URL")
        ok, detail = probe_postgres(external)
        if not ok:
            raise StackError(f"KOTADB_DATABASE_URL is not reachable: {detail}")
        return external, None
    database = EmbeddedDatabase(data_dir / "postgres")
    verb = "reusing" if database.reused else "creating"
    log(f"{verb} the embedded Postgres cluster in {database.directory}")
    # Registered before start, so a stop signal that lands mid-start still stops the cluster.
    supervisor.on_stop("postgres", database.stop)
    try:
        dsn = database.start()
    except Exception as exc:  # pgembed raises EmbeddedPostgresError and OSError variants
        raise StackError(f"could not start Postgres: {exc}") from exc
    supervisor.watch(database)
    log(f"postgres is up (pid {database.pid}): {dsn}")
    return dsn, database


def _start_services(
    data_dir: Path, ports: Ports, env: dict[str, str], supervisor: Supervisor, log: Callable[[str], None]
) -> tuple[Ports, dict[str, ServiceProcess]]:
    """_start_services runs `kotadb serve` for each service and waits until all are SERVING.

    Each service writes the port it bound to a file (`--port-file`), which is how port 0 turns
    into a real port; the returned Ports carry those, and each process is pinned to them so a
    restart comes back where its peers look for it.
    """
    logs = data_dir / "logs"
    run = private_dir(data_dir / "run")
    services: dict[str, ServiceProcess] = {}
    identity = env["KOTADB_IDENTITY_KEY"]
    for name, port in ports.services().items():
        kind = "search" if name.startswith("search") else name
        child_env = dict(env)
        if name == "auth":
            child_env["KOTADB_AUTH_CHECK_PORT"] = str(ports.auth_check)
        if kind == "search":
            child_env = devsearch.replica_env(child_env, name, identity)
        services[name] = spawn_service(
            supervisor,
            name,
            kind,
            port_file=run / f"{name}.port",
            log_path=logs / f"{name}.log",
            env=child_env,
            port=port,
        )
        log(f"started {name} (pid {services[name].child.pid})")
        if name == "auth" and "KOTADB_AUTH_ADDRESS" not in os.environ:
            # Ingest and search check API keys presented to them directly through auth, so they
            # start once auth's port is known.
            _wait_port(services[name], supervisor)
            env["KOTADB_AUTH_ADDRESS"] = services[name].address
    bound: dict[str, int] = {}
    for name, service in services.items():
        _wait_port(service, supervisor)
        address = service.address
        probe = functools.partial(probe_grpc_health, address)
        wait_until(name, probe, supervisor, READY_TIMEOUT, service.child)
        service.pin_ports()
        # Restarted from now on: a service that fails to start at all is an error right away.
        supervisor.watch(service.child)
        bound[name] = int(address.rsplit(":", 1)[1])
        log(f"{name} is SERVING on {address}")
    bound["auth_check"] = int(services["auth"].check_address.rsplit(":", 1)[1])
    extra = tuple(bound.pop(name) for name in list(bound) if name.startswith("search-"))
    return dataclasses.replace(ports, **bound, search_replicas=extra), services


def _wait_port(service: ServiceProcess, supervisor: Supervisor) -> None:
    """_wait_port waits until a service has written its bound port."""
    probe = port_file_probe(service.port_file)
    wait_until(f"{service.name} port file", probe, supervisor, READY_TIMEOUT, service.child)


def _start_envoy(data_dir: Path, ports: Ports, supervisor: Supervisor, logs: Path) -> ChildProcess:
    """_start_envoy renders the gateway config into the data dir (0600) and starts Envoy on it."""
    config = gateway.GatewayConfig(
        gateway_port=ports.gateway,
        admin_port=ports.admin,
        auth=f"127.0.0.1:{ports.auth}",
        auth_check=f"127.0.0.1:{ports.auth_check}",
        # The same key the services get (_child_env), so auth accepts Envoy's access log.
        access_log_token=access_log_token(_stack_identity_key(data_dir)),
        ingest=f"127.0.0.1:{ports.ingest}",
        search=devsearch.search_addresses(ports.services()),
        mcp=f"127.0.0.1:{ports.mcp}",
    )
    try:
        envoy_bin = gateway.find_envoy()
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from None
    return start_envoy(
        supervisor,
        "envoy",
        envoy_bin=envoy_bin,
        config_text=gateway.render(config),
        config_path=private_dir(data_dir / "envoy") / "envoy.yaml",
        log_path=logs / "envoy.log",
    )


def _print_endpoints(stack: StackInfo, stack_path: Path, demo: devrepo.DemoRepository | None = None) -> None:
    """_print_endpoints tells the person at the terminal where everything is."""
    lines = [
        "stack is up:",
        f"  gateway      {stack.gateway}   (REST and gRPC; GET /health needs no key)",
        f"  mcp          {stack.gateway}/mcp   (Streamable HTTP; the MCP server itself on {stack.mcp})",
        *(f"  {name:<12} {address}" for name, address in stack.grpc.items()),
        f"  postgres     {redact(stack.database_url)}",
        f"  envoy admin  {stack.envoy_admin}",
        *(f"  metrics      {name} {url}" for name, url in stack.metrics.items()),
        f"  logs         {stack.logs}",
        f"  stack.json   {stack_path}",
        f"  demo key     {stack.demo_api_key}   (read, write; shown once, also in stack.json)",
        "try it:",
        f"  {demo_curl(stack)}",
        *devrepo.examples(stack, demo),
        devsearch.search_example(devrepo.data_dir_flag(stack)),
        "Ctrl-C stops everything.",
    ]
    print("kotadb dev: " + "\n".join(lines), flush=True)


def demo_curl(stack: StackInfo | dict[str, Any]) -> str:
    """demo_curl is a curl command that calls the gateway with the demo key (its own usage)."""
    document = stack.to_json() if isinstance(stack, StackInfo) else stack
    return f'curl -H "Authorization: Bearer {document["demo_api_key"]}" {document["gateway"]}{DEMO_PATH}'


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
    replicas_help = "search replicas behind the gateway's ring hash on the tenant (default 1)"
    parser.add_argument("--search-replicas", type=int, default=1, metavar="N", help=replicas_help)
    parser.set_defaults(func=_dev_command)


def _dev_command(args: argparse.Namespace) -> int:
    """_dev_command implements `kotadb dev`."""
    data_dir = args.data_dir or status.default_data_dir()
    return run_stack(data_dir, args.gateway_port, args.admin_port, args.search_replicas)
