"""`kotadb bench auth`: how fast and how exact the auth service's `Check` is, in one run.

The run builds its own world and tears it down (services/bench/authstack.py: an embedded
PostgreSQL, two auth processes, a search process as the cheap upstream, Envoys rendered from the
real gateway template with ext_authz on and off, and a spare auth process to kill). Then, in
order:

1. Throughput and latency of direct `envoy.service.auth.v3.Authorization/Check` calls to one
   auth process, closed loop, at fixed concurrencies (1, 16, 64 in flight: h2load's clients x
   streams per client). The load comes from h2load (services/bench/h2load.py), a C client that
   spends a few microseconds per request, so on a small machine the figure is the server's and
   not a Python client's. Each level is run against the lean Check listener (what Envoy's
   ext_authz calls), against Check on the same process's grpc.aio port, and against a bare
   grpc.aio server that answers OK at once (the framework's floor), one after another. The
   auth process's CPU per check (psutil) is the honest capacity figure: it does not depend on
   how the two cores are shared between client and server. h2load sees only HTTP statuses, so
   each run is bracketed by a real Check (grpcio) that must be allowed, and the key's
   usage_count (the server's own count of admissions) is compared with h2load's answers.
2. Latency at a fixed offered rate (1,000 checks/s, open loop, h2load `--rps` on the lean
   listener, several streams per connection so one slow answer does not hold back the next).
   h2load times each request from when it was sent, so a stalled server hides part of its
   queueing delay behind the sender; the report says so.
3. Over-admissions: bursts far above a key's per-minute `rate_limit` (and another key's
   `monthly_quota`) spread over both auth processes, on both their transports (lean listener and
   grpc.aio); every grant beyond the limit is counted, and so is every request short of it (the
   issue wants exactly `limit` admitted).
4. The latency a cheap request gains through Envoy with ext_authz on versus off: the same
   REST `GET /v1/index` to the search service over one keep-alive connection, alternating rounds
   between the two Envoys to cancel drift, twice: from Python's http.client and from h2load
   (`--h1 -c 1 -m 1`). The ext_authz-off Envoy adds a valid signed identity itself (a
   long-lived token for the same key, made with the stack's identity key), so the search
   service does the same work on both sides: it verifies the identity and answers the call
   (501 while GetIndexStatus is unbuilt). The difference is Envoy's ext_authz round trip plus
   `Check`. The Python client's own time per request dilutes the ratio; the target line uses
   h2load's.
5. Metering consistency: after the traffic of step 4 settles, the usage rows of the key equal
   its `usage_count` (services/auth/metering.py states the invariant). Admission leases count a
   block of tokens into usage_count when granted and hand unused ones back after the key has
   been idle for 0.2 s, so the comparison waits at least SETTLE_SECONDS first.
6. Crash loss: the spare auth process is SIGKILLed under steady traffic and restarted (on the
   same two ports); the usage rows that never appear (usage_count minus rows) measure the
   traffic a crash loses. With leases that difference also holds the dead process's leased but
   unused tokens, which count as used; the tokens it held at the kill bound that part.

Every loop is bounded by a request count or a duration, and everything talks over loopback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import functools
import http.client
import multiprocessing
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from services.bench import h2load
from services.bench.authstack import Echo, Stack, running_stack
from services.bench.measure import percentile
from services.bench.report import Target, machine

# The path Check is asked about in steps 1-3: a read route, so a read key is admitted.
CHECK_PATH = "/kotadb.v1.SearchService/SearchCode"
CHEAP_PATH = "/v1/index"
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# Quiet time before reading a usage_count: more than the lease idle return (0.2 s) plus a sweep.
SETTLE_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class AuthBenchOptions:
    """AuthBenchOptions sizes each step; the defaults take about a minute and a half.

    `levels` are h2load shapes (connections, streams per connection); their product is the
    concurrency. `offered_rate` is split evenly over `offered_clients` connections.
    """

    levels: tuple[tuple[int, int], ...] = ((1, 1), (2, 8), (4, 16))
    seconds_per_level: float = 4.0
    offered_rate: float = 1000.0
    offered_seconds: float = 5.0
    offered_clients: int = 4
    offered_streams: int = 64
    burst_limit: int = 100
    burst_requests: int = 1000
    envoy_rounds: int = 4
    envoy_requests_per_round: int = 300
    envoy_h2load_requests_per_round: int = 1000
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


def _sample_allowed(target: str, key: str) -> bool:
    """_sample_allowed asks `target` one real Check for `key` (grpcio) and reports whether it was allowed.

    h2load sees HTTP 200 for an allowed and a denied Check alike, so each measured run is
    bracketed by one of these.
    """
    with grpc.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return _allowed(stub.Check(check_request(key), timeout=10))


def check_url(target: str) -> str:
    """check_url is the URL h2load posts Checks to on `target` (host:port, h2c with prior knowledge)."""
    return f"http://{target}{CHECK_METHOD}"


def check_body(key: str) -> bytes:
    """check_body is one gRPC-framed CheckRequest for `key`, the body of every h2load request."""
    return h2load.grpc_frame(check_request(key).SerializeToString())


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


@contextlib.contextmanager
def _bare_server() -> Iterator[tuple[str, int]]:
    """_bare_server runs the floor (a bare grpc.aio Check server) in a process; yields address and pid."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=_serve_bare, args=(ports,), daemon=True)
    server.start()
    try:
        address = f"127.0.0.1:{ports.get(timeout=60)}"
        assert server.pid is not None
        _sample_allowed(address, "unused")  # up and answering
        yield address, server.pid
    finally:
        server.kill()
        server.join(timeout=10)


