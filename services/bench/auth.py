"""`kotadb bench auth`: how fast and how exact the auth service's `Check` is, in one run.

The run builds its own world and tears it down (services/bench/authstack.py: an embedded
PostgreSQL, two auth processes, a search process as the cheap upstream, Envoys rendered from the
real gateway template with ext_authz on and off, and a spare auth process to kill). Then, in
order:

1. Throughput and latency of direct `envoy.service.auth.v3.Authorization/Check` calls to one
   auth process, closed loop, at fixed concurrencies (1, 16, 64 in flight). The load comes from
   separate client processes so the client's Python is not the server's ceiling; on a small
   machine they still share the CPU with the server, and the report says how many there were.
2. Latency at a fixed offered rate (1,000 checks/s, open loop): each call is timed from the
   moment the schedule said to send it, so a stalled server cannot hide its queueing delay.
3. Over-admissions: bursts far above a key's per-minute `rate_limit` (and another key's
   `monthly_quota`) spread over both auth processes; every grant beyond the limit is counted,
   and so is every request short of it (the issue wants exactly `limit` admitted).
4. The latency a cheap request gains through Envoy with ext_authz on versus off: the same
   REST `GET /v1/index` to the search service over one keep-alive connection, alternating rounds
   between the two Envoys to cancel drift. The search service answers it at once either way
   (without an identity it refuses the call; with one it answers the status call), so the
   difference is Envoy's ext_authz round trip plus `Check`.
5. Metering consistency: after the traffic of step 4 settles, the usage rows of the key equal
   its `usage_count` (services/auth/metering.py states the invariant).
6. Crash loss: the spare auth process is SIGKILLed under steady traffic and restarted; the usage
   rows that never appear (admissions minus rows) measure the traffic a crash loses.

Every loop is bounded by a request count or a duration, and everything talks over loopback.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import http.client
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from services.bench.authstack import Echo, Stack, running_stack
from services.bench.measure import percentile
from services.bench.report import Target, machine

# The path Check is asked about in steps 1-3: a read route, so a read key is admitted.
CHECK_PATH = "/kotadb.v1.SearchService/SearchCode"
CHEAP_PATH = "/v1/index"


@dataclasses.dataclass(frozen=True)
class AuthBenchOptions:
    """AuthBenchOptions sizes each step; the defaults take about a minute and a half."""

    concurrencies: tuple[int, ...] = (1, 16, 64)
    seconds_per_level: float = 4.0
    client_processes: int = 2
    offered_rate: float = 1000.0
    offered_seconds: float = 5.0
    burst_limit: int = 100
    burst_requests: int = 1000
    envoy_rounds: int = 4
    envoy_requests_per_round: int = 300
    crash_seconds: float = 6.0
    crash_clients: int = 4
    log_level: str = "WARNING"
    work_dir: Path | None = None


# --- Check load ---------------------------------------------------------------------------------


def check_request(key: str, path: str = CHECK_PATH) -> external_auth_pb2.CheckRequest:
    """check_request is what Envoy sends for a native gRPC call carrying `key`."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "POST"
    http.path = path
    http.host = "kotadb.bench"
    http.protocol = "HTTP/2"
    http.headers.update(
        {
            ":method": "POST",
            ":path": path,
            ":authority": "kotadb.bench",
            "content-type": "application/grpc",
            "authorization": f"Bearer {key}",
            "x-request-id": uuid.uuid4().hex,
        }
    )
    return request


def _allowed(response: external_auth_pb2.CheckResponse) -> bool:
    return int(response.status.code) == 0


async def _closed_loop(
    target: str, key: str, concurrency: int, start_at: float, seconds: float
) -> dict[str, Any]:
    """_closed_loop keeps `concurrency` Checks in flight from start_at for `seconds`."""
    request = check_request(key)
    latencies: list[float] = []
    denied = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await stub.Check(request, timeout=10)  # connect and warm up before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal denied
            while time.monotonic() < stop:
                began = time.perf_counter()
                response = await stub.Check(request, timeout=10)
                latencies.append(time.perf_counter() - began)
                denied += not _allowed(response)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"completed": len(latencies), "denied": denied, "latencies": latencies}


