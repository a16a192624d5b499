"""The world `kotadb bench auth` measures: Postgres, auth, search and Envoy processes, and keys.

`running_stack` builds it in a temporary directory and tears it down, with the spawning, port-file
and health-wait code of services/common/stack.py (the same `kotadb dev` and the tests use): an
embedded PostgreSQL (services/common/pgembed.py) with the bootstrap and every migration, two `kotadb
serve auth` processes, one `kotadb serve search` (the cheap upstream; it also stands in for ingest
so the gateway's /health is green), two Envoys rendered from the real gateway template (ext_authz on
and off), and a third auth process behind its own Envoy for the crash step. Keys are issued with the
auth service's own rules (services/auth/management.py) as the service role.

Every auth process has two ports: the grpc.aio one (all three services, Check included) and the
lean Check listener (services/common/h2unary.py) that Envoy's ext_authz calls. Started with
`--port 0`, a process picks a free Check port too and writes it to `<port file>.check`; the
Envoys are rendered with `auth_check=` those addresses. The crash rig's replacement process gets
its predecessor's Check port through KOTADB_AUTH_CHECK_PORT so its Envoy's config still matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from services.auth.config import AuthSettings
from services.auth.management import KeyManager, KeySpec
from services.auth.store import AuthStore
from services.bench.instantcheck import BENCH_METHOD, TOKEN_VARIABLE
from services.cli import gateway
from services.common import db, migrate, stack
from services.common.identity import IDENTITY_HEADER, READ, WRITE, Identity, IdentityCodec, access_log_token
from services.common.pgembed import EmbeddedPostgres, free_port
from services.common.settings import env_settings
from services.common.supervisor import ChildProcess, Supervisor

READY_LIMIT = 180.0
# The highest limits the service role may give a key (management.HARD_MAX_*): "unlimited" here.
UNLIMITED_RATE = 10_000_000
UNLIMITED_QUOTA = 10**15
# Where a `kotadb serve auth` process puts its lean Check listener (services/auth/config.py).
CHECK_PORT_VARIABLE = "KOTADB_AUTH_CHECK_PORT"

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Stack:
    """Stack is the running world the benchmark measures."""

    database_url: str
    auth: tuple[str, ...]
    check: tuple[str, ...]
    envoy_on: str
    envoy_off: str
    # ext_authz on, pointed at a Check server that allows at once (services/bench/instantcheck.py).
    envoy_instant: str
    read_key: str
    read_key_id: uuid.UUID
    envoy_key: str
    envoy_key_id: uuid.UUID
    crash: CrashRig
    auth_pid: int
    postgres_pid: int | None


@dataclasses.dataclass(frozen=True)
class CrashRig:
    """CrashRig is an auth process of its own behind its own Envoy, there to be killed (step 6).

    `kill_and_restart` SIGKILLs the process, starts a new one on the same port and returns the
    seconds until it was SERVING again (on both its ports).
    """

    envoy: str
    key: str
    key_id: uuid.UUID
    kill_and_restart: Callable[[], float]
    auth: str
    check: str


def _wait(what: str, probe: Callable[[], tuple[bool, str]], children: Sequence[ChildProcess]) -> None:
    """_wait is stack.wait_until with the benchmark's limit, watching only `children`."""
    try:
        stack.wait_until(what, probe, children, READY_LIMIT)
    except stack.StackError as exc:
        raise RuntimeError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Spawned:
    """Spawned is a started service process: its gRPC address and, for auth, its Check listener's."""

    address: str
    check: str
    child: ChildProcess


def _spawn_service(
    supervisor: Supervisor, name: str, service: str, workdir: Path, env: dict[str, str], port: int = 0
) -> Spawned:
    started = stack.spawn_service(
        supervisor,
        name,
        service,
        port_file=workdir / f"{name}.port",
        log_path=workdir / f"{name}.log",
        env=env,
        port=port,
    )
    child = started.child
    _wait(f"{name} port", stack.port_file_probe(started.port_file), [child])
    address = started.address
    _wait(name, functools.partial(stack.probe_grpc_health, address), [child])
    check = ""
    if service == "auth":
        # Written before the main port file, so it is there by now.
        check = started.check_address
        if not check:
            raise RuntimeError(f"{name} wrote no Check listener port:\n{child.log_tail()}")
        _wait(f"{name} Check listener", functools.partial(stack.probe_grpc_health, check), [child])
    return Spawned(address, check, child)


def _spawn_instant_check(supervisor: Supervisor, workdir: Path, env: dict[str, str]) -> str:
    """_spawn_instant_check starts the allow-everything Check server; returns its address."""
    port_file = workdir / "instant-check.port"
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "services.bench.instantcheck", "--port-file", str(port_file)]
    child = supervisor.spawn("instant-check", argv, log_path=workdir / "instant-check.log", env=env)
    _wait("instant-check port", stack.port_file_probe(port_file), [child])
    address = f"127.0.0.1:{stack.read_port(port_file)}"
    _wait("instant-check", functools.partial(stack.probe_grpc_health, address), [child])
    return address


