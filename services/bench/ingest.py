"""`kotadb bench ingest`: how fast code gets into KotaDB, next to the limits, in one run.

One `kotadb dev` stack (its own embedded Postgres under the work dir, every part on a free port)
serves every step, with a bench API key whose rate limit no step reaches:

1. Bulk push. For each corpus, `kotadb push DIR --prefix NAME` exactly as a user runs it (a
   child process: walk, hash map, StreamUpsertDocuments through Envoy, symbols extracted and
   committed by the ingest service). Figures: documents/s and MB/s of content committed, from
   the documents table (not the client's counts).
2. The physical limit, in the same run: the same files (the same walk rules) read and loaded with
   Postgres `COPY` into a plain table (path, content) with no index, no trigger, no symbols.
3. The offline engine build of the same tree (`kotadb index build`, symbols included), which
   writes segments without any database.
4. Webhook → job finished p50/p99 over 20 signed one-file pushes, claim overhead (no-op jobs/s
   with 4 workers) and NOTIFY's cost under concurrent writers (services/bench/ingestqueue.py).

A corpus is `NAME=DIR`; `--subset NAME=a,b` pushes only those top-level directories of it (laid
out as one tree of hard links, pushed once under NAME/), for trees too large to push whole on a
shared machine. The
report says what was pushed. Everything runs once: figures on a busy machine are noted with the
load average, never retried until they look good.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from services.bench import ingestqueue
from services.cli import keys
from services.cli.push import worker_rules
from services.common.identity import READ, WRITE
from services.common.stack import STACK_FILE, StackInfo
from services.ingest.walk import FileEntry, read_file, walk

MB = 1_000_000
# Seconds `kotadb dev` may take to come up on a loaded machine (first run creates the cluster).
STACK_LIMIT = 300.0


@dataclasses.dataclass(frozen=True)
class IngestBenchOptions:
    """IngestBenchOptions says which corpora to push and how long the queue steps run."""

    corpora: dict[str, Path]
    subsets: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    work_dir: Path | None = None
    webhook_pushes: int = 20
    claim_jobs: int = 2000
    claim_workers: int = 4
    notify_writers: tuple[int, ...] = (1, 4, 16, 64)
    notify_seconds: float = 3.0
    engine_build: bool = True


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version()}


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _link_or_copy(source: str, target: str) -> None:
    """_link_or_copy hard-links a file into a subset tree, or copies it across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _trees(name: str, root: Path, subsets: dict[str, list[str]], work: Path) -> list[tuple[str, Path]]:
    """_trees is the (prefix, directory) pairs pushed for one corpus: one tree per corpus.

    A subset is laid out as one tree under the work dir (hard links, so nothing is copied on the
    same file system) holding only the chosen top-level directories, and pushed with one
    `kotadb push` as a user would push a tree: six pushes of six directories would each pay the
    command's start-up (~1 s), which is no part of the ingest path being measured.
    """
    chosen = subsets.get(name)
    if not chosen:
        return [(name, root)]
    tree = work / f"subset-{name}"
    for part in chosen:
        shutil.copytree(root / part, tree / part, symlinks=True, copy_function=_link_or_copy)
    return [(name, tree)]


