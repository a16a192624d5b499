"""`kotadb bench service`: the search service end to end, in one run on one corpus loaded through ingest.

A `kotadb dev` stack (embedded Postgres, the services, two search replicas, Envoy) is started in
a work directory; the corpus is pushed through the gateway (`kotadb push --prefix NAME`) with a
bench API key, and then:

* first-page latency of every query (one RE2 pattern a line, `--regex`), run `--runs` times on
  each side, after one warm-up: in-process (the engine's Searcher over an offline build of the
  same tree, and the page rendered into the same SearchCodeResponse the service sends: same page
  size, mode, context and lines per file, so both sides do the same work; the engine alone is
  reported too), direct gRPC to the tenant's search replica (the key checked by auth), REST
  through Envoy (`POST /v1/code:search`), and Postgres `pg_trgm` on the very `documents` table ingest wrote
  (`content ~ pattern` with a GIN trigram index the bench creates, what a Supabase user would
  reach for); ratios to in-process per query, with the median and the worst query;
* throughput and latency through REST with 1, 8 and 32 concurrent clients (threads, each with
  its own keep-alive connection, cycling over the queries for `--load-seconds` each), and the
  latency of the search replica's gRPC health check, polled every 50 ms while under that load
  from a process of its own (in the load generator's process the poller would wait for the
  clients' GIL and the figure would be the bench's, not the service's);
* freshness: a REST upsert of a file with a fresh word, then searches for the word every 5 ms
  until it is found: upsert response → visible, p50/p99; and the same search sent at once with
  `min_revision` set to the upsert's revision: its added wait (the response's stats.wait_duration);
* rebuild: the search replica the ring did not give the tenant to has never seen it, so the
  first direct query to it builds the tenant from Postgres (streamed, server-side cursor)
  before answering; that time to serving, with the phases the replica logs (fetch wait,
  adding, final commit, open) and the throughput, next to the offline build of the same tree
  from files (`kotadb index build`). The warm-up also records how long the owner replica took
  to answer its first query through REST (its own build; Envoy answers 504 after 30 s while
  a large tenant builds, and those are retried and counted).

pg_trgm is bounded so that a large corpus cannot hang the run: the GIN index gets
`--pg-trgm-index-timeout` seconds (past it pg_trgm is skipped and reported so) and each query
`--pg-trgm-query-timeout` (a query past it is reported as skipped, with the reason).

Everything but the pg_trgm index is what a user runs; no figure is an assertion. The machine
is shared: the load average before and after is recorded next to the figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import http.client
import json
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kotadb.v1 import search_pb2, search_pb2_grpc

from services.bench.ingest import DevStack, _load, _machine, _push
from services.bench.measure import summarize
from services.bench.pgtrgm import UnsupportedPattern, translate_pattern
from services.bench.search import build_ours, read_queries
from services.bench.servicerebuild import drop_copies, rebuild_from_postgres, render_rebuild, warm_up
from services.cli import keys
from services.common.identity import READ, WRITE
from services.common.stack import StackInfo
from services.search import convert
from services.search.engine.index.index import Index
from services.search.engine.search.results import SearchMode
from services.search.engine.search.searcher import Searcher
from services.search.searches import CodeAnswer

FIRST_PAGE = 50
CONCURRENCY = (1, 8, 32)
HEALTH_POLL = 0.05
FRESHNESS_POLL = 0.005
PUSH_ATTEMPTS = 8
RETRIES = 30


@dataclasses.dataclass(frozen=True)
class ServiceBenchOptions:
    """ServiceBenchOptions are the command's inputs."""

    corpus: Path
    queries: Path
    name: str = "stdlib"
    work_dir: Path | None = None
    runs: int = 5
    load_seconds: float = 10.0
    freshness_samples: int = 50
    pg_trgm_index_timeout: float = 900.0
    pg_trgm_query_timeout: float = 10.0
    tenant: uuid.UUID | None = None
    """tenant reuses a user whose corpus an earlier run in the same work dir pushed (no push)."""


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _summary_ms(samples: list[float]) -> dict[str, float]:
    summary = summarize(samples)
    return {"p50_ms": _ms(summary.p50), "p99_ms": _ms(summary.p99), "max_ms": _ms(summary.max)}


