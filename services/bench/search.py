"""`kotadb bench search`: our index against codesearch, ripgrep and pg_trgm, in one run.

Order of work, so that every figure is taken on the same machine state:

1. Build: our index in a child process (`kotadb index build`, so its peak RSS is the
   child's own) twice: first with `--no-symbols` ("kotadb-index": trigrams, postings and
   stored content, what cindex does, so the throughput comparison is like for like), then
   the real index with symbols ("kotadb", the honest total, which the queries use);
   "kotadb-symbols" is the difference, the cost tree-sitter adds. Then codesearch's index
   with `cindex` and, unless disabled, the pg_trgm table and GIN index in a throwaway
   Postgres.
2. Symbol extraction throughput over both cores on a sample of the corpus's files in
   languages with symbols (tree-sitter dominates build cost, so it is reported apart).
3. Queries: for every pattern, one untimed warm-up of each side, then `runs` timed runs of
   each column, in two groups reported side by side:

   * warm, in this process on an opened index, as the search service runs: our first page
     (50 files, FIRST_PAGE mode), our ranked exhaustive search (every matching file and
     line as result objects), our stream (every matching line rendered as `--all` prints
     it) and our count (exact totals only);
   * processes, a new one per query, as a user at a shell runs them: our CLI
     (`kotadb index search IDX --regex --all`, every matching line; and `--count`), csearch
     (`csearch -n`), ripgrep (every matching line; and `rg -c`), pg_trgm (matching files).

Every table ends with the median and the worst query of each column. Times are wall-clock,
page cache warm. With `index` set the given index is queried and nothing of ours is built.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg

from services.bench.codesearch import CodesearchPeer
from services.bench.measure import PeerBuild, ProcessRun, run_process, summarize
from services.bench.pgtrgm import PgTrgmPeer
from services.bench.report import MIB, Target, machine, median_or_none, ratio
from services.bench.ripgrep import RipgrepPeer
from services.bench.searchcold import CliPeer, RipgrepCountPeer, render_stream
from services.search.engine.index.build import walk_sources
from services.search.engine.index.index import Index
from services.search.engine.languages import detect_language
from services.search.engine.search.results import SearchMode, SearchResult
from services.search.engine.search.searcher import Searcher
from services.search.engine.symbols.symbolpool import SymbolExtractor

FIRST_PAGE_FILES = 50
T = TypeVar("T")


class Peer(Protocol):
    """Peer is a tool measured side by side with us: it answers one pattern at a time."""

    name: str

    def query(self, pattern: str) -> ProcessRun:
        """query runs one search and reports its time and output size."""
        ...

    def supports(self, pattern: str) -> bool:
        """supports reports whether the peer can run pattern with RE2's meaning."""
        ...


def _first_page(searcher: Searcher, pattern: str) -> SearchResult:
    return searcher.search(pattern, regex=True, limit_files=FIRST_PAGE_FILES, mode=SearchMode.FIRST_PAGE)


def _exhaustive(searcher: Searcher, pattern: str) -> SearchResult:
    # Every matching line, as the peers print them; enclosing symbols are not looked up.
    return searcher.search(
        pattern, regex=True, limit_files=None, mode=SearchMode.EXHAUSTIVE, with_symbols=False
    )


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """BenchOptions are the command's inputs."""

    corpus: Path
    queries: Sequence[Path]
    work_dir: Path | None = None
    runs: int = 5
    with_pg: bool = True
    with_ripgrep: bool = True
    with_codesearch: bool = True
    symbol_sample_bytes: int = 100 * MIB
    processes: int = 2
    keep: bool = False
    index: Path | None = None


def read_queries(path: Path) -> list[str]:
    """read_queries returns the non-empty, non-comment lines of a query file."""
    lines = path.read_text("utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def build_ours(
    corpus: Path, out: Path, log: Path, *, symbols: bool = True
) -> tuple[PeerBuild, dict[str, int]]:
    """build_ours runs `kotadb index build` as a child and measures time, size and peak RSS."""
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "services.cli", "index", "build", str(corpus), "--out", str(out)]
    if not symbols:
        argv.append("--no-symbols")
    run = run_process(argv, measure_rss=True, stderr_path=log)
    with Index.open(out) as index:
        parts = index.stats().bytes_by_part
    return PeerBuild(run.seconds, sum(parts.values()), run.peak_rss_bytes), parts