async def _fetch_usage_count(database_url: str, key_id: uuid.UUID) -> int:
    connection = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        value = await connection.fetchval("select usage_count from public.api_keys where id = $1", key_id)
    finally:
        await connection.close()
    return int(value)


def _settled_usage_count(database_url: str, key_id: uuid.UUID, settle: float) -> int:
    """_settled_usage_count is a key's usage_count once its leased-but-unused tokens are back.

    A replica returns a block's unused tokens once the key has been idle for
    KOTADB_AUTH_LEASE_IDLE_RETURN (0.2 s by default); `settle` seconds of quiet must exceed it.
    """
    time.sleep(settle)
    return asyncio.run(_fetch_usage_count(database_url, key_id))


def _h2load_checks(
    target: str,
    key: str,
    *,
    clients: int,
    streams: int,
    seconds: float,
    rps: float | None,
    server_pids: Callable[[], Sequence[int]],
    postgres_pids: Callable[[], Sequence[int]],
    work_dir: Path | None,
) -> dict[str, Any]:
    """_h2load_checks drives Check on `target` with h2load and measures the server's CPU meanwhile.

    CPU is taken over the whole h2load process (connection setup is a few calls' worth) and
    divided by the answers h2load received. Requests still in flight when the duration ends are
    cut off and not counted (at most clients x streams of them).
    """
    server_before, pg_before = _cpu_seconds(server_pids()), _cpu_seconds(postgres_pids())
    result = h2load.run(
        check_url(target),
        clients=clients,
        streams=streams,
        seconds=seconds,
        rps=rps,
        body=check_body(key),
        headers=h2load.GRPC_HEADERS,
        work_dir=work_dir,
    )
    server_cpu = _cpu_seconds(server_pids()) - server_before
    pg_cpu = _cpu_seconds(postgres_pids()) - pg_before
    answered = result.done
    return {
        "target": target,
        "command": h2load.describe(result.argv),
        "seconds": result.seconds,
        "started": result.started,
        "checks": answered,
        "succeeded": result.succeeded,
        "failed": result.failed,
        "errored": result.errored,
        "timeout": result.timeout,
        "statuses": result.status_counts(),
        "checks_per_s": answered / result.seconds if result.seconds > 0 else 0.0,
        "server_cpu_s": server_cpu,
        "postgres_cpu_s": pg_cpu,
        "server_cpu_us_per_check": server_cpu / answered * 1e6 if answered else None,
        "postgres_cpu_us_per_check": pg_cpu / answered * 1e6 if answered else None,
        **_latency_ms(result.latencies_s),
    }