class RestError(OSError):
    """RestError is a REST answer other than 2xx: its status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


class Rest:
    """Rest calls the gateway's REST API with a key, over one keep-alive HTTP/1.1 connection a thread.

    A client that reconnects for every call (urllib) would add its own TCP and Envoy connection
    set-up to every figure; the connection is opened again after any failure.
    """

    def __init__(self, gateway: str, key: str) -> None:
        self.gateway = gateway
        self.key = key
        self._where = urllib.parse.urlsplit(gateway)
        self._local = threading.local()

    retried: int = 0
    """retried counts 503s that were retried (UNAVAILABLE is retryable; the report shows how often)."""

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(
                self._where.hostname or "127.0.0.1", self._where.port, timeout=120
            )
            self._local.conn = conn
        return conn

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 1:
                    raise OSError(f"{method} {path}: {exc!r}") from exc
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {self.key}"}
        if body is not None:
            headers["content-type"] = "application/json"
        for attempt in range(RETRIES):
            status, raw = self._exchange(method, path, body, headers)
            if 200 <= status < 300:
                answer: dict[str, Any] = json.loads(raw)
                return answer
            if status != 503 or attempt == RETRIES - 1:
                raise RestError(status, raw)
            self.retried += 1
            time.sleep(1.0)
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """post sends one JSON request and returns the JSON answer (retrying a 503, raising otherwise)."""
        return self._send("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> dict[str, Any]:
        """get sends one GET and returns the JSON answer (retrying a 503, raising otherwise)."""
        return self._send("GET", path)

    def search(self, pattern: str, **extra: Any) -> dict[str, Any]:
        """search runs one first-page regex search."""
        return self.post(
            "/v1/code:search", {"query": pattern, "regex": True, "pageSize": FIRST_PAGE, **extra}
        )


def _in_process(searcher: Searcher, pattern: str) -> bytes:
    """_in_process is the in-process side of a first page: the engine's search, then the same
    SearchCodeResponse the service renders (convert.py), serialized, so the comparison holds the
    same work on both sides."""
    result = searcher.search(pattern, regex=True, limit_files=FIRST_PAGE, mode=SearchMode.FIRST_PAGE)
    answer = CodeAnswer(result, 0, 0.0)
    return convert.code_answer_to_proto(answer, convert.DEFAULT_MATCHES_PER_FILE).SerializeToString()


def _time(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def _latency(
    queries: list[str],
    runs: int,
    searcher: Searcher,
    stub: search_pb2_grpc.SearchServiceStub,
    key: str,
    rest: Rest,
    pg: Callable[[str], object],
) -> dict[str, Any]:
    """_latency times each query's first page on the four sides and relates them to in-process."""
    metadata = (("authorization", f"Bearer {key}"),)
    rows: list[dict[str, Any]] = []
    for pattern in queries:
        request = search_pb2.SearchCodeRequest(query=pattern, regex=True, page_size=FIRST_PAGE)
        sides: dict[str, Callable[[], object]] = {
            "in_process": functools.partial(_in_process, searcher, pattern),
            "in_process_engine": functools.partial(
                searcher.search, pattern, regex=True, limit_files=FIRST_PAGE, mode=SearchMode.FIRST_PAGE
            ),
            "grpc": functools.partial(stub.SearchCode, request, metadata=metadata, timeout=120),
            "rest": functools.partial(rest.search, pattern),
        }
        try:
            translate_pattern(pattern)
            sides["pg_trgm"] = functools.partial(pg, pattern)
        except UnsupportedPattern:
            pass
        row: dict[str, Any] = {"query": pattern}
        for side, fn in sides.items():
            try:
                row[side] = _summary_ms(_time(fn, runs))["p50_ms"]
            except SideSkipped as exc:
                row[f"{side}_skipped"] = str(exc)
        base = max(row["in_process"], 1e-3)
        for side in ("grpc", "rest", "pg_trgm"):
            if side in row:
                row[f"{side}_ratio"] = round(row[side] / base, 2)
        rows.append(row)
    summary: dict[str, Any] = {}
    for side in _SIDES:
        values = sorted(row[side] for row in rows if side in row)
        if values:
            worst = max(rows, key=lambda r: r.get(side, -1))
            summary[side] = {
                "median": values[len(values) // 2],
                "worst": worst[side],
                "worst_query": worst["query"],
            }
    return {"queries": rows, "summary": summary}


_SIDES = (
    "in_process",
    "in_process_engine",
    "grpc",
    "rest",
    "pg_trgm",
    "grpc_ratio",
    "rest_ratio",
    "pg_trgm_ratio",
)


def _load_test(rest: Rest, queries: list[str], seconds: float, health_address: str) -> list[dict[str, Any]]:
    """_load_test runs REST clients at each concurrency while polling gRPC health; returns one row each."""
    return [_load_level(rest, queries, seconds, health_address, clients) for clients in CONCURRENCY]


def _load_level(
    rest: Rest, queries: list[str], seconds: float, health_address: str, clients: int
) -> dict[str, Any]:
    """_load_level runs `clients` REST clients for `seconds`, polling the replica's gRPC health meanwhile."""
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(index: int) -> None:
        at = index
        while not stop.is_set():
            pattern = queries[at % len(queries)]
            at += 1
            started = time.perf_counter()
            try:
                rest.search(pattern)
            except OSError:
                errors[index] += 1
                continue
            latencies[index].append(time.perf_counter() - started)

    spawn = multiprocessing.get_context("spawn")
    poll_stop = spawn.Event()
    samples: multiprocessing.Queue[Any] = spawn.Queue()
    poller = spawn.Process(target=_poll_health, args=(health_address, poll_stop, samples), daemon=True)
    poller.start()
    _await_ready(poller, samples)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        started = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        poll_stop.set()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
    health = samples.get(timeout=60)
    poller.join(timeout=30)
    done = [sample for per in latencies for sample in per]
    return {
        "clients": clients,
        "requests": len(done),
        "errors": sum(errors),
        "per_second": round(len(done) / elapsed, 1),
        **_summary_ms(done),
        "health": _summary_ms(health),
    }


def _await_ready(poller: Any, samples: Any) -> None:
    """_await_ready waits for the health poller's "ready", failing as soon as the process has died."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if samples.get(timeout=1) == "ready":
                return
        except queue.Empty:
            if not poller.is_alive():
                raise RuntimeError(f"the health poller exited with {poller.exitcode}") from None
    raise RuntimeError("the health poller did not connect in 120 s")


def _poll_health(address: str, stop: Any, out: Any) -> None:
    """_poll_health checks gRPC health every HEALTH_POLL seconds until `stop`, in a process of its own.

    It puts "ready" on `out` once connected, then the list of latencies when stopped.
    """
    samples: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        out.put("ready")
        while not stop.is_set():
            started = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            samples.append(time.perf_counter() - started)
            time.sleep(HEALTH_POLL)
    out.put(samples)


def _freshness(rest: Rest, samples: int) -> dict[str, Any]:
    """_freshness measures upsert → visible (polling) and the wait min_revision adds."""
    visible: list[float] = []
    waits: list[float] = []
    for i in range(samples):
        word = f"fresh{uuid.uuid4().hex[:12]}"
        answer = rest.post(
            "/v1/documents:batchUpsert", {"documents": [{"path": f"fresh/{i}.txt", "text": f"{word}\n"}]}
        )
        written = time.perf_counter()
        while not rest.search(word).get("fileMatches"):
            time.sleep(FRESHNESS_POLL)
        visible.append(time.perf_counter() - written)
        word2 = f"fresh{uuid.uuid4().hex[:12]}"
        answer = rest.post(
            "/v1/documents:batchUpsert", {"documents": [{"path": f"fresh/{i}.txt", "text": f"{word2}\n"}]}
        )
        found = rest.search(word2, minRevision=str(answer["revision"]))
        assert found.get("fileMatches"), "min_revision answered without the write"
        wait = found.get("stats", {}).get("waitDuration", "0s")
        waits.append(float(str(wait).rstrip("s") or 0))
    return {"visible": _summary_ms(visible), "min_revision_wait": _summary_ms(waits), "samples": samples}


def _bench_key(database_url: str, user: uuid.UUID) -> str:
    """_bench_key issues a read+write key for a user of its own (not the demo user, whose
    repository `kotadb dev` is syncing meanwhile: its writes would queue behind that sync's), with
    limits no step reaches."""

    async def issue() -> str:
        created = await keys.create_key(
            database_url,
            name="kotadb bench service",
            permissions=frozenset({READ, WRITE}),
            rate_limit=1_000_000,
            monthly_quota=1_000_000_000,
            user_id=user,
        )
        return created.secret

    return asyncio.run(issue())


class SideSkipped(Exception):
    """SideSkipped marks a side of the latency table that could not answer a query (the reason)."""


async def _pg_setup(
    database_url: str, index_timeout: float, query_timeout: float
) -> tuple[asyncpg.Connection, float, bool]:
    """_pg_setup creates the GIN trigram index within `index_timeout`; returns the connection, the
    seconds taken and whether the index exists. Queries on the connection then stop after
    `query_timeout` (statement_timeout), so no pg_trgm query can hang the run."""
    conn = await asyncpg.connect(database_url)
    await conn.execute("create extension if not exists pg_trgm")
    await conn.execute(f"set statement_timeout = {int(index_timeout * 1000)}")
    started = time.perf_counter()
    try:
        await conn.execute(
            "create index if not exists bench_documents_content_trgm on public.documents"
            " using gin (content gin_trgm_ops)"
        )
        built = True
    except asyncpg.QueryCanceledError:
        built = False  # a cancelled CREATE INDEX leaves nothing behind
    seconds = time.perf_counter() - started
    await conn.execute(f"set statement_timeout = {int(query_timeout * 1000)}")
    return conn, seconds, built


def run_service_bench(options: ServiceBenchOptions, echo: Callable[[str], None]) -> dict[str, Any]:
    """run_service_bench starts the stack, loads the corpus through ingest and measures everything above."""
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="kotadb-bench-service-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o711)  # the embedded Postgres user must traverse to its cluster
    queries = read_queries(options.queries)
    report: dict[str, Any] = {"machine": _machine(), "load_before": _load(), "corpus": options.name}
    env = dict(os.environ)
    env.pop("KOTADB_DATABASE_URL", None)
    stack_dir = work / "dev"
    if options.tenant:
        # Before the replicas start: they reopen what they find on their volume.
        drop_copies(stack_dir, options.tenant)
    dev = DevStack(stack_dir, env, "--search-replicas", "2")
    try:
        stack: StackInfo = dev.wait()
        echo(f"stack up at {stack.gateway}; work dir {work}")
        user = options.tenant or uuid.uuid4()
        key = _bench_key(stack.database_url, user)
        # A push is idempotent (unchanged files are not sent again): on a loaded machine a
        # dropped stream is retried rather than losing the run.
        for attempt in range(0 if options.tenant else PUSH_ATTEMPTS):
            try:
                report["push"] = _push(stack, key, options.name, options.corpus)
                report["push"]["attempts"] = attempt + 1
                break
            except RuntimeError as exc:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                echo(f"push failed, again in 5 s: {str(exc)[-160:]}")
                time.sleep(5)
        if options.tenant:
            report["push"] = {"summary": f"reused tenant {user} (pushed by an earlier run)", "attempts": 0}
        echo(f"pushed: {report['push']['summary']}")
        rest = Rest(stack.gateway, key)
        build, _ = build_ours(
            options.corpus, work / "offline-index", work / "offline-build.log", symbols=True
        )
        report["offline_build_seconds"] = round(build.seconds, 2)
        # Every query once through the gateway: the tenant's replica builds it and catches up.
        report["first_answer"] = warm_up(rest.search, queries)
        echo(f"the owner replica answered first after {report['first_answer']['seconds']} s")

        metadata = (("authorization", f"Bearer {key}"),)
        # The ring gave the tenant to one replica (GetIndexStatus names it); the other has never
        # built it, so its first answer includes the whole build from Postgres.
        owner = rest.get("/v1/index")["replica"]
        cold_name = "search" if owner == "search-2" else "search-2"
        report["replicas"] = {"owner": owner, "rebuilt_on": cold_name}
        report["rebuild"] = rebuild_from_postgres(stack, cold_name, metadata, user, stack_dir, build.seconds)
        report["rebuild_from_postgres_seconds"] = report["rebuild"]["seconds"]
        echo(f"rebuild from Postgres {report['rebuild']}, offline build {build.seconds:.1f} s")

        loop = asyncio.new_event_loop()
        conn, index_seconds, indexed = loop.run_until_complete(
            _pg_setup(stack.database_url, options.pg_trgm_index_timeout, options.pg_trgm_query_timeout)
        )
        report["pg_trgm_index_seconds"] = round(index_seconds, 2)
        report["pg_trgm_index_built"] = indexed
        echo(f"pg_trgm GIN index: {'built' if indexed else 'not built'} in {index_seconds:.1f} s")

        def pg(pattern: str) -> object:
            if not indexed:
                raise SideSkipped(f"no GIN index (creation passed {options.pg_trgm_index_timeout:g} s)")
            try:
                return loop.run_until_complete(
                    conn.fetch(
                        "select path from public.documents where user_id = $1 and content ~ $2"
                        " and deleted_at is null limit $3",
                        user,
                        translate_pattern(pattern),
                        FIRST_PAGE,
                    )
                )
            except asyncpg.QueryCanceledError:
                raise SideSkipped(f"timeout ({options.pg_trgm_query_timeout:g} s)") from None

        with (
            Index.open(work / "offline-index") as index,
            grpc.insecure_channel(stack.grpc[owner]) as channel,
        ):
            searcher = Searcher(index)
            stub = search_pb2_grpc.SearchServiceStub(channel)
            report["latency"] = _latency(queries, options.runs, searcher, stub, key, rest, pg)
        echo("latency done")
        loop.run_until_complete(conn.close())
        loop.close()
        report["load"] = _load_test(rest, queries, options.load_seconds, stack.grpc[owner])
        echo("load done")
        report["freshness"] = _freshness(rest, options.freshness_samples)
        echo("freshness done")
        report["rest_503_retries"] = rest.retried
    finally:
        dev.stop()
        report["load_after"] = _load()
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def render_service_table(report: dict[str, Any]) -> str:
    """render_service_table is the report as the Markdown BENCHMARKS.md records."""
    lines = [
        f"machine: {report['machine']}",
        f"load average before {report['load_before']}, after {report.get('load_after')}",
        "",
        "| first page | median p50 ms | worst p50 ms | worst query |",
        "|---|---|---|---|",
    ]
    summary = report["latency"]["summary"]
    for side in _SIDES:
        if side in summary:
            row = summary[side]
            lines.append(f"| {side} | {row['median']} | {row['worst']} | `{row['worst_query']}` |")
    lines += ["", "| REST clients | req/s | p50 ms | p99 ms | errors | health p50 ms | health p99 ms |"]
    lines.append("|---|---|---|---|---|---|---|")
    for row in report["load"]:
        health = row["health"]
        lines.append(
            f"| {row['clients']} | {row['per_second']} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']}"
            f" | {health['p50_ms']} | {health['p99_ms']} |"
        )
    fresh = report["freshness"]
    lines += [
        "",
        f"freshness (upsert → visible, {fresh['samples']} samples): p50 {fresh['visible']['p50_ms']} ms,"
        f" p99 {fresh['visible']['p99_ms']} ms",
        f"min_revision added wait: p50 {fresh['min_revision_wait']['p50_ms']} ms,"
        f" p99 {fresh['min_revision_wait']['p99_ms']} ms",
        f"rebuild from Postgres to serving {report['rebuild_from_postgres_seconds']} s;"
        f" offline build from files {report['offline_build_seconds']} s;"
        f" pg_trgm GIN index {report['pg_trgm_index_seconds']} s"
        f"{'' if report.get('pg_trgm_index_built', True) else ' (not built: pg_trgm skipped)'}",
        *render_rebuild(report),
        f"REST answers 503 (retried after 1 s, inside the timings): {report.get('rest_503_retries', 0)}",
    ]
    return "\n".join(lines)