def _with_static_identity(config: str, token: str) -> str:
    """_with_static_identity makes the virtual host add a fixed signed identity to every request.

    The ext_authz-off Envoy uses it, so the search service receives the same valid identity
    (and does the same work) on both sides of the comparison; only ext_authz differs.
    """
    anchor = '              domains: ["*"]\n'
    if anchor not in config:
        raise RuntimeError("the gateway template has no virtual host to add the identity to")
    addition = (
        "              request_headers_to_add:\n"
        f"              - header: {{ key: {IDENTITY_HEADER}, value: {json.dumps(token)} }}\n"
        "                append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
    )
    return config.replace(anchor, anchor + addition, 1)


def _spawn_envoy(
    supervisor: Supervisor,
    name: str,
    workdir: Path,
    addresses: dict[str, str],
    *,
    ext_authz: bool,
    identity_key: str,
    static_identity: str = "",
) -> str:
    port, admin = free_port(), free_port()
    config = gateway.GatewayConfig(
        gateway_port=port,
        admin_port=admin,
        auth=addresses["auth"],
        auth_check=addresses["auth_check"],
        ingest=addresses["ingest"],
        search=addresses["search"],
        ext_authz=ext_authz,
        # Auth meters only an access-log stream carrying the token derived from the identity key.
        access_log_token=access_log_token(identity_key),
    )
    rendered = gateway.render(config)
    child = stack.start_envoy(
        supervisor,
        name,
        envoy_bin=gateway.find_envoy(),
        config_text=_with_static_identity(rendered, static_identity) if static_identity else rendered,
        config_path=workdir / f"{name}.yaml",
        log_path=workdir / f"{name}.log",
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"{name} admin", functools.partial(stack.probe_http, f"http://127.0.0.1:{admin}/ready"), [child])
    _wait(f"{name} /health", functools.partial(stack.probe_http, f"{url}/health"), [child])
    return f"127.0.0.1:{port}"


async def _create_keys(database_url: str, limit: int) -> tuple[dict[str, tuple[str, uuid.UUID]], uuid.UUID]:
    """_create_keys issues the benchmark's keys to a fresh user, with the service role's rules.

    It returns the keys by name (secret, id) and the user's id.
    """
    pool = await db.create_pool(database_url, min_size=1, max_size=2, statement_cache_size=0)
    try:
        manager = KeyManager(AuthStore(pool), env_settings(AuthSettings))
        user_id = uuid.uuid4()
        await manager.ensure_user(user_id)
        specs = {
            "read": KeySpec("bench read", frozenset({READ}), UNLIMITED_RATE, UNLIMITED_QUOTA),
            "envoy": KeySpec("bench envoy", frozenset({READ, WRITE}), UNLIMITED_RATE, UNLIMITED_QUOTA),
            "rate": KeySpec("bench rate limit", frozenset({READ}), limit, UNLIMITED_QUOTA),
            "quota": KeySpec("bench quota", frozenset({READ}), UNLIMITED_RATE, limit),
            "crash": KeySpec("bench crash", frozenset({READ}), UNLIMITED_RATE, UNLIMITED_QUOTA),
            # Named by the instant Check's answers, so their usage rows land on a key of their own.
            "instant": KeySpec("bench instant", frozenset({READ, WRITE}), UNLIMITED_RATE, UNLIMITED_QUOTA),
        }
        keys: dict[str, tuple[str, uuid.UUID]] = {}
        for name, spec in specs.items():
            issued = await manager.create(Identity.service(), spec, user_id=user_id)
            keys[name] = (issued.secret, issued.record.id)
        return keys, user_id
    finally:
        await pool.close()


