"""The server bootstrap every KotaDB service uses.

`ServiceServer` builds one grpc.aio server with the service's servicers, the standard gRPC health
service, the `kotadb.v1.HealthService` JSON health endpoint, server reflection and the interceptor
chain (services/common/interceptors.py). Its life:

* `start()` binds `host:port` (port 0 picks a free port) and returns the bound port. Health is
  NOT_SERVING for `""` and every service name until the readiness probes pass.
* A readiness task runs every `readiness_interval` seconds: it connects the asyncpg pool if it
  has none yet (so a process started before its database comes up does not crash), runs
  `select 1` on a pooled connection and on a new one, then the service's own probes. All
  passing → SERVING; any failing → NOT_SERVING, so health flips back when the database becomes
  unreachable. Every probe is bounded by `readiness_timeout`, and the service's probes are not
  run while the database probe fails, so a database that hangs rather than refuses turns health
  NOT_SERVING within `readiness_interval + readiness_timeout` (3.5 s by default) and back once it
  answers. The new connection is what notices a hung postmaster: pooled connections talk to their
  own backends, which keep answering while the postmaster accepts no one.
* Every service has a Prometheus metrics port (services/common/metrics.py), run as the side
  listener "metrics" on `metrics_host:metrics_port`; its port file is `<port file>.metrics`.
* `stop()` (or SIGTERM/SIGINT under `run`) sets health NOT_SERVING for good, stops accepting
  calls, lets in-flight calls finish within `shutdown_grace` seconds, then closes the pool.
* Lifecycle hooks let a service run background parts alongside the server without subclassing
  it: `on_start` hooks run in order at the beginning of `start()`, before the port is bound, so
  they are running when the first call arrives; `on_stop` hooks run in order inside `stop()`,
  after the gRPC server has drained and before the pool closes, so they still have a database
  (a usage writer flushes its queue there). Start hooks cannot wait for the database: the
  server starts without one by design, so they launch tasks that tolerate its absence.

Tests use the async API (`await server.start()`, `await server.stop()`); `kotadb serve` and
`python -m services.<name>` use the blocking `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kotadb.v1 import health_pb2 as kota_health_pb2
from kotadb.v1 import health_pb2_grpc as kota_health_pb2_grpc

from services.common import db, metrics
from services.common.errors import Unavailable
from services.common.interceptors import server_interceptors
from services.common.logs import configure_logging
from services.common.settings import CommonSettings, ServiceSettings

# Seconds past the grace period that stop() waits for grpc.aio's own stop before moving on.
_STOP_SLACK = 5.0

log = logging.getLogger("kotadb.server")

# A probe may return a short status line for a ready component (e.g. the ingest queue's depth).
ProbeRun = Callable[[], Awaitable[str | None]]
StartHook = Callable[[], Awaitable[None]]
# A stop hook receives the seconds it may take: the shutdown grace, at least one second.
StopHook = Callable[[float], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class ServiceBinding:
    """ServiceBinding is one gRPC service to register: its full name and how to add its servicer."""

    name: str
    register: Callable[[grpc.aio.Server], None]


def bind(
    file: FileDescriptor, service: str, add: Callable[[Any, Any], None], servicer: object
) -> ServiceBinding:
    """bind describes `servicer` for generated `add` (e.g. `add_AuthServiceServicer_to_server`)."""
    full_name = file.services_by_name[service].full_name
    return ServiceBinding(name=full_name, register=lambda server: add(servicer, server))


class ListenerServer(Protocol):
    """ListenerServer is a second, non-grpc.aio server a service runs next to its gRPC port."""

    async def start(self, host: str, port: int) -> int:
        """start binds `host:port` (0: a free port) and returns the bound port."""
        ...

    async def stop(self, grace: float) -> None:
        """stop refuses new calls and gives in-flight ones `grace` seconds."""
        ...


@dataclasses.dataclass(frozen=True)
class SideListener:
    """SideListener is a named extra port of a service (the auth service's lean Check port).

    Its bound port is written next to the main port file as `<port file>.<name>`.
    """

    name: str
    server: ListenerServer
    port: int
    # Address to bind; empty: the service's own `host`.
    host: str = ""


@dataclasses.dataclass(frozen=True)
class Probe:
    """Probe is one named readiness check; `run` raises (any exception) when the part is not ready.

    A probe that is not `critical` is reported (GetHealth shows it NOT_SERVING with its reason)
    but leaves the process serving: its failure is news for people and the gateway's /health,
    not a reason for Envoy to stop routing to the process (e.g. search's change-feed lag).
    """

    name: str
    run: ProbeRun
    critical: bool = True


@dataclasses.dataclass(frozen=True)
class ComponentHealth:
    """ComponentHealth is the last outcome of one probe: ready or not, and why not."""

    name: str
    ready: bool
    message: str = ""


class LazyPool:
    """LazyPool holds the service's asyncpg pool once the database has been reached.

    Servicers and stores keep the LazyPool and call `get()` per request: before the first
    successful connection (or after `close`) it raises `Unavailable`, which callers see as a
    retryable UNAVAILABLE rather than a crash at start-up.
    """

    def __init__(self, settings: CommonSettings, *, service: str | None = None) -> None:
        self.settings = settings
        # Labels the pool's metrics; ServiceSettings subclasses name their service.
        self.service = service or str(getattr(settings, "service_name", "kotadb"))
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def get(self) -> asyncpg.Pool:
        """get returns the pool, or raises Unavailable while the database has not been reached."""
        if self._pool is None:
            raise Unavailable(
                "the database is not reachable yet", reason="DATABASE_UNAVAILABLE", retry_after=1.0
            )
        return self._pool

    @property
    def connected(self) -> bool:
        """connected tells whether a pool exists."""
        return self._pool is not None

    def connections(self, state: str) -> float:
        """connections counts the pool's connections in `state` (open, in_use, idle, max), 0 if none."""
        pool = self._pool
        if pool is None:
            return 0.0
        if state == "max":
            return float(pool.get_max_size())
        idle = pool.get_idle_size()
        if state == "idle":
            return float(idle)
        size = pool.get_size()
        return float(size if state == "open" else size - idle)

    async def connect(self) -> asyncpg.Pool:
        """connect creates the pool on first use; later calls return the same pool."""
        async with self._lock:
            if self._closed:
                raise Unavailable("the service is shutting down", reason="SHUTTING_DOWN")
            if self._pool is not None:
                return self._pool
            try:
                created: asyncpg.Pool = await asyncio.wait_for(
                    db.create_pool(self.settings, service=self.service),
                    timeout=self.settings.db_connect_timeout * 2,
                )
            except TimeoutError:
                db.DB_TIMEOUTS.labels(service=self.service, kind="connect").inc()
                raise
            self._pool = created
            return created

    async def close(self, wait: float) -> None:
        """close waits up to `wait` seconds for connections to be released, then terminates them."""
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=wait)
        except TimeoutError:
            pool.terminate()


class KotaHealthServicer(kota_health_pb2_grpc.HealthServiceServicer):
    """KotaHealthServicer answers `kotadb.v1.HealthService.GetHealth` from this process's probes."""

    def __init__(self, server: ServiceServer) -> None:
        self._server = server

    async def GetHealth(
        self, request: kota_health_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kota_health_pb2.GetHealthResponse:
        """GetHealth reports the overall status and the last outcome of every probe."""
        response_type = kota_health_pb2.GetHealthResponse
        serving, not_serving = response_type.SERVING, response_type.NOT_SERVING
        components = [
            response_type.Component(
                name=part.name, status=serving if part.ready else not_serving, message=part.message
            )
            for part in self._server.components
        ]
        return response_type(
            status=serving if self._server.serving else not_serving,
            components=components,
            service=self._server.name,
            version=_version(),
        )


class ServiceServer:
    """ServiceServer runs one KotaDB gRPC service: servicers, health, reflection, readiness, shutdown.

    `pool` is the LazyPool the service's stores were built with (the server connects and closes
    it); `probes` are the service's readiness checks, run after the built-in database probe;
    `identity` fills the interceptor chain's identity slot (see services/common/interceptors.py);
    `on_start` and `on_stop` are the lifecycle hooks described in this module's docstring. A
    start hook that raises fails `start()`; a stop hook that raises is logged and the remaining
    hooks still run, so the pool is always closed.
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        pool: LazyPool,
        bindings: Sequence[ServiceBinding],
        probes: Sequence[Probe] = (),
        identity: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
        on_start: Sequence[StartHook] = (),
        on_stop: Sequence[StopHook] = (),
        listeners: Sequence[SideListener] = (),
    ) -> None:
        self.name = name
        self.metrics = metrics.MetricsListener()
        self._listeners = [
            *listeners,
            SideListener("metrics", self.metrics, settings.metrics_port, host=settings.metrics_host),
        ]
        self.settings = settings
        self.pool = pool
        self._bindings = list(bindings)
        self._probes = [Probe("database", self._probe_database), *probes]
        self._identity = list(identity)
        self._on_start = list(on_start)
        self._on_stop = list(on_stop)
        self._health = health_async.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._checked = asyncio.Event()
        self._stopping = False
        self.port: int | None = None
        self.serving = False
        self.components: list[ComponentHealth] = [
            ComponentHealth(p.name, False, "not checked yet") for p in self._probes
        ]
        # Read at scrape time, on this loop: the pool of the server built last for this name wins.
        for state in metrics.POOL_STATES:
            metrics.POOL_CONNECTIONS.labels(service=name, state=state).set_function(
                functools.partial(pool.connections, state)
            )
        metrics.READY.labels(service=name).set(0)

    @property
    def service_names(self) -> list[str]:
        """service_names lists the full names of every gRPC service this server exposes."""
        own = [b.name for b in self._bindings]
        health_name = kota_health_pb2.DESCRIPTOR.services_by_name["HealthService"].full_name
        return [*own, health_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    async def start(self, *, port_file: Path | None = None) -> int:
        """start runs the start hooks, then binds and starts the server with health NOT_SERVING.

        It returns the bound port.

        `port_file`, when given, receives the bound port before the "listening" log line, so a
        supervisor that started the process with port 0 can find it.
        """
        if self._server is not None:
            raise RuntimeError(f"{self.name} server already started")
        for hook in self._on_start:
            await hook()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=server_interceptors(self._identity, service=self.name),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Without this, two servers could share a port by accident (SO_REUSEPORT).
                ("grpc.so_reuseport", 0),
            ],
        )
        for binding in self._bindings:
            binding.register(server)
        kota_health_pb2_grpc.add_HealthServiceServicer_to_server(KotaHealthServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = self.service_names
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if not self.port:
            raise OSError(f"{self.name}: could not bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        for listener in self._listeners:
            host = listener.host or self.settings.host
            try:
                bound = await listener.server.start(host, listener.port)
            except OSError as exc:
                where = f"{host}:{listener.port}"
                raise OSError(
                    f"{self.name}: could not bind its {listener.name} listener on {where}: {exc}"
                ) from exc
            if port_file is not None:
                write_port_file(listener_port_file(port_file, listener.name), bound)
            log.info(
                "side listener bound",
                extra={"fields": {"service": self.name, "listener": listener.name, "port": bound}},
            )
        self._readiness = asyncio.create_task(self._readiness_loop(), name=f"{self.name}-readiness")
        if port_file is not None:
            write_port_file(port_file, self.port)
        log.info(
            "listening",
            extra={"fields": {"service": self.name, "host": self.settings.host, "port": self.port}},
        )
        return self.port

    async def wait_checked(self) -> None:
        """wait_checked returns once the first readiness round has finished (whatever its outcome)."""
        await self._checked.wait()

    async def stop(self, grace: float | None = None) -> None:
        """stop drains the server: health NOT_SERVING, no new calls, in-flight calls get `grace` seconds."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace if grace is None else grace
        started = time.monotonic()
        log.info("stopping", extra={"fields": {"service": self.name, "grace_s": grace}})
        self.serving = False
        metrics.READY.labels(service=self.name).set(0)
        await self._health.enter_graceful_shutdown()
        if self._readiness is not None:
            self._readiness.cancel()
            await self._bounded(self._readiness, _STOP_SLACK, "readiness task")
        for listener in self._listeners:
            try:
                await self._bounded(
                    listener.server.stop(grace), grace + _STOP_SLACK, f"{listener.name} listener"
                )
            except Exception:
                log.exception("listener stop failed", extra={"fields": {"listener": listener.name}})
        if self._server is not None:
            # grpc.aio's stop has been seen to never return (about 1 in 20 test runs with several
            # servers in one event loop); a SIGTERM must still end the process, so bound it.
            # asyncio.wait, not wait_for: a stuck stop may not honour cancellation either.
            stopping = asyncio.ensure_future(self._server.stop(grace))
            done, _ = await asyncio.wait({stopping}, timeout=grace + _STOP_SLACK)
            if not done:
                log.error(
                    "gRPC server did not stop in time",
                    extra={"fields": {"service": self.name, "waited_s": grace + _STOP_SLACK}},
                )
        for hook in self._on_stop:
            budget = max(1.0, grace)
            try:
                await self._bounded(hook(budget), budget + _STOP_SLACK, "stop hook")
            except Exception:
                log.exception("stop hook failed", extra={"fields": {"service": self.name}})
        await self.pool.close(wait=max(1.0, grace))
        log.info(
            "stopped",
            extra={
                "fields": {"service": self.name, "duration_ms": round((time.monotonic() - started) * 1000)}
            },
        )

    async def _bounded(self, work: Awaitable[Any], seconds: float, what: str) -> None:
        """_bounded waits at most `seconds` for one step of stop(), so no step can hang a shutdown.

        asyncio.wait rather than wait_for: a stuck step may not honour cancellation either. A step
        that raised has its exception re-raised; one that ran out of time is logged and left.
        """
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            task.cancel()
            log.error(
                f"{what} did not stop in time", extra={"fields": {"service": self.name, "waited_s": seconds}}
            )
            return
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def __aenter__(self) -> ServiceServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def check_ready(self) -> bool:
        """check_ready runs every probe once, updates health, and tells whether all passed.

        Each probe gets `readiness_timeout` seconds. The first probe is the database's; while it
        fails the others are reported as not checked rather than run, so a hung database costs
        one timeout per round, not one per probe.
        """
        results: list[ComponentHealth] = []
        for probe in self._probes:
            if results and not results[0].ready:
                results.append(ComponentHealth(probe.name, False, "not checked: the database is not ready"))
                continue
            try:
                note = await asyncio.wait_for(probe.run(), timeout=self.settings.readiness_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                results.append(ComponentHealth(probe.name, False, _describe(exc)))
            else:
                results.append(ComponentHealth(probe.name, True, note or ""))
        for part in results:
            metrics.COMPONENT_READY.labels(service=self.name, component=part.name).set(int(part.ready))
        critical = {probe.name for probe in self._probes if probe.critical}
        ready = all(part.ready for part in results if part.name in critical)
        # A ready component's note (a queue depth) changes all the time; only failures are news.
        if ready != self.serving or _failures(results) != _failures(self.components):
            failing = {part.name: part.message for part in results if not part.ready}
            log.log(
                logging.INFO if ready else logging.WARNING,
                "ready" if ready else "not ready",
                extra={"fields": {"service": self.name, "failing": failing}},
            )
        self.components = results
        if not self._stopping:
            self.serving = ready
            metrics.READY.labels(service=self.name).set(int(ready))
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        return ready

    async def _readiness_loop(self) -> None:
        while True:
            try:
                await self.check_ready()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("readiness check failed unexpectedly")
            self._checked.set()
            await asyncio.sleep(self.settings.readiness_interval)

    async def _probe_database(self) -> None:
        pool = await self.pool.connect()
        await pool.fetchval("select 1")
        # A pooled connection keeps answering while the postmaster accepts no one (hung or out of
        # connection slots), and calls that need a new connection would then hang: open one too.
        try:
            fresh = await asyncpg.connect(
                self.settings.database_url,
                timeout=self.settings.db_connect_timeout,
                command_timeout=self.settings.db_statement_timeout,
                statement_cache_size=0,
                server_settings={"application_name": "kotadb-readiness"},
            )
        except TimeoutError:
            db.DB_TIMEOUTS.labels(service=self.pool.service, kind="connect").inc()
            raise
        try:
            await fresh.fetchval("select 1")
        finally:
            # close() says goodbye (no "unexpected EOF" in the server log) and aborts on timeout.
            with contextlib.suppress(Exception):
                await fresh.close(timeout=self.settings.db_connect_timeout)

    async def _set_health(self, status: Any) -> None:
        for name in ("", *self.service_names):
            await self._health.set(name, status)


def _failures(parts: Sequence[ComponentHealth]) -> list[tuple[str, str]]:
    return [(part.name, part.message) for part in parts if not part.ready]


def listener_port_file(port_file: Path, name: str) -> Path:
    """listener_port_file is where side listener `name` writes its port, next to `port_file`."""
    return port_file.with_name(f"{port_file.name}.{name}")


def write_port_file(path: Path, port: int) -> None:
    """write_port_file writes `port` to `path`, then renames, so a reader never sees half a number."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(f"{port}\n")
    partial.replace(path)


async def missing_tables(pool: LazyPool, tables: Sequence[str]) -> list[str]:
    """missing_tables lists which of `tables` (schema-qualified) do not exist in the database."""
    rows = await pool.get().fetchval(
        "select coalesce(array_agg(t order by t), '{}')"
        " from unnest($1::text[]) t where to_regclass(t) is null",
        list(tables),
    )
    return list(rows)


async def require_tables(pool: LazyPool, tables: Sequence[str]) -> None:
    """require_tables raises when any of `tables` is missing, naming them and the fix."""
    missing = await missing_tables(pool, tables)
    if missing:
        raise RuntimeError(f"missing tables {', '.join(missing)}; run `kotadb migrate`")


def _describe(exc: BaseException) -> str:
    """_describe is a one-line reason for a failed probe, without secrets from DSNs."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _version() -> str:
    try:
        return importlib.metadata.version("kotadb")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def run(server: ServiceServer, *, port_file: Path | None = None) -> int:
    """run serves until SIGTERM or SIGINT, then drains within the grace period; returns the exit code.

    `port_file`, when given, receives the bound port once the server listens, so a supervisor
    that started the process with port 0 can find it.
    """
    configure_logging(server.settings.log_level, service=server.name)
    return asyncio.run(_serve_until_signal(server, port_file))


async def _serve_until_signal(server: ServiceServer, port_file: Path | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start(port_file=port_file)
    except Exception:
        log.exception("could not start", extra={"fields": {"service": server.name}})
        return 1
    await stop.wait()
    log.info("signal received", extra={"fields": {"service": server.name}})
    await server.stop()
    return 0