def measure_symbols(corpus: Path, sample_bytes: int, workers: int = 2) -> dict[str, Any]:
    """measure_symbols times tree-sitter extraction over both cores on a sample of the corpus.

    The sample is the first `sample_bytes` (in walk order) of files whose language has
    symbol support; reading happens before the clock starts.
    """
    items: list[tuple[bytes, str]] = []
    total = 0
    for source in walk_sources(corpus):
        if source.size > 1 << 20:
            continue
        language = detect_language(source.path)
        if language not in {
            "python",
            "javascript",
            "typescript",
            "tsx",
            "go",
            "rust",
            "java",
            "c",
            "cpp",
            "ruby",
        }:
            continue
        with open(corpus / source.path, "rb") as fh:
            content = fh.read()
        items.append((content, detect_language(source.path, content[:16384])))
        total += len(content)
        if total >= sample_bytes:
            break
    started = time.perf_counter()
    with SymbolExtractor(workers) as extractor:
        count = sum(len(symbols) for symbols in extractor.map(items))
    seconds = time.perf_counter() - started
    return {
        "files": len(items),
        "bytes": total,
        "symbols": count,
        "seconds": seconds,
        "workers": workers,
        "mb_per_s": total / seconds / 1e6 if seconds > 0 else 0.0,
    }


def _samples(fn: Callable[[], T], runs: int) -> tuple[list[float], T]:
    # The first call warms the page cache, lazily verified blocks and compiled patterns.
    times: list[float] = []
    last = fn()
    for _ in range(runs):
        started = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - started)
    return times, last


