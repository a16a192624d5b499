"""servicerebuild is `kotadb bench service`'s rebuild part: the first answers, the rebuild from Postgres.

* `warm_up` sends every query once through the gateway and records how long the owner replica
  took to answer the first (its own build of the tenant from Postgres); a large tenant takes
  longer than a request's budget, and the 504s meanwhile are retried and counted.
* `rebuild_from_postgres` times the replica the ring did not give the tenant from its first
  query to its answer (the whole build from Postgres to serving), reads the phases the replica
  logs (tenants.py's "the index of tenant … serves" line) and relates the throughput to the
  offline build of the same files.
* `drop_copies` makes a rerun on a tenant pushed by an earlier run (`--tenant`) rebuild it.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.common.stack import StackInfo

# Seconds the warm-up waits for the tenant's first build through the gateway (Linux: minutes).
WARM_UP_LIMIT = 1800.0
# The fields of the search replica's "serves" log line that the report carries (tenants.py).
REBUILD_FIELDS = (
    "documents",
    "bytes",
    "symbols",
    "workers",
    "fetch_wait_s",
    "index_s",
    "write_s",
    "build_s",
    "open_s",
)


def warm_up(search: Callable[[str], object], queries: list[str]) -> dict[str, Any]:
    """warm_up sends every query once through the gateway; returns how long the first answer took.

    The tenant's replica builds it from Postgres on first use. A large tenant (Linux) takes longer
    than a request's budget (the search's own 10 s, Envoy's 30 s route timeout), which answers
    504 while the build goes on (tenants.py keeps it running): such answers are retried, and counted.
    """
    started = time.perf_counter()
    timeouts = 0
    first = 0.0
    for i, pattern in enumerate(queries):
        while True:
            try:
                search(pattern)
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 504 or time.perf_counter() - started > WARM_UP_LIMIT:
                    raise
                timeouts += 1
        if i == 0:
            first = time.perf_counter() - started
    return {"seconds": round(first, 2), "gateway_timeouts": timeouts}


def rebuild_from_postgres(
    stack: StackInfo,
    replica: str,
    metadata: tuple[tuple[str, str], ...],
    user: uuid.UUID,
    stack_dir: Path,
    offline_seconds: float,
) -> dict[str, Any]:
    """rebuild_from_postgres times a replica that never saw the tenant from its first query to its answer.

    That is the whole rebuild from Postgres to serving (tenants.py builds a missing tenant on
    first use); the replica's log line for it gives the phases and what was read. Throughput
    is the content indexed per second, next to the offline build of the same files.
    """
    request = search_pb2.SearchCodeRequest(query="zzqqxx", page_size=1)
    deadlines = 0
    with grpc.insecure_channel(stack.grpc[replica]) as cold:
        cold_stub = search_pb2_grpc.SearchServiceStub(cold)
        started = time.perf_counter()
        while True:
            try:
                cold_stub.SearchCode(request, metadata=metadata, timeout=1800)
                break
            except grpc.RpcError as exc:
                # The search's own time budget (10 s by default) runs while the replica builds;
                # past it the call ends DEADLINE_EXCEEDED and the build goes on (tenants.py).
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or time.perf_counter() - started > 1800:
                    raise
                deadlines += 1
        seconds = time.perf_counter() - started
    out: dict[str, Any] = {"seconds": round(seconds, 2), "replica": replica, "deadline_retries": deadlines}
    phases = _serving_fields(stack_dir / "logs" / f"{replica}.log", user)
    out.update(phases)
    megabytes = float(phases.get("bytes", 0)) / 1e6
    if megabytes:
        out["mb_per_second"] = round(megabytes / seconds, 1)
        out["offline_mb_per_second"] = round(megabytes / offline_seconds, 1)
    return out


def drop_copies(stack_dir: Path, user: uuid.UUID) -> None:
    """drop_copies deletes the replicas' copies of a tenant an earlier run pushed: both build it again."""
    for directory in stack_dir.glob(f"search*/{user}"):
        shutil.rmtree(directory)


def _serving_fields(log: Path, user: uuid.UUID) -> dict[str, Any]:
    """_serving_fields finds the last "the index of tenant … serves" line for `user` in a replica's log."""
    found: dict[str, Any] = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if str(user) not in line or "serves" not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("tenant") == str(user) and "build_s" in entry:
                found = {k: entry[k] for k in REBUILD_FIELDS if k in entry}
    return found


def render_rebuild(report: dict[str, Any]) -> list[str]:
    """render_rebuild is the rebuild's phases and throughput, and the pg_trgm queries skipped."""
    lines: list[str] = []
    rebuild = report.get("rebuild", {})
    if "build_s" in rebuild:
        lines.append(
            f"rebuild phases: {rebuild['documents']} documents, {rebuild['bytes'] / 1e6:.1f} MB,"
            f" {rebuild['symbols']} symbols, {rebuild['workers']} segment workers;"
            f" build {rebuild['build_s']} s"
            f" (writer waiting on the fetch {rebuild['fetch_wait_s']} s, adding {rebuild['index_s']} s,"
            f" final commit {rebuild['write_s']} s), open {rebuild['open_s']} s;"
            f" {rebuild.get('mb_per_second')} MB/s to serving vs {rebuild.get('offline_mb_per_second')} MB/s"
            " offline (same documents)"
        )
    if "first_answer" in report:
        first = report["first_answer"]
        lines.append(
            f"first answer through REST (the owner replica building the tenant): {first['seconds']} s,"
            f" {first['gateway_timeouts']} gateway timeouts (504) retried meanwhile"
        )
    reasons: dict[str, list[str]] = {}
    for row in report["latency"]["queries"]:
        if "pg_trgm_skipped" in row:
            reasons.setdefault(row["pg_trgm_skipped"], []).append(f"`{row['query']}`")
    for reason, queries in reasons.items():
        lines.append(f"pg_trgm skipped, {reason}: {len(queries)} queries ({', '.join(queries)})")
    return lines