def _admitted_run(stack: Stack, target: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """_admitted_run brackets an h2load run on an auth process with the server's own accounting.

    Before and after: one real Check (grpcio) that must be allowed. Around both: the read key's
    settled usage_count, which every admission increments, so the difference minus the two
    samples is what the auth process admitted during the run. It lies between the answers
    h2load counted and the requests it started, unless some answers were denials.
    """
    before = _settled_usage_count(stack.database_url, stack.read_key_id, 0.0)
    allowed_before = _sample_allowed(target, stack.read_key)
    measured = run()
    allowed_after = _sample_allowed(target, stack.read_key)
    after = _settled_usage_count(stack.database_url, stack.read_key_id, SETTLE_SECONDS)
    admitted = after - before - allowed_before - allowed_after
    measured.update(
        allowed_before=allowed_before,
        allowed_after=allowed_after,
        server_admitted=admitted,
        denied_at_least=max(0, measured["succeeded"] - admitted),
    )
    return measured


def measure_levels(
    stack: Stack, floor: tuple[str, int], options: AuthBenchOptions, echo: Echo
) -> list[dict[str, Any]]:
    """measure_levels is step 1: closed-loop Check throughput and latency per concurrency level.

    Each level runs h2load three times with the same shape: against the auth process's lean
    Check listener (what Envoy calls), against Check on the same process's grpc.aio port, and
    against a bare grpc.aio server that answers OK at once (the framework's floor).
    """
    levels: list[dict[str, Any]] = []
    auth_pids = _fixed([stack.auth_pid])
    postgres = functools.partial(_postgres_pids, stack)
    floor_address, floor_pid = floor
    for clients, streams in options.levels:
        shaped = functools.partial(
            _h2load_checks,
            key=stack.read_key,
            clients=clients,
            streams=streams,
            seconds=options.seconds_per_level,
            rps=None,
            postgres_pids=postgres,
            work_dir=options.work_dir,
        )
        lean = functools.partial(shaped, stack.check[0], server_pids=auth_pids)
        grpc_aio = functools.partial(shaped, stack.auth[0], server_pids=auth_pids)
        level: dict[str, Any] = {"concurrency": clients * streams, "clients": clients, "streams": streams}
        level["lean"] = _admitted_run(stack, stack.check[0], lean)
        level["grpc_aio"] = _admitted_run(stack, stack.auth[0], grpc_aio)
        level["floor"] = shaped(floor_address, server_pids=_fixed([floor_pid]))
        levels.append(level)
        echo(
            f"check c={clients} m={streams}: "
            + ", ".join(
                f"{name} {level[name]['checks_per_s']:.0f}/s p99 {level[name]['p99_ms']:.2f} ms"
                f" {_us(level[name]['server_cpu_us_per_check'])} us CPU"
                for name in ("lean", "grpc_aio", "floor")
            )
        )
        for name in ("lean", "grpc_aio"):
            part = level[name]
            if not (part["allowed_before"] and part["allowed_after"]) or part["denied_at_least"]:
                echo(f"  WARNING {name}: the read key was not admitted throughout: {part}")
    return levels


def _cpu_seconds(pids: Sequence[int]) -> float:
    """_cpu_seconds sums user and system CPU time of the processes still alive among `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def _fixed(pids: Sequence[int]) -> Callable[[], Sequence[int]]:
    """_fixed is a pid source that always answers `pids` (a process whose pid does not change)."""
    return lambda: pids


def _postgres_pids(stack: Stack) -> list[int]:
    """_postgres_pids is the postmaster and its backends (their set changes little under a pool)."""
    if stack.postgres_pid is None:
        return []
    try:
        postmaster = psutil.Process(stack.postgres_pid)
        return [postmaster.pid, *(child.pid for child in postmaster.children())]
    except psutil.Error:
        return []


def measure_offered_rate(
    stack: Stack, floor: tuple[str, int], options: AuthBenchOptions, echo: Echo
) -> dict[str, Any]:
    """measure_offered_rate is step 2: latency at a fixed offered rate (open loop).

    The lean listener is measured (the target's figure), then the same schedule is sent to
    Check on the grpc.aio port and to the bare floor server, so the machine's own share of the
    latency (an idle process waking for each request) shows next to the listener's. h2load's
    `--rps` is per client; each client keeps up to `offered_streams` requests in flight so a
    slow answer does not hold back the next request. h2load times a request from when it was
    sent, not from when the schedule wanted it sent.
    """
    clients = options.offered_clients
    scheduled = functools.partial(
        _h2load_checks,
        key=stack.read_key,
        clients=clients,
        streams=options.offered_streams,
        seconds=options.offered_seconds,
        rps=options.offered_rate / clients,
        postgres_pids=functools.partial(_postgres_pids, stack),
        work_dir=options.work_dir,
    )
    auth_pids = _fixed([stack.auth_pid])
    result = _admitted_run(
        stack, stack.check[0], functools.partial(scheduled, stack.check[0], server_pids=auth_pids)
    )
    result["offered_per_s"] = options.offered_rate
    result["achieved_per_s"] = result["checks_per_s"]
    grpc_aio = _admitted_run(
        stack, stack.auth[0], functools.partial(scheduled, stack.auth[0], server_pids=auth_pids)
    )
    result["compare"] = {
        "grpc_aio": grpc_aio,
        "floor": scheduled(floor[0], server_pids=_fixed([floor[1]])),
    }
    for name, part in (("lean", result), *result["compare"].items()):
        echo(
            f"check at {options.offered_rate:.0f}/s offered, {name}: achieved {part['checks_per_s']:.0f}/s,"
            f" p50 {part['p50_ms']:.2f} ms, p99 {part['p99_ms']:.2f} ms, max {part['max_ms']:.2f} ms"
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
    """measure_over_admission is step 3: bursts beyond a rate limit and a quota, across both replicas.

    The burst alternates over both processes' lean Check listeners and grpc.aio ports.
    """
    results: dict[str, Any] = {}
    targets = [address for pair in zip(stack.check, stack.auth, strict=True) for address in pair]
    for name in ("rate", "quota"):
        _wait_for_fresh_minute(echo)
        allowed = asyncio.run(_burst(targets, keys[name][0], options.burst_requests))
        limit = options.burst_limit
        results[name] = {
            "limit": limit,
            "requests": options.burst_requests,
            "replicas": len(stack.auth),
            "targets": targets,
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


def _h2load_gets(target: str, key: str, count: int, work_dir: Path | None) -> h2load.H2loadRun:
    """_h2load_gets sends `count` GETs of the cheap path with h2load over one HTTP/1.1 connection."""
    return h2load.run(
        f"http://{target}{CHEAP_PATH}",
        clients=1,
        streams=1,
        requests=count,
        headers={"authorization": f"Bearer {key}"},
        h1=True,
        work_dir=work_dir,
    )


def _envoy_sides(samples: dict[str, list[float]], statuses: dict[str, dict[str, int]]) -> dict[str, Any]:
    """_envoy_sides summarizes the samples of one client and the latency ext_authz adds.

    "on" is the real Check; "instant" (when measured) a Check server that allows at once, so
    its figure is the part of "added" that is Envoy's ext_authz round trip itself.
    """
    off, on = _latency_ms(samples["off"]), _latency_ms(samples["on"])
    added = (on["p50_ms"] - off["p50_ms"]) / off["p50_ms"] * 100 if off["p50_ms"] > 0 else None
    summary: dict[str, Any] = {
        "requests_per_side": len(samples["on"]),
        "off": {**off, "statuses": dict(sorted(statuses["off"].items()))},
        "on": {**on, "statuses": dict(sorted(statuses["on"].items()))},
        "added_p50_ms": on["p50_ms"] - off["p50_ms"],
        "added_p50_percent": added,
        "added_p99_ms": on["p99_ms"] - off["p99_ms"],
    }
    if samples.get("instant"):
        instant = _latency_ms(samples["instant"])
        summary["instant"] = {**instant, "statuses": dict(sorted(statuses["instant"].items()))}
        summary["instant_added_p50_ms"] = instant["p50_ms"] - off["p50_ms"]
        summary["instant_added_p50_percent"] = (
            (instant["p50_ms"] - off["p50_ms"]) / off["p50_ms"] * 100 if off["p50_ms"] > 0 else None
        )
    return summary


def measure_envoy_overhead(stack: Stack, options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_envoy_overhead is step 4: a cheap request's latency with ext_authz on and off.

    Rounds alternate between the Envoys, first with Python's http.client, then with h2load;
    both use one keep-alive connection and one request at a time. The h2load rounds also time
    an Envoy whose ext_authz asks a Check server that allows at once (the floor).
    """
    sides = (("off", stack.envoy_off), ("on", stack.envoy_on))
    samples: dict[str, list[float]] = {"off": [], "on": []}
    statuses: dict[str, dict[str, int]] = {"off": {}, "on": {}}
    for _, target in sides:
        _timed_gets(target, stack.envoy_key, 50)  # warm both paths before timing
    for _ in range(options.envoy_rounds):
        for side, target in sides:
            latencies, seen = _timed_gets(target, stack.envoy_key, options.envoy_requests_per_round)
            samples[side].extend(latencies)
            for code, count in seen.items():
                statuses[side][str(code)] = statuses[side].get(str(code), 0) + count
    python = _envoy_sides(samples, statuses)
    h2_sides = (*sides, ("instant", stack.envoy_instant))
    samples = {side: [] for side, _ in h2_sides}
    statuses = {side: {} for side, _ in h2_sides}
    command = ""
    for _, target in h2_sides:  # warm every path (connections, caches), untimed
        _h2load_gets(target, stack.envoy_key, 200, options.work_dir)
    for round_number in range(options.envoy_rounds * 2):
        # Twice as many half-size rounds, each starting with the next side in turn, so no side
        # is always the one measured first after the previous step's leftovers.
        shift = round_number % len(h2_sides)
        for side, target in (*h2_sides[shift:], *h2_sides[:shift]):
            run = _h2load_gets(
                target,
                stack.envoy_key,
                max(1, options.envoy_h2load_requests_per_round // 2),
                options.work_dir,
            )
            command = h2load.describe(run.argv)
            samples[side].extend(run.latencies_s)
            for status, count in run.status_counts().items():
                statuses[side][status] = statuses[side].get(status, 0) + count
    cheap = {**_envoy_sides(samples, statuses), "command": command}
    for name, part in (("python", python), ("h2load", cheap)):
        echo(
            f"GET {CHEAP_PATH} via envoy ({name}): off p50 {part['off']['p50_ms']:.3f} ms,"
            f" on p50 {part['on']['p50_ms']:.3f} ms, statuses off {part['off']['statuses']}"
            f" on {part['on']['statuses']}"
        )
    return {"path": CHEAP_PATH, "python": python, "h2load": cheap}


async def _metering_counts(database_url: str, key_id: uuid.UUID, settle: float) -> dict[str, Any]:
    """_metering_counts waits for usage rows to catch up with usage_count, up to `settle` seconds.

    It first waits SETTLE_SECONDS, so leased but unused tokens (counted in usage_count until the
    key has been idle for the lease idle return) are back. It stops once the row count has not
    moved for 3 s (rows lost to a crash never come).
    """
    await asyncio.sleep(SETTLE_SECONDS)
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


async def _leased_tokens(database_url: str, key_id: uuid.UUID) -> int:
    """_leased_tokens is the unused tokens all holders of a key had reserved when they last asked."""
    connection = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        value = await connection.fetchval(
            "select coalesce(sum(tokens), 0) from public.admission_leases where key_id = $1", key_id
        )
    finally:
        await connection.close()
    return int(value)


def measure_crash_loss(stack: Stack, options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """measure_crash_loss is step 6: usage rows lost when an auth process is SIGKILLed mid-traffic.

    Clients send GETs through the crash rig's Envoy for `crash_seconds`; half way through, its
    auth process is killed and restarted on the same port. After traffic settles, the rows
    missing are the key's `usage_count` (admissions, counted in the database at once) minus its
    usage rows; divided by the admission rate that is the window of traffic a crash loses. The
    leased tokens the process held just before the kill (as of its last grant) bound how much of
    that difference is tokens it reserved and never used rather than rows it lost.
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
    leased = asyncio.run(_leased_tokens(stack.database_url, rig.key_id))
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
        "leased_tokens_at_kill": leased,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
    }
    echo(
        f"crash: {counts['missing']} of {counts['usage_count']} admitted requests' rows lost"
        f" (~{lost_ms or 0:.0f} ms of traffic; {leased} leased tokens held at the kill)"
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
    """targets checks the issue's four goals against the measured figures (lean listener, h2load)."""
    best = max((level["lean"]["checks_per_s"] for level in report["check_levels"]), default=None)
    over = sum(part["over_admitted"] for part in report["over_admission"].values())
    return [
        Target("checks per second per auth process", 5000, best, "checks/s", lower_is_better=False),
        Target("p99 at 1,000 checks/s offered", 5.0, report["offered_rate"]["p99_ms"], "ms"),
        Target("over-admissions", 0, over, "requests"),
        Target("ext_authz added latency (p50)", 30.0, report["envoy"]["h2load"]["added_p50_percent"], "%"),
    ]


def run_auth_bench(options: AuthBenchOptions, echo: Echo) -> dict[str, Any]:
    """run_auth_bench runs every step and returns the JSON-ready report."""
    h2load_path = h2load.find_h2load()  # fail before building anything when it is missing
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
            "load_generator": _version(h2load_path),
            "auth_processes": len(stack.auth),
        }
        with _bare_server() as floor:
            report["check_levels"] = measure_levels(stack, floor, options, echo)
            report["offered_rate"] = measure_offered_rate(stack, floor, options, echo)
        report["over_admission"] = measure_over_admission(stack, keys, options, echo)
        # Let the bursts' metering and lease returns finish before timing single requests.
        time.sleep(SETTLE_SECONDS)
        report["envoy"] = measure_envoy_overhead(stack, options, echo)
        report["metering"] = asyncio.run(_metering_counts(stack.database_url, stack.envoy_key_id, 15.0))
        echo(f"metering: {report['metering']}")
        report["crash"] = measure_crash_loss(stack, options, echo)
    report["targets"] = [target.as_dict() for target in targets(report)]
    return report


def _version(path: str) -> str:
    """_version is h2load's own version line."""
    completed = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return completed.stdout.strip() or path


_LEVEL_NAMES = (("lean", "lean Check"), ("grpc_aio", "grpc.aio"), ("floor", "bare floor"))


def render_auth_table(report: dict[str, Any]) -> str:
    """render_auth_table formats the report as the text the command prints and BENCHMARKS.md quotes."""
    m = report["machine"]
    options = report["options"]
    lines = [
        f"machine: {m.get('nproc')} cpus, {m.get('cpu_model')}; "
        f"auth log level {options['log_level']}; load from {report.get('load_generator', 'h2load')}",
        "",
        f"Check, closed loop, h2load on the same machine ({options['seconds_per_level']:g} s per run)",
        "target        conc  c x m   checks/s   p50 ms   p99 ms   max ms  server CPU us/check"
        "  pg CPU us/check  admitted/answered",
    ]
    for level in report["check_levels"]:
        shape = f"{level['clients']}x{level['streams']}"
        for name, label in _LEVEL_NAMES:
            part = level[name]
            errors = part["failed"] + part["errored"] + part["timeout"]
            lines.append(
                f"{label:<12} {level['concurrency']:>4}  {shape:>5}  {part['checks_per_s']:>9.0f}"
                f"  {part['p50_ms']:>7.2f}  {part['p99_ms']:>7.2f}  {part['max_ms']:>7.2f}"
                f"  {_us(part['server_cpu_us_per_check']):>19}  {_us(part['postgres_cpu_us_per_check']):>15}"
                f"  {_admitted(part)}" + (f"  ERRORS {errors}" if errors else "")
            )
    costs = [level["lean"]["server_cpu_us_per_check"] for level in report["check_levels"]]
    cheapest = min((cost for cost in costs if cost), default=None)
    if cheapest:
        lines.append(
            f"auth CPU per Check on the lean listener (best level): {cheapest:.0f} us, i.e. at most"
            f" {1e6 / cheapest:.0f} checks/s per core given to the auth process alone"
        )
    lines.append(
        "admitted/answered: the key's usage_count delta (the server's count) / h2load's answers;"
        " cut-off requests may make the first larger"
    )
    rate = report["offered_rate"]
    lines += [
        "",
        f"Check at {rate['offered_per_s']:.0f}/s offered (open loop; h2load times from send, not schedule)",
        f"  {rate['command']}",
        "target         achieved/s   p50 ms   p99 ms   max ms  server CPU us/check  admitted/answered",
    ]
    for name, label in _LEVEL_NAMES:
        part = rate if name == "lean" else rate["compare"][name]
        lines.append(
            f"{label:<12} {part['checks_per_s']:>12.0f}  {part['p50_ms']:>7.2f}  {part['p99_ms']:>7.2f}"
            f"  {part['max_ms']:>7.2f}  {_us(part['server_cpu_us_per_check']):>19}  {_admitted(part)}"
        )
    lines += [
        "",
        "Exactness (bursts over both auth processes, lean and grpc.aio ports)",
    ]
    for name, part in report["over_admission"].items():
        lines.append(
            f"  {name:<6} limit {part['limit']}, {part['requests']} requests: admitted {part['admitted']}, "
            f"over {part['over_admitted']}, under {part['under_admitted']}"
        )
    envoy = report["envoy"]
    lines += ["", f"GET {envoy['path']} through Envoy (keep-alive, one request at a time, rounds alternate)"]
    for name, label in (("h2load", "h2load --h1 -c 1 -m 1"), ("python", "Python http.client")):
        part = envoy[name]
        percent = part["added_p50_percent"]
        lines += [
            f"  {label} ({part['requests_per_side']} requests per side)",
            f"    ext_authz off  p50 {part['off']['p50_ms']:.3f} ms  p99 {part['off']['p99_ms']:.3f} ms"
            f"  statuses {part['off']['statuses']}",
            f"    ext_authz on   p50 {part['on']['p50_ms']:.3f} ms  p99 {part['on']['p99_ms']:.3f} ms"
            f"  statuses {part['on']['statuses']}",
            f"    added          p50 {part['added_p50_ms']:+.3f} ms"
            + ("" if percent is None else f" ({percent:+.0f} %)")
            + f"  p99 {part['added_p99_ms']:+.3f} ms",
        ]
        if "instant" in part:
            floor = part["instant_added_p50_percent"]
            instant = part["instant"]
            lines += [
                f"    instant Check  p50 {instant['p50_ms']:.3f} ms  p99 {instant['p99_ms']:.3f} ms"
                f"  statuses {instant['statuses']}",
                f"    floor added    p50 {part['instant_added_p50_ms']:+.3f} ms"
                + ("" if floor is None else f" ({floor:+.0f} %)")
                + "  (ext_authz to a server that allows at once: Envoy's own round trip)",
            ]
    lines += [
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
        f"{crash['missing']} of {crash['usage_count']} usage rows missing = {window} of traffic "
        f"(of which at most {crash['leased_tokens_at_kill']} leased tokens never used); "
        f"restart took {crash['restart_seconds']:.1f} s; statuses {crash['statuses']}"
    )


def _admitted(part: dict[str, Any]) -> str:
    """_admitted is the server's admissions over h2load's answers, flagged when a sample was denied."""
    if "server_admitted" not in part:
        return "-"
    sampled = part["allowed_before"] and part["allowed_after"]
    return f"{part['server_admitted']}/{part['checks']}" + ("" if sampled else " DENIED sample")


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