class DevStack:
    """DevStack is a `kotadb dev` child on free ports, with its data under the work dir."""

    def __init__(self, data_dir: Path, env: dict[str, str], *extra: str) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "dev.out"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "dev",
                    "--data-dir",
                    str(data_dir),
                    "--gateway-port",
                    "0",
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def wait(self) -> StackInfo:
        """wait returns the stack's info once it is up and its demo repository indexed."""
        deadline = time.monotonic() + STACK_LIMIT
        path = self.data_dir / STACK_FILE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kotadb dev exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            if path.exists() and "Ctrl-C stops everything." in self.log_path.read_text(errors="replace"):
                return StackInfo.load(path)
            time.sleep(0.5)
        raise RuntimeError(f"kotadb dev did not come up in {STACK_LIMIT:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """stop ends the stack (SIGTERM, then SIGKILL after a minute)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _bench_key(database_url: str) -> str:
    """_bench_key issues a read+write key with limits no step of the bench reaches."""

    async def issue() -> str:
        created = await keys.create_key(
            database_url,
            name="kotadb bench ingest",
            permissions=frozenset({READ, WRITE}),
            rate_limit=100_000,
            monthly_quota=100_000_000,
        )
        return created.secret

    return asyncio.run(issue())


# Process roles the push's CPU time is reported by, matched on the command line in this order.
_ROLES = (
    ("symbol workers", "multiprocessing.forkserver"),
    ("ingest", "serve ingest"),
    ("search", "serve search"),
    ("auth", "serve auth"),
    ("envoy", "envoy"),
    ("postgres", "postgres"),
)


def _processes() -> dict[int, tuple[int, str, float]]:
    """_processes maps every visible pid to (parent pid, command line, CPU seconds so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) / tick)
    return found


def stack_cpu(roots: list[int]) -> dict[str, float]:
    """stack_cpu is the CPU seconds used so far by the process trees under `roots`, by role.

    The dev stack's processes and the embedded Postgres (re-parented to init, hence its own
    root) are summed by role (`_ROLES`), so a step's CPU time per role is the difference of
    two calls: figures that hold on a shared machine, where wall-clock time depends on what else
    runs. Processes that exited in between are not counted (the stack's all live through a push).
    """
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    totals: dict[str, float] = {}
    pending = [pid for pid in roots if pid in processes]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        _, command, seconds = processes[pid]
        role = next((name for name, marker in _ROLES if marker in command), "other")
        totals[role] = totals.get(role, 0.0) + seconds
    return totals


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        role: round(after[role] - before.get(role, 0.0), 2)
        for role in after
        if after[role] > before.get(role, 0.0)
    }


async def _postmaster(database_url: str) -> int:
    """_postmaster is the pid of the stack's Postgres server (the parent of a backend)."""
    conn = await asyncpg.connect(database_url)
    try:
        backend = int(await conn.fetchval("select pg_backend_pid()"))
        # Read while the backend lives: it exits with the connection.
        stat = (Path("/proc") / str(backend) / "stat").read_text()
    finally:
        await conn.close()
    return int(stat.rsplit(")", 1)[1].split()[1])


_PHASE_SUM = re.compile(r'^kotadb_ingest_batch_phase_seconds_sum\{phase="(\w+)"\} (\S+)$', re.MULTILINE)


def batch_phases(stack: StackInfo) -> dict[str, float]:
    """batch_phases is the ingest service's seconds per batch phase so far (its /metrics), {} if unreachable.

    Summed over batches; pipelined batches overlap, so the phases add up to more than the wall
    time (services/ingest/batchtiming.py).
    """
    url = stack.metrics.get("ingest")
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError:
        return {}
    return {phase: float(value) for phase, value in _PHASE_SUM.findall(text)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _push(stack: StackInfo, key: str, prefix: str, tree: Path) -> dict[str, Any]:
    env = dict(os.environ, KOTADB_URL=stack.gateway, KOTADB_API_KEY=key)
    env.pop("KOTADB_DATABASE_URL", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "push", str(tree), "--prefix", prefix],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"kotadb push {tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = done.stdout.splitlines()[0] if done.stdout else ""
    return {"prefix": prefix, "seconds": seconds, "summary": summary}


async def _stored(database_url: str, prefix: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "select count(*) as documents, coalesce(sum(octet_length(content)), 0) as bytes,"
            " (select count(*) from public.symbols s join public.documents d2 on d2.id = s.document_id"
            "   where d2.path like $1 and d2.repository_id is null and d2.deleted_at is null) as symbols"
            " from public.documents where path like $1 and repository_id is null and deleted_at is null",
            f"{prefix}/%",
        )
    finally:
        await conn.close()
    assert row is not None
    return {"documents": int(row["documents"]), "bytes": int(row["bytes"]), "symbols": int(row["symbols"])}


def _files(tree: Path) -> list[tuple[str, str]]:
    """_files reads the tree with the push's rules: (path, text) of every file a push sends."""
    rules = worker_rules()
    found: list[tuple[str, str]] = []
    for entry in walk(tree, rules):
        if isinstance(entry, FileEntry):
            content = read_file(tree, entry.path, rules)
            if isinstance(content, bytes):
                found.append((entry.path, content.decode("utf-8")))
    return found


async def _copy(database_url: str, trees: list[tuple[str, Path]]) -> dict[str, Any]:
    """_copy reads the trees and COPYs them into a fresh plain table; timed from the first read."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "drop table if exists bench_copy; create table bench_copy (path text, content text)"
        )
        started = time.perf_counter()
        documents = 0
        size = 0
        for prefix, tree in trees:
            rows = await asyncio.to_thread(_files, tree)
            documents += len(rows)
            size += sum(len(text.encode("utf-8")) for _, text in rows)
            await conn.copy_records_to_table(
                "bench_copy", records=[(f"{prefix}/{path}", text) for path, text in rows]
            )
        seconds = time.perf_counter() - started
        await conn.execute("drop table bench_copy")
    finally:
        await conn.close()
    return {"documents": documents, "bytes": size, "seconds": seconds}


def _engine_build(trees: list[tuple[str, Path]], out: Path) -> dict[str, Any]:
    seconds = 0.0
    for index, (_, tree) in enumerate(trees):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "index",
                "build",
                str(tree),
                "--out",
                str(out / str(index)),
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        seconds += time.perf_counter() - started
    return {"seconds": seconds}


def run_ingest_bench(options: IngestBenchOptions, echo: Callable[[str], None]) -> dict[str, Any]:
    """run_ingest_bench runs every step once on one stack and returns the report."""
    work = Path(tempfile.mkdtemp(prefix="kotadb-bench-ingest-", dir=options.work_dir))
    work.chmod(0o711)  # the embedded Postgres runs as an unprivileged user that must reach its dir
    env = dict(os.environ)
    env.pop("KOTADB_DATABASE_URL", None)
    report: dict[str, Any] = {"machine": _machine(), "load_before": _load(), "corpora": {}}
    stack_process = DevStack(work / "dev", env)
    try:
        stack = stack_process.wait()
        echo(f"stack up at {stack.gateway}; work dir {work}")
        key = _bench_key(stack.database_url)
        roots = [stack_process.process.pid, asyncio.run(_postmaster(stack.database_url))]
        for name, root in options.corpora.items():
            trees = _trees(name, root, options.subsets, work)
            echo(f"{name}: pushing {', '.join(str(tree) for _, tree in trees)}")
            load = _load()
            cpu_before, client_before, phases_before = stack_cpu(roots), _children_cpu(), batch_phases(stack)
            pushes = [_push(stack, key, prefix, tree) for prefix, tree in trees]
            cpu = _cpu_delta(cpu_before, stack_cpu(roots))
            cpu["push client"] = round(_children_cpu() - client_before, 2)
            phases = _cpu_delta(phases_before, batch_phases(stack))
            push_seconds = sum(push["seconds"] for push in pushes)
            stored = asyncio.run(_stored(stack.database_url, name))
            echo(f"{name}: copying the same files")
            copied = asyncio.run(_copy(stack.database_url, trees))
            entry: dict[str, Any] = {
                "trees": [str(tree) for _, tree in trees],
                "load_during_push": load,
                "push": {
                    "seconds": push_seconds,
                    **stored,
                    "documents_per_s": stored["documents"] / push_seconds,
                    "mb_per_s": stored["bytes"] / MB / push_seconds,
                    "summaries": [push["summary"] for push in pushes],
                    "load_after": _load(),
                    "cpu_seconds": cpu,
                    "batch_phase_seconds": phases,
                },
                "copy": {**copied, "mb_per_s": copied["bytes"] / MB / copied["seconds"]},
            }
            if options.engine_build:
                echo(f"{name}: offline engine build")
                built = _engine_build(trees, work / f"index-{name}")
                entry["engine_build"] = {**built, "mb_per_s": stored["bytes"] / MB / built["seconds"]}
            report["corpora"][name] = entry
            push_rate, copy_rate = entry["push"]["mb_per_s"], entry["copy"]["mb_per_s"]
            echo(f"{name}: push {push_rate:.1f} MB/s, COPY {copy_rate:.1f} MB/s")
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "webhook": lambda: ingestqueue.webhook_latency(
                stack.gateway, key, work, options.webhook_pushes, echo
            ),
            "claim": lambda: ingestqueue.claim_overhead(
                stack.database_url, options.claim_jobs, options.claim_workers
            ),
            "notify": lambda: ingestqueue.notify_cost(
                stack.database_url, list(options.notify_writers), options.notify_seconds
            ),
        }
        for step, measure in steps.items():
            echo(f"{step}: measuring")
            try:
                report[step] = measure() | {"load": _load()}
            except Exception as exc:  # one failed step is reported; the others still run
                report[step] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                echo(f"{step} failed: {report[step]['error']}")
    finally:
        stack_process.stop()
    report["load_after"] = _load()
    return report


def size_mb(step: dict[str, Any]) -> float:
    """size_mb is a step's content size in MB (10^6 bytes)."""
    return float(step["bytes"]) / MB


def render_ingest_table(report: dict[str, Any]) -> str:
    """render_ingest_table formats the report as the text the command prints."""
    machine = report["machine"]
    lines = [
        f"machine: {machine['nproc']} cpus, {machine['cpu_model']}; load before {report['load_before']},"
        f" after {report['load_after']}",
        "",
        "corpus        step            docs      MB     seconds   docs/s    MB/s",
    ]
    for name, entry in report["corpora"].items():
        push, copy = entry["push"], entry["copy"]
        rows = [
            ("push+symbols", push["documents"], push["bytes"], push["seconds"]),
            ("COPY", copy["documents"], copy["bytes"], copy["seconds"]),
        ]
        if "engine_build" in entry:
            rows.append(("engine build", push["documents"], push["bytes"], entry["engine_build"]["seconds"]))
        for step, docs, size, seconds in rows:
            lines.append(
                f"{name:<13} {step:<14} {docs:>6} {size / MB:>7.1f} {seconds:>10.2f}"
                f" {docs / seconds:>8.0f} {size / MB / seconds:>7.2f}"
            )
        ratio = push["seconds"] / copy["seconds"]
        lines.append(f"{'':<13} push takes {ratio:.1f}x COPY's time; {push['symbols']} symbols stored")
        if "cpu_seconds" in push:
            cpu = push["cpu_seconds"]
            total = sum(cpu.values())
            parts = ", ".join(
                f"{role} {seconds:.1f}" for role, seconds in sorted(cpu.items(), key=lambda x: -x[1])
            )
            lines.append(
                f"{'':<13} push CPU {total:.1f} s ({size_mb(push) / total:.2f} MB per CPU-second;"
                f" load {push.get('load_after', '?')} after): {parts}"
            )
        if push.get("batch_phase_seconds"):
            phased = ", ".join(
                f"{phase} {seconds:.1f}" for phase, seconds in push["batch_phase_seconds"].items()
            )
            lines.append(f"{'':<13} batch phases (s, summed over batches): {phased}")
    lines.append("")
    webhook, claim, notify = report["webhook"], report["claim"], report["notify"]
    if "error" in webhook:
        lines.append(f"webhook → job finished: failed: {webhook['error']}")
    else:
        hook = webhook["job_finished_ms"]
        lines.append(
            f"webhook → job finished ({len(webhook['samples_ms'])} of {webhook['pushes']} pushes): p50"
            f" {hook['p50_ms']:.0f} ms, p99 {hook['p99_ms']:.0f} ms, max {hook['max_ms']:.0f} ms"
        )
        lines += [f"  failed: {error}" for error in webhook["errors"]]
    if "error" in claim:
        lines.append(f"claim overhead: failed: {claim['error']}")
    else:
        lines.append(
            f"claim overhead: {claim['jobs_per_s']:.0f} no-op jobs/s with {claim['workers']} workers"
        )
    if "error" in notify:
        lines.append(f"NOTIFY: failed: {notify['error']}")
    else:
        lines.append(f"NOTIFY ({notify['settings']}):")
        for run in notify["runs"]:
            state = "on " if run["notify"] else "off"
            lines.append(
                f"  {run['writers']:>3} writers, notify {state}: {run['commits_per_s']:>8.0f} commits/s"
            )
    return "\n".join(lines)


def parse_pairs(values: list[str], what: str) -> dict[str, str]:
    """parse_pairs turns `NAME=VALUE` arguments into a dict (a bad one raises ValueError)."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not rest:
            raise ValueError(f"{what} must be NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def write_report(report: dict[str, Any], out: Path) -> None:
    """write_report writes the JSON report."""
    out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
