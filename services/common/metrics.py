"""Prometheus metrics shared by every KotaDB process: one registry, idempotent metric constructors.

Every metric lives in `REGISTRY` (not prometheus-client's global default registry, so tests that
build several servers in one process never collide with metrics registered by libraries). A metric
is declared once per process at module level, through `counter`, `gauge` or `histogram`; asking
again for the same name returns the metric already registered, so modules imported more than once
(or servers built several times in one test process) share it. Label every metric with `service`
where more than one service can record it.

Names follow Prometheus conventions: `kotadb_<area>_<what>_<unit>`, counters ending in `_total`.
`refused(service, reason)` is the one counter for requests a service turns away before doing any
work for them (oversize, connection cap, handshake timeout, admission): one name, so a dashboard
shows every kind of refusal side by side.

`MetricsListener` serves the registry at `GET /metrics` on the service's metrics port
(`KOTADB_<SERVICE>_METRICS_PORT`, loopback by default); `ServiceServer` runs it as the side
listener "metrics", so a supervisor finds the bound port in `<port file>.metrics`. The shared
runtime records: calls by method and code with their durations (`kotadb_rpc_*`, interceptors.py
for grpc.aio servers, h2unary.py for auth's Check listener),
readiness (`kotadb_ready`, `kotadb_component_ready`) and the database pool's connections and
timeouts (`kotadb_db_pool_connections`, `kotadb_db_timeouts_total`, server.py and db.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

REGISTRY = CollectorRegistry(auto_describe=True)

_lock = threading.Lock()
_metrics: dict[str, MetricWrapperBase] = {}

M = TypeVar("M", bound=MetricWrapperBase)

# Seconds: from 0.5 ms (a cached Check) to 30 s (a sync job step).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _get(kind: type[M], name: str, help: str, labels: Sequence[str], **extra: object) -> M:
    with _lock:
        existing = _metrics.get(name)
        if existing is not None:
            if not isinstance(existing, kind):
                raise TypeError(f"metric {name} is already registered as {type(existing).__name__}")
            return existing
        metric = kind(name, help, labelnames=tuple(labels), registry=REGISTRY, **extra)  # type: ignore[arg-type]
        _metrics[name] = metric
        return metric


def counter(name: str, help: str, labels: Sequence[str] = ()) -> Counter:
    """counter returns the process's Counter `name`, registering it on first use."""
    return _get(Counter, name, help, labels)


def gauge(name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
    """gauge returns the process's Gauge `name`, registering it on first use."""
    return _get(Gauge, name, help, labels)


def histogram(
    name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
) -> Histogram:
    """histogram returns the process's Histogram `name`, registering it on first use."""
    return _get(Histogram, name, help, labels, buckets=tuple(buckets))


REFUSALS = counter(
    "kotadb_refusals_total",
    "Requests or connections turned away before any work was done for them, by reason.",
    ("service", "reason"),
)


def refused(service: str, reason: str) -> None:
    """refused counts one refusal of `reason` (e.g. MESSAGE_TOO_LARGE, CONNECTION_LIMIT) by `service`."""
    REFUSALS.labels(service=service, reason=reason).inc()


# The metrics of the shared runtime, recorded by services/common/server.py and interceptors.py.
RPC_HANDLED = counter(
    "kotadb_rpc_handled_total",
    "gRPC calls finished by this service, by full method name and status code.",
    ("service", "method", "code"),
)
RPC_DURATION = histogram(
    "kotadb_rpc_duration_seconds",
    "Seconds from the start of a gRPC call to its last response or error, by method.",
    ("service", "method"),
)
READY = gauge(
    "kotadb_ready",
    "1 while the service reports SERVING (every readiness probe passed), else 0.",
    ("service",),
)
COMPONENT_READY = gauge(
    "kotadb_component_ready", "1 while readiness probe `component` passes, else 0.", ("service", "component")
)
POOL_CONNECTIONS = gauge(
    "kotadb_db_pool_connections",
    "Connections of the service's database pool: `open` (in use + idle), `in_use`, `idle`, `max`.",
    ("service", "state"),
)
POOL_STATES = ("open", "in_use", "idle", "max")


def observe_rpc(service: str, method: str, code: str, seconds: float) -> None:
    """observe_rpc records one finished call: its method, status code name and duration."""
    RPC_HANDLED.labels(service=service, method=method, code=code).inc()
    RPC_DURATION.labels(service=service, method=method).observe(seconds)


def expose() -> bytes:
    """expose renders every metric of `REGISTRY` in the Prometheus text format."""
    return generate_latest(REGISTRY)


# A scrape is one short request: these bound what a stranger reaching the port can make us hold.
_MAX_CONNECTIONS = 16
_HEAD_LIMIT = 8192
_READ_TIMEOUT = 5.0
_WRITE_TIMEOUT = 10.0


class MetricsListener:
    """MetricsListener serves `GET /metrics` (Prometheus text format) over HTTP/1.1 on its own port.

    It runs on the service's event loop, so gauges read at scrape time (pool sizes) see a
    consistent state without locks. Every connection carries one request and is closed; at most
    16 are open at once (more are closed unanswered), the request head is at most 8 KiB and must
    arrive within 5 s. It implements server.py's `ListenerServer`; `ServiceServer` starts it as
    the side listener "metrics".
    """

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.scrapes = 0

    async def start(self, host: str, port: int) -> int:
        """start binds `host:port` (0: a free port) and returns the bound port."""
        self._server = await asyncio.start_server(self._accept, host, port, limit=_HEAD_LIMIT)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self, grace: float) -> None:
        """stop closes the port and cancels requests still being answered (a scrape is retried)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.wait_for(self._server.wait_closed(), timeout=max(grace, 0.1))
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._handlers) >= _MAX_CONNECTIONS:
            writer.close()
            return
        self._handlers.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_READ_TIMEOUT)
            status, body, content_type = self._answer(head)
            response = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(response if head.startswith(b"HEAD ") else response + body)
            await asyncio.wait_for(writer.drain(), timeout=_WRITE_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the scraper went away, was too slow or sent a head too large: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", b"bad request\n", "text/plain; charset=utf-8"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/metrics":
            return "404 Not Found", b"metrics are at /metrics\n", "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain; charset=utf-8"
        self.scrapes += 1
        return "200 OK", expose(), CONTENT_TYPE_LATEST