@contextlib.contextmanager
def running_stack(
    echo: Echo, *, burst_limit: int, log_level: str, work_dir: Path | None
) -> Iterator[tuple[Stack, dict[str, tuple[str, uuid.UUID]]]]:
    """running_stack starts Postgres, two auth processes, search and two Envoys; stops them after.

    The temporary directory is removed afterwards, unless it was made under `work_dir`: then
    only the database goes and the logs stay.
    """
    workdir = Path(tempfile.mkdtemp(prefix="kotadb-bench-auth-", dir=work_dir))
    # The unprivileged user Postgres runs as (when we are root) must traverse into the cluster.
    workdir.chmod(0o711)
    cluster = EmbeddedPostgres(workdir / "postgres", durable=False)
    try:
        dsn = cluster.start()
        echo(f"postgres up in {workdir}")
        migrate.apply_bootstrap(dsn)
        migrate.apply_migrations(dsn)
        keys, user_id = asyncio.run(_create_keys(dsn, burst_limit))
        env = dict(os.environ, KOTADB_DATABASE_URL=dsn, PYTHONUNBUFFERED="1")
        # Each auth process picks a free Check port; a fixed one from our caller would collide.
        env.pop(CHECK_PORT_VARIABLE, None)
        stack.metrics_on_free_ports(env)  # likewise for their metrics listeners
        env["KOTADB_IDENTITY_KEY"] = secrets.token_hex(32)
        env["KOTADB_LOG_LEVEL"] = log_level
        env["KOTADB_SEARCH_DATA_DIR"] = str(workdir / "search")
        with Supervisor(grace=20) as supervisor:
            auth_a = _spawn_service(supervisor, "auth-a", "auth", workdir, env)
            auth_b = _spawn_service(supervisor, "auth-b", "auth", workdir, env)
            search = _spawn_service(supervisor, "search", "search", workdir, env).address
            # The ingest cluster must be healthy for Envoy's /health; a search process stands in.
            addresses = {
                "auth": auth_a.address,
                "auth_check": auth_a.check,
                "ingest": search,
                "search": search,
            }
            key = env["KOTADB_IDENTITY_KEY"]
            envoy_on = _spawn_envoy(
                supervisor, "envoy-authz-on", workdir, addresses, ext_authz=True, identity_key=key
            )
            # The off side gets the identity Check would have signed, from Envoy itself, so the
            # search service does the same work on both sides (verify it, answer the call).
            codec = IdentityCodec(key, ttl=6 * 3600)
            token = codec.sign(
                user_id=user_id,
                kind="api_key",
                permissions=frozenset({READ, WRITE}),
                key_id=keys["envoy"][1],
                method=BENCH_METHOD,
            )
            envoy_off = _spawn_envoy(
                supervisor,
                "envoy-authz-off",
                workdir,
                addresses,
                ext_authz=False,
                identity_key=key,
                static_identity=token,
            )
            # The instant Check answers as Check would for a key of its own: the same headers,
            # and its metered rows stay off the envoy key, whose rows step 5 compares.
            instant_token = codec.sign(
                user_id=user_id,
                kind="api_key",
                permissions=frozenset({READ, WRITE}),
                key_id=keys["instant"][1],
                method=BENCH_METHOD,
            )
            instant = _spawn_instant_check(supervisor, workdir, dict(env, **{TOKEN_VARIABLE: instant_token}))
            envoy_instant = _spawn_envoy(
                supervisor,
                "envoy-authz-instant",
                workdir,
                dict(addresses, auth_check=instant),
                ext_authz=True,
                identity_key=key,
            )
            echo(
                f"auth {auth_a.address} (Check {auth_a.check}) and {auth_b.address} (Check {auth_b.check}),"
                f" search {search}, envoy on {envoy_on} / off {envoy_off}"
            )
            auth_crash = _spawn_service(supervisor, "auth-crash", "auth", workdir, env)
            crash_addresses = dict(addresses, auth=auth_crash.address, auth_check=auth_crash.check)
            envoy_crash = _spawn_envoy(
                supervisor, "envoy-crash", workdir, crash_addresses, ext_authz=True, identity_key=key
            )
            children = {"auth-crash": auth_crash.child}
            # The replacement listens where the old process did, on both ports.
            crash_env = dict(env, **{CHECK_PORT_VARIABLE: auth_crash.check.rsplit(":", 1)[1]})

            def kill_and_restart() -> float:
                killed = time.monotonic()
                os.kill(children["auth-crash"].pid, signal.SIGKILL)
                children["auth-crash"].stop(grace=5)  # reaps it; the process is already gone
                port = int(auth_crash.address.rsplit(":", 1)[1])
                restarted = _spawn_service(supervisor, "auth-crash", "auth", workdir, crash_env, port=port)
                if restarted.check != auth_crash.check:
                    raise RuntimeError(
                        f"auth-crash came back on Check {restarted.check}, not {auth_crash.check}"
                    )
                children["auth-crash"] = restarted.child
                return time.monotonic() - killed

            crash = CrashRig(
                envoy_crash,
                keys["crash"][0],
                keys["crash"][1],
                kill_and_restart,
                auth=auth_crash.address,
                check=auth_crash.check,
            )
            yield (
                Stack(
                    database_url=dsn,
                    auth=(auth_a.address, auth_b.address),
                    check=(auth_a.check, auth_b.check),
                    envoy_on=envoy_on,
                    envoy_off=envoy_off,
                    envoy_instant=envoy_instant,
                    read_key=keys["read"][0],
                    read_key_id=keys["read"][1],
                    envoy_key=keys["envoy"][0],
                    envoy_key_id=keys["envoy"][1],
                    crash=crash,
                    auth_pid=auth_a.child.pid,
                    postgres_pid=cluster.postmaster_pid,
                ),
                keys,
            )
    finally:
        cluster.stop()
        if work_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            # Asked for a place: keep the processes' logs and configs there, not the database.
            shutil.rmtree(workdir / "postgres", ignore_errors=True)
            echo(f"logs kept in {workdir}")
