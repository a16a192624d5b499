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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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