def run_bench(options: BenchOptions, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """run_bench performs a whole benchmark run and returns the report dict."""
    corpus = options.corpus.resolve()
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="kotadb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    queries = [pattern for path in options.queries for pattern in read_queries(path)]
    sources = walk_sources(corpus)
    corpus_bytes = sum(s.size for s in sources)
    report: dict[str, Any] = {
        "machine": machine(),
        "corpus": {"path": str(corpus), "files": len(sources), "bytes": corpus_bytes},
        "runs": options.runs,
        "first_page_files": FIRST_PAGE_FILES,
        "build": {},
        "notes": [],
    }
    peers: list[Peer] = []
    pg: PgTrgmPeer | None = None
    try:
        index_dir = options.index.resolve() if options.index is not None else work / "kotadb-index"
        if options.index is None:
            _build_ours(report, corpus, work, corpus_bytes, echo)
        else:
            report["notes"].append(f"queried the existing index {index_dir}; our build was not measured")
        if options.with_codesearch:
            echo("building codesearch index ...")
            cs = CodesearchPeer(corpus, work)
            built = cs.build()
            report["build"]["csearch"] = {
                "seconds": built.seconds,
                "throughput_mb_s": corpus_bytes / built.seconds / 1e6,
                "peak_rss_bytes": built.peak_rss_bytes,
                "index_bytes": built.index_bytes,
            }
            peers.append(cs)
        peers.append(CliPeer(index_dir, mode="all"))
        peers.append(CliPeer(index_dir, mode="count"))
        peers.append(CliPeer(index_dir, mode="page"))
        if options.with_ripgrep:
            peers.append(RipgrepPeer(corpus))
            peers.append(RipgrepCountPeer(corpus))
        if options.with_pg:
            echo("loading pg_trgm (throwaway Postgres) ...")
            pg = PgTrgmPeer(corpus, work / "pg")
            try:
                built = pg.build()
            except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
                # A missing or broken Postgres costs the pg_trgm column, not the whole run.
                report["notes"].append(f"pg_trgm skipped: {exc}")
                pg.close()
                pg = None
        if pg is not None:
            report["build"]["pg_trgm"] = {
                "seconds": built.seconds,
                "throughput_mb_s": None,
                "peak_rss_bytes": None,
                "index_bytes": built.index_bytes,
                **built.detail,
            }
            peers.append(pg)
            report["notes"].append(
                "pg_trgm answers which files match (select path ... where content ~ $1), not which lines"
            )
        if options.index is None and options.symbol_sample_bytes > 0:
            echo("measuring symbol extraction ...")
            report["symbols"] = measure_symbols(corpus, options.symbol_sample_bytes)
        report["peer_names"] = [p.name for p in peers]
        report["searcher_processes"] = options.processes
        report["load_before"] = os.getloadavg()
        report["queries"] = _run_queries(index_dir, queries, peers, options.runs, options.processes, echo)
        report["load_after"] = os.getloadavg()
        _summarise(report, corpus_bytes)
    finally:
        if pg is not None:
            pg.close()
        if not options.keep and options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _build_ours(
    report: dict[str, Any], corpus: Path, work: Path, corpus_bytes: int, echo: Callable[[str], None]
) -> None:
    """_build_ours builds our index without and then with symbols, recording both."""
    echo(f"building kotadb index of {corpus} without symbols ...")
    plain, plain_parts = build_ours(
        corpus, work / "kotadb-index-nosym", work / "kotadb-build-nosym.log", symbols=False
    )
    shutil.rmtree(work / "kotadb-index-nosym", ignore_errors=True)
    report["build"]["kotadb-index"] = {
        "seconds": plain.seconds,
        "throughput_mb_s": corpus_bytes / plain.seconds / 1e6,
        "peak_rss_bytes": plain.peak_rss_bytes,
        "index_bytes": plain.index_bytes,
        "parts": plain_parts,
    }
    echo(f"building kotadb index of {corpus} with symbols ...")
    ours, parts = build_ours(corpus, work / "kotadb-index", work / "kotadb-build.log")
    report["build"]["kotadb-symbols"] = {
        "seconds": max(0.0, ours.seconds - plain.seconds),
        "throughput_mb_s": None,
        "peak_rss_bytes": None,
        "index_bytes": parts.get("symbols", 0),
    }
    report["build"]["kotadb"] = {
        "seconds": ours.seconds,
        "throughput_mb_s": corpus_bytes / ours.seconds / 1e6,
        "peak_rss_bytes": ours.peak_rss_bytes,
        "index_bytes": ours.index_bytes,
        "parts": parts,
    }


def _run_queries(
    index_dir: Path,
    queries: Sequence[str],
    peers: Sequence[Peer],
    runs: int,
    processes: int,
    echo: Callable[[str], None],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    index = Index.open(index_dir)
    searcher = Searcher(index, processes=processes)
    try:
        for pattern in queries:
            echo(f"query {pattern!r} ...")
            first_times, _ = _samples(partial(_first_page, searcher, pattern), runs)
            exh_times, exh = _samples(partial(_exhaustive, searcher, pattern), runs)
            stream_times, _ = _samples(partial(render_stream, searcher, pattern, lines=True), runs)
            count_times, _ = _samples(partial(render_stream, searcher, pattern, lines=False), runs)
            row: dict[str, Any] = {
                "pattern": pattern,
                "files": exh.file_count,
                "lines": exh.match_count,
                "candidates": exh.stats.candidates,
                "scan_fallback": exh.stats.scan_fallback,
                "plan": exh.stats.plan,
                "first_page": summarize(first_times).as_dict(),
                "first_page_samples_ms": [t * 1e3 for t in first_times],
                "exhaustive": summarize(exh_times).as_dict(),
                "stream": summarize(stream_times).as_dict(),
                "count": summarize(count_times).as_dict(),
                "peers": {},
                "ratios": {},
            }
            for peer in peers:
                if not peer.supports(pattern):
                    continue
                peer_times, peer_run = _samples(partial(peer.query, pattern), runs)
                row["peers"][peer.name] = {**summarize(peer_times).as_dict(), "lines": peer_run.output_lines}
            row["ratios"] = _ratios(row)
            row["differences_ms"] = _differences(row)
            rows.append(row)
    finally:
        searcher.close()
        index.close()
    return rows


# (name, numerator, denominator) of each ratio a query row reports; a name is "ours / theirs".
# The numerators are our figures in the same setting as the peer's: a process against
# processes, the warm searcher against the warm searcher.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("cli / csearch", "kotadb-cli", "csearch"),
    ("cli / ripgrep", "kotadb-cli", "ripgrep"),
    ("cli count / ripgrep", "kotadb-cli-count", "ripgrep"),
    ("cli count / rg -c", "kotadb-cli-count", "ripgrep-count"),
    ("warm stream / ripgrep", "stream", "ripgrep"),
    ("warm exhaustive / csearch", "exhaustive", "csearch"),
)


def _column_ms(row: dict[str, Any], column: str) -> float | None:
    """_column_ms is a row's median time of one column (ours or a peer's), in ms."""
    entry = row.get(column) if column in ("first_page", "exhaustive", "stream", "count") else None
    if entry is None:
        entry = row.get("peers", {}).get(column)
    if not entry:
        return None
    value = entry.get("p50_ms")
    return None if value is None else float(value)


# Differences in ms, ours minus the peer's, for the bound "at most the peer's time plus Python's
# own start-up": a ratio hides it where the peer answers in a few ms.
DIFFERENCES: tuple[tuple[str, str, str], ...] = (
    ("cli - csearch", "kotadb-cli", "csearch"),
    ("page - csearch", "kotadb-cli-page", "csearch"),
)


def _ratios(row: dict[str, Any]) -> dict[str, float | None]:
    return {name: ratio(_column_ms(row, ours), _column_ms(row, theirs)) for name, ours, theirs in RATIOS}


def _differences(row: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, ours, theirs in DIFFERENCES:
        a, b = _column_ms(row, ours), _column_ms(row, theirs)
        out[name] = None if a is None or b is None else a - b
    return out


def _summarise(report: dict[str, Any], corpus_bytes: int) -> None:
    rows = report["queries"]
    peers = report.get("peer_names", [])
    first_samples = [s for row in rows for s in row["first_page_samples_ms"]]
    first_p50s = [row["first_page"]["p50_ms"] for row in rows]
    medians: dict[str, Any] = {
        "first_page_p50_ms": statistics.median(first_samples) if first_samples else None,
        "first_page_p99_ms": summarize([s / 1e3 for s in first_samples]).p99 * 1e3 if first_samples else None,
        "first_page_median_of_p50_ms": statistics.median(first_p50s) if first_p50s else None,
        "peers_ms": {},
        "ratios": {},
    }
    for peer in peers:
        medians["peers_ms"][peer] = median_or_none([row["peers"].get(peer, {}).get("p50_ms") for row in rows])
    worst: dict[str, Any] = {"ms": {}, "ratios": {}}
    for column in ("first_page", "exhaustive", "stream", "count", *peers):
        values = [v for v in (_column_ms(row, column) for row in rows) if v is not None]
        medians.setdefault("ms", {})[column] = statistics.median(values) if values else None
        worst["ms"][column] = max(values) if values else None
    for name, _, _ in RATIOS:
        values = [v for v in (row["ratios"].get(name) for row in rows) if v is not None]
        medians["ratios"][name] = statistics.median(values) if values else None
        worst["ratios"][name] = max(values) if values else None
    medians["differences_ms"], worst["differences_ms"] = {}, {}
    for name, _, _ in DIFFERENCES:
        values = [v for v in (row.get("differences_ms", {}).get(name) for row in rows) if v is not None]
        medians["differences_ms"][name] = statistics.median(values) if values else None
        worst["differences_ms"][name] = max(values) if values else None
    report["medians"] = medians
    report["worst"] = worst
    build = report["build"]
    ours = build.get("kotadb")
    targets = [
        Target(
            "cli --all: median of per-query ratio to csearch", 1.0, medians["ratios"]["cli / csearch"], "x"
        ),
        Target(
            "cli --all: worst per-query time over csearch",
            100.0,
            worst["differences_ms"]["cli - csearch"],
            "ms",
        ),
        Target(
            "cli page (the default ranked first page): worst per-query time over csearch",
            100.0,
            worst["differences_ms"]["page - csearch"],
            "ms",
        ),
        Target("cli --all: worst per-query ratio to ripgrep", 1.0, worst["ratios"]["cli / ripgrep"], "x"),
        Target(
            "cli --count: worst per-query ratio to ripgrep", 0.5, worst["ratios"]["cli count / ripgrep"], "x"
        ),
        Target("first page (50 files): p50 over all runs", 10.0, medians["first_page_p50_ms"], "ms"),
        Target("first page (50 files): p99 over all runs", 50.0, medians["first_page_p99_ms"], "ms"),
    ]
    if ours is None:
        report["targets"] = [t.as_dict() for t in targets]
        return
    parts = ours.get("parts", {})
    postings_dict = parts.get("postings", 0) + parts.get("dict", 0)
    cs = build.get("csearch")
    targets += [
        Target(
            "build without symbols (trigrams, postings, content): throughput relative to cindex",
            1.0,
            ratio(build["kotadb-index"]["throughput_mb_s"], cs["throughput_mb_s"])
            if cs and "kotadb-index" in build
            else None,
            "x",
            lower_is_better=False,
        ),
        Target(
            "build with symbols (total): throughput relative to cindex",
            1.0,
            ratio(ours["throughput_mb_s"], cs["throughput_mb_s"]) if cs else None,
            "x",
            lower_is_better=False,
        ),
        Target("build: peak RSS", 2048.0, ours["peak_rss_bytes"] / MIB, "MiB"),
        Target(
            "size: postings + dictionary relative to cindex index",
            2.0,
            ratio(postings_dict, cs["index_bytes"]) if cs else None,
            "x",
        ),
        Target("size: everything on disk relative to corpus", 1.3, ours["index_bytes"] / corpus_bytes, "x"),
        Target(
            "symbol extraction over both cores",
            14.0,
            report.get("symbols", {}).get("mb_per_s"),
            "MB/s",
            lower_is_better=False,
        ),
    ]
    report["targets"] = [t.as_dict() for t in targets]