def _load_process(target: str, key: str, concurrency: int, start_at: float, seconds: float) -> dict[str, Any]:
    """_load_process is one client process of a closed-loop level (run in a spawned process)."""
    return asyncio.run(_closed_loop(target, key, concurrency, start_at, seconds))


# xds-protos ships no type stubs for its grpc modules, so the base class is Any to mypy.
class BareAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """BareAuthorization allows everything at once: the cost of a grpc.aio call and nothing else."""

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        """Check answers OK without looking at the request."""
        return external_auth_pb2.CheckResponse()


def _serve_bare(ports: Any) -> None:
    """_serve_bare runs a BareAuthorization server until killed, reporting its port on `ports`."""

    async def serve() -> None:
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(BareAuthorization(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def measure_floor(options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_floor is step 0: the same load against a bare grpc.aio server, the Python floor.

    Whatever Check does is added to this; when the floor's CPU per call is near the target's
    budget (1 / 5,000 s = 200 us), no Check written on grpc.aio can reach the target per process.
    """
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=_serve_bare, args=(ports,), daemon=True)
    server.start()
    try:
        target = f"127.0.0.1:{ports.get(timeout=60)}"
        concurrency = max(options.concurrencies)
        processes = min(options.client_processes, concurrency)
        shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            start_at = time.time() + 3.0
            futures = [
                pool.submit(_load_process, target, "unused", share, start_at, options.seconds_per_level)
                for share in shares
            ]
            time.sleep(max(0.0, start_at - time.time()))
            assert server.pid is not None
            cpu = _cpu_seconds([server.pid])
            time.sleep(options.seconds_per_level)
            cpu = _cpu_seconds([server.pid]) - cpu
            results = [future.result() for future in futures]
    finally:
        server.kill()
        server.join(timeout=10)
    completed = sum(result["completed"] for result in results)
    floor = {
        "concurrency": concurrency,
        "client_processes": processes,
        "calls_per_s": completed / options.seconds_per_level,
        "server_cpu_us_per_call": cpu / completed * 1e6 if completed else None,
        **_latency_ms([value for result in results for value in result["latencies"]]),
    }
    echo(
        f"bare grpc.aio floor: {floor['calls_per_s']:.0f}/s,"
        f" {_us(floor['server_cpu_us_per_call'])} us CPU/call"
    )
    return floor


def measure_levels(stack: Stack, options: AuthBenchOptions, echo: Echo) -> list[dict[str, Any]]:
    """measure_levels is step 1: closed-loop Check throughput and latency per concurrency level."""
    levels: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.client_processes, mp_context=context) as pool:
        for concurrency in options.concurrencies:
            processes = min(options.client_processes, concurrency)
            shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
            start_at = time.time() + 3.0  # spawned clients import grpc and connect first
            futures = [
                pool.submit(
                    _load_process, stack.auth[0], stack.read_key, share, start_at, options.seconds_per_level
                )
                for share in shares
            ]
            # CPU used by the auth process and by Postgres during the timed window, so the
            # server's cost per Check is known even when clients and server share the CPUs.
            time.sleep(max(0.0, start_at - time.time()))
            auth_cpu, pg_cpu = _cpu_seconds([stack.auth_pid]), _cpu_seconds(_postgres_pids(stack))
            time.sleep(options.seconds_per_level)
            auth_cpu = _cpu_seconds([stack.auth_pid]) - auth_cpu
            pg_cpu = _cpu_seconds(_postgres_pids(stack)) - pg_cpu
            results = [future.result() for future in futures]
            latencies = [value for result in results for value in result["latencies"]]
            completed = sum(result["completed"] for result in results)
            level = {
                "concurrency": concurrency,
                "client_processes": processes,
                "seconds": options.seconds_per_level,
                "checks": completed,
                "denied": sum(result["denied"] for result in results),
                "checks_per_s": completed / options.seconds_per_level,
                "auth_cpu_s": auth_cpu,
                "postgres_cpu_s": pg_cpu,
                "auth_cpu_us_per_check": auth_cpu / completed * 1e6 if completed else None,
                "postgres_cpu_us_per_check": pg_cpu / completed * 1e6 if completed else None,
                **_latency_ms(latencies),
            }
            levels.append(level)
            echo(
                f"check c={concurrency}: {level['checks_per_s']:.0f}/s, "
                f"p50 {level['p50_ms']:.2f} ms, p99 {level['p99_ms']:.2f} ms"
            )
    return levels


def _cpu_seconds(pids: Sequence[int]) -> float:
    """_cpu_seconds sums user and system CPU time of the processes still alive among `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def _postgres_pids(stack: Stack) -> list[int]:
    """_postgres_pids is the postmaster and its backends (their set changes little under a pool)."""
    if stack.postgres_pid is None:
        return []
    try:
        postmaster = psutil.Process(stack.postgres_pid)
        return [postmaster.pid, *(child.pid for child in postmaster.children())]
    except psutil.Error:
        return []


async def _open_loop(target: str, key: str, rate: float, seconds: float) -> dict[str, Any]:
    """_open_loop sends Checks on a fixed schedule and times each from its scheduled instant."""
    request = check_request(key)
    total = int(rate * seconds)
    latencies: list[float] = []
    behind = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await stub.Check(request, timeout=10)
        origin = time.perf_counter() + 0.05

        async def one(scheduled: float) -> None:
            await stub.Check(request, timeout=10)
            latencies.append(time.perf_counter() - scheduled)

        tasks: list[asyncio.Task[None]] = []
        for index in range(total):
            scheduled = origin + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.001:
                behind += 1
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - origin
    return {
        "offered_per_s": rate,
        "sent": total,
        "achieved_per_s": total / elapsed,
        "sent_late": behind,
        **_latency_ms(latencies),
    }


def measure_offered_rate(stack: Stack, options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_offered_rate is step 2: p50/p99 at a fixed offered rate, timed from the schedule."""
    result = asyncio.run(
        _open_loop(stack.auth[0], stack.read_key, options.offered_rate, options.offered_seconds)
    )
    echo(
        f"check at {options.offered_rate:.0f}/s offered: "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
    )
    return result


async def _burst(targets: Sequence[str], key: str, requests: int) -> int:
    """_burst fires `requests` Checks at once, alternating targets; returns how many were allowed."""
    request = check_request(key)
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        stubs = [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]
        for channel in channels:
            await channel.channel_ready()
        responses = await asyncio.gather(
            *(stubs[index % len(stubs)].Check(request, timeout=30) for index in range(requests))
        )
    finally:
        for channel in channels:
            await channel.close(None)
    return sum(_allowed(response) for response in responses)


def _wait_for_fresh_minute(echo: Echo) -> None:
    """_wait_for_fresh_minute avoids a burst straddling two rate-limit windows (UTC minutes)."""
    second = datetime.datetime.now(datetime.UTC).second
    if second >= 40:
        echo(f"waiting {60 - second}s for a fresh rate-limit window")
        time.sleep(60 - second + 0.5)


def measure_over_admission(
    stack: Stack, keys: dict[str, tuple[str, uuid.UUID]], options: AuthBenchOptions, echo: Echo
) -> dict[str, Any]:
    """measure_over_admission is step 3: bursts beyond a rate limit and a quota, across both replicas."""
    results: dict[str, Any] = {}
    for name in ("rate", "quota"):
        _wait_for_fresh_minute(echo)
        allowed = asyncio.run(_burst(stack.auth, keys[name][0], options.burst_requests))
        limit = options.burst_limit
        results[name] = {
            "limit": limit,
            "requests": options.burst_requests,
            "replicas": len(stack.auth),
            "admitted": allowed,
            "over_admitted": max(0, allowed - limit),
            "under_admitted": max(0, limit - allowed),
        }
        echo(f"{name} burst: {allowed} admitted of {options.burst_requests} with a limit of {limit}")
    return results


# --- through Envoy ------------------------------------------------------------------------------


def _timed_gets(target: str, key: str, count: int) -> tuple[list[float], dict[int, int]]:
    """_timed_gets sends `count` GETs of the cheap path over one keep-alive connection."""
    host, port = target.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"authorization": f"Bearer {key}"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    try:
        for _ in range(count):
            began = time.perf_counter()
            connection.request("GET", CHEAP_PATH, headers=headers)
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - began)
            statuses[response.status] = statuses.get(response.status, 0) + 1
    finally:
        connection.close()
    return latencies, statuses


def measure_envoy_overhead(stack: Stack, options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_envoy_overhead is step 4: a cheap request's latency with ext_authz on and off."""
    samples: dict[str, list[float]] = {"off": [], "on": []}
    statuses: dict[str, dict[int, int]] = {"off": {}, "on": {}}
    for target in (stack.envoy_off, stack.envoy_on):
        _timed_gets(target, stack.envoy_key, 50)  # warm both paths before timing
    for _ in range(options.envoy_rounds):
        for side, target in (("off", stack.envoy_off), ("on", stack.envoy_on)):
            latencies, seen = _timed_gets(target, stack.envoy_key, options.envoy_requests_per_round)
            samples[side].extend(latencies)
            for code, count in seen.items():
                statuses[side][code] = statuses[side].get(code, 0) + count
    off, on = _latency_ms(samples["off"]), _latency_ms(samples["on"])
    added = (on["p50_ms"] - off["p50_ms"]) / off["p50_ms"] * 100 if off["p50_ms"] > 0 else None
    echo(f"GET {CHEAP_PATH} via envoy: off p50 {off['p50_ms']:.2f} ms, on p50 {on['p50_ms']:.2f} ms")
    return {
        "path": CHEAP_PATH,
        "requests_per_side": len(samples["on"]),
        "off": {**off, "statuses": {str(k): v for k, v in statuses["off"].items()}},
        "on": {**on, "statuses": {str(k): v for k, v in statuses["on"].items()}},
        "added_p50_ms": on["p50_ms"] - off["p50_ms"],
        "added_p50_percent": added,
        "added_p99_ms": on["p99_ms"] - off["p99_ms"],
    }


async def _metering_counts(database_url: str, key_id: uuid.UUID, settle: float) -> dict[str, Any]:
    """_metering_counts waits for usage rows to catch up with usage_count, up to `settle` seconds.

    It also stops once the row count has not moved for 3 s (rows lost to a crash never come).
    """
    connection = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        deadline = time.monotonic() + settle
        last_rows, last_change = -1, time.monotonic()
        while True:
            row = await connection.fetchrow(
                "select k.usage_count, (select count(*) from public.usage_metrics m"
                "  where m.key_id = k.id and m.occurred_at >= date_trunc('month', now() at time zone 'utc')"
                "  at time zone 'utc') as rows from public.api_keys k where k.id = $1",
                key_id,
            )
            assert row is not None, "the benchmark key vanished"
            usage_count, rows = int(row["usage_count"]), int(row["rows"])
            now = time.monotonic()
            if rows != last_rows:
                last_rows, last_change = rows, now
            if rows == usage_count or now > deadline or now - last_change > 3.0:
                return {"usage_count": usage_count, "usage_rows": rows, "missing": usage_count - rows}
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


def measure_crash_loss(stack: Stack, options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_crash_loss is step 6: usage rows lost when an auth process is SIGKILLed mid-traffic.

    Clients send GETs through the crash rig's Envoy for `crash_seconds`; half way through, its
    auth process is killed and restarted on the same port. After traffic settles, the rows
    missing are the key's `usage_count` (admissions, counted in the database at once) minus its
    usage rows; divided by the admission rate that is the window of traffic a crash loses.
    """
    rig = stack.crash
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    began = time.monotonic()
    stop_at = began + options.crash_seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            try:
                _, seen = _timed_gets(rig.envoy, rig.key, 20)
            except (OSError, http.client.HTTPException):
                seen = {0: 1}  # the gateway closed the connection; open a new one
            with lock:
                statuses.update(seen)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(options.crash_clients)]
    for thread in threads:
        thread.start()
    time.sleep(options.crash_seconds / 2)
    downtime = rig.kill_and_restart()
    for thread in threads:
        thread.join(timeout=options.crash_seconds + 60)
    seconds = time.monotonic() - began
    counts = asyncio.run(_metering_counts(stack.database_url, rig.key_id, 20.0))
    # Admissions happen only while an auth process is up: the rate over that time.
    up = max(seconds - downtime, 1e-3)
    rate = counts["usage_count"] / up
    lost_ms = counts["missing"] / rate * 1000 if rate > 0 else None
    result = {
        **counts,
        "seconds": seconds,
        "clients": options.crash_clients,
        "restart_seconds": downtime,
        "admitted_per_s": rate,
        "lost_traffic_ms": lost_ms,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
    }
    echo(
        f"crash: {counts['missing']} of {counts['usage_count']} admitted requests' rows lost"
        f" (~{lost_ms or 0:.0f} ms of traffic)"
    )
    return result


# --- report -------------------------------------------------------------------------------------


def _latency_ms(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p99_ms": percentile(samples, 0.99) * 1e3,
        "max_ms": max(samples) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
    }


def targets(report: dict[str, Any]) -> list[Target]:
    """targets checks the issue's four goals against the measured figures."""
    best = max((level["checks_per_s"] for level in report["check_levels"]), default=None)
    over = sum(part["over_admitted"] for part in report["over_admission"].values())
    return [
        Target("checks per second per auth process", 5000, best, "checks/s", lower_is_better=False),
        Target("p99 at 1,000 checks/s offered", 5.0, report["offered_rate"]["p99_ms"], "ms"),
        Target("over-admissions", 0, over, "requests"),
        Target("ext_authz added latency (p50)", 30.0, report["envoy"]["added_p50_percent"], "%"),
    ]


def run_auth_bench(options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """run_auth_bench runs every step and returns the JSON-ready report."""
    started = datetime.datetime.now(datetime.UTC)
    stack_parts = running_stack(
        echo, burst_limit=options.burst_limit, log_level=options.log_level, work_dir=options.work_dir
    )
    with stack_parts as (stack, keys):
        report: dict[str, Any] = {
            "benchmark": "auth",
            "started_at": started.isoformat(timespec="seconds"),
            "machine": machine(),
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()
            },
            "auth_processes": len(stack.auth),
        }
        report["floor"] = measure_floor(options, echo)
        report["check_levels"] = measure_levels(stack, options, echo)
        report["offered_rate"] = measure_offered_rate(stack, options, echo)
        report["over_admission"] = measure_over_admission(stack, keys, options, echo)
        report["envoy"] = measure_envoy_overhead(stack, options, echo)
        report["metering"] = asyncio.run(_metering_counts(stack.database_url, stack.envoy_key_id, 15.0))
        echo(f"metering: {report['metering']}")
        report["crash"] = measure_crash_loss(stack, options, echo)
    report["targets"] = [target.as_dict() for target in targets(report)]
    return report


def render_auth_table(report: dict[str, Any]) -> str:
    """render_auth_table formats the report as the text the command prints and BENCHMARKS.md quotes."""
    m = report["machine"]
    lines = [
        f"machine: {m.get('nproc')} cpus, {m.get('cpu_model')}; "
        f"auth log level {report['options']['log_level']}",
        "",
        "Check, closed loop (direct gRPC to one auth process)",
        "concurrency  clients  checks/s   p50 ms   p99 ms   max ms  auth CPU us/check  pg CPU us/check",
    ]
    for level in report["check_levels"]:
        lines.append(
            f"{level['concurrency']:>11}  {level['client_processes']:>7}  {level['checks_per_s']:>8.0f}"
            f"  {level['p50_ms']:>7.2f}  {level['p99_ms']:>7.2f}  {level['max_ms']:>7.2f}"
            f"  {_us(level['auth_cpu_us_per_check']):>17}  {_us(level['postgres_cpu_us_per_check']):>15}"
        )
    costs = [level["auth_cpu_us_per_check"] for level in report["check_levels"]]
    cheapest = min((cost for cost in costs if cost), default=None)
    if cheapest:
        lines.append(
            f"auth CPU per Check (best level): {cheapest:.0f} us, i.e. at most {1e6 / cheapest:.0f}"
            " checks/s per core given to the auth process alone"
        )
    floor = report["floor"]
    lines.append(
        f"floor: a bare grpc.aio server (answers OK, no interceptors) under c={floor['concurrency']}:"
        f" {floor['calls_per_s']:.0f} calls/s, {_us(floor['server_cpu_us_per_call'])} us CPU per call"
    )
    rate = report["offered_rate"]
    lines += [
        "",
        f"Check at {rate['offered_per_s']:.0f}/s offered (open loop, timed from schedule): "
        f"achieved {rate['achieved_per_s']:.0f}/s, p50 {rate['p50_ms']:.2f} ms, p99 {rate['p99_ms']:.2f} ms,"
        f" max {rate['max_ms']:.2f} ms",
        "",
        "Exactness (bursts over both auth processes)",
    ]
    for name, part in report["over_admission"].items():
        lines.append(
            f"  {name:<6} limit {part['limit']}, {part['requests']} requests: admitted {part['admitted']}, "
            f"over {part['over_admitted']}, under {part['under_admitted']}"
        )
    envoy = report["envoy"]
    percent = envoy["added_p50_percent"]
    lines += [
        "",
        f"GET {envoy['path']} through Envoy ({envoy['requests_per_side']} requests per side, keep-alive)",
        f"  ext_authz off  p50 {envoy['off']['p50_ms']:.2f} ms  p99 {envoy['off']['p99_ms']:.2f} ms"
        f"  statuses {envoy['off']['statuses']}",
        f"  ext_authz on   p50 {envoy['on']['p50_ms']:.2f} ms  p99 {envoy['on']['p99_ms']:.2f} ms"
        f"  statuses {envoy['on']['statuses']}",
        f"  added          p50 {envoy['added_p50_ms']:+.2f} ms"
        + ("" if percent is None else f" ({percent:+.0f} %)")
        + f"  p99 {envoy['added_p99_ms']:+.2f} ms",
        "",
        f"Metering: usage_count {report['metering']['usage_count']}, "
        f"usage rows {report['metering']['usage_rows']}",
        "",
        _crash_line(report["crash"]),
        "",
        "Targets",
    ]
    for target in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        measured = "-" if target["measured"] is None else f"{target['measured']:.2f}"
        bound = ">=" if not target["lower_is_better"] else "<="
        lines.append(
            f"  {target['name']:<38} {measured:>10} {target['unit']:<9}"
            f" ({bound} {target['limit']:g}) {verdict}"
        )
    return "\n".join(lines)


def _crash_line(crash: dict[str, Any]) -> str:
    lost = crash["lost_traffic_ms"]
    window = "-" if lost is None else f"{lost:.0f} ms"
    return (
        f"Crash (SIGKILL of an auth process under {crash['admitted_per_s']:.0f} admitted req/s): "
        f"{crash['missing']} of {crash['usage_count']} usage rows lost = {window} of traffic; "
        f"restart took {crash['restart_seconds']:.1f} s"
    )


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
