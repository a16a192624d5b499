"""`kotadb bench`: benchmarks that measure KotaDB side by side with its peers in one run.

    kotadb bench search --corpus DIR --queries FILE... [--index DIR] [--out report.json] [--runs N]
    kotadb bench auth [--out report.json] [--quick]
    kotadb bench ingest --corpus NAME=DIR [--subset NAME=a,b] [--out report.json]
    kotadb bench service --corpus DIR --queries FILE [--out report.json]

`--corpus` is a source tree, or `stdlib` / `linux` to lay one out with scripts/corpus.sh
under `--corpus-root`; the query sets live in services/bench/queries/. The report is printed as
a table and, with `--out`, written as JSON (services/bench/search.py describes what is measured and how).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from services.bench.report import MIB
from services.bench.search import BenchOptions, run_bench
from services.bench.searchreport import render_search_table

CORPUS_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "corpus.sh"


def register(subparsers: Any) -> None:
    """register adds `kotadb bench` and its sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="benchmarks against peer tools", description=__doc__
    )
    commands = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    commands.required = True
    search = commands.add_parser("search", help="search engine vs codesearch, ripgrep and pg_trgm")
    search.add_argument("--corpus", required=True, help="source tree, or 'stdlib' / 'linux'")
    search.add_argument(
        "--corpus-root", default="/tmp/kotadb-corpus", help="where named corpora are laid out"
    )
    search.add_argument(
        "--queries",
        required=True,
        type=Path,
        nargs="+",
        help="files of one RE2 pattern per line (services/bench/queries/*.txt)",
    )
    search.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    search.add_argument("--runs", type=int, default=5, help="timed runs per query and side (default 5)")
    search.add_argument("--work-dir", type=Path, default=None, help="keep indexes here instead of a temp dir")
    search.add_argument("--no-pg", action="store_true", help="skip the pg_trgm peer")
    search.add_argument("--no-codesearch", action="store_true", help="skip the codesearch peer")
    search.add_argument("--no-ripgrep", action="store_true", help="skip the ripgrep peer")
    search.add_argument(
        "--symbol-sample-mb", type=int, default=100, help="MiB of source for the symbol-extraction figure"
    )
    search.add_argument(
        "--processes", type=int, default=2, help="processes our exhaustive searches may use (default 2)"
    )
    search.add_argument(
        "--index",
        type=Path,
        default=None,
        help="query this existing index of the corpus instead of building ours (no build figures)",
    )
    search.set_defaults(func=_search)
    auth = commands.add_parser("auth", help="auth Check throughput, exact limits, ext_authz overhead")
    auth.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    auth.add_argument("--quick", action="store_true", help="short steps: a smoke run, not a measurement")
    auth.add_argument("--work-dir", type=Path, default=None, help="parent of the temporary cluster and logs")
    auth.set_defaults(func=_auth)
    ingest = commands.add_parser(
        "ingest", help="bulk push vs COPY and the engine build, webhook latency, claim overhead, NOTIFY"
    )
    ingest.add_argument(
        "--corpus",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a tree to push, repeatable; DIR may be 'stdlib' or 'linux' (laid out under --corpus-root)",
    )
    ingest.add_argument(
        "--subset", action="append", default=[], metavar="NAME=a,b", help="push only these top-level dirs"
    )
    ingest.add_argument(
        "--corpus-root", default="/tmp/kotadb-corpus", help="where named corpora are laid out"
    )
    ingest.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ingest.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the stack's temporary data dir"
    )
    ingest.add_argument(
        "--webhook-pushes", type=int, default=20, help="signed one-file pushes timed (default 20)"
    )
    ingest.add_argument("--no-engine-build", action="store_true", help="skip the offline engine build")
    ingest.add_argument(
        "--quick", action="store_true", help="short queue steps: a smoke run, not a measurement"
    )
    ingest.set_defaults(func=_ingest)
    service = commands.add_parser(
        "service",
        help="the search service end to end: in-process vs gRPC vs REST vs pg_trgm, load, freshness",
    )
    service.add_argument("--corpus", required=True, help="source tree, or 'stdlib' / 'linux'")
    service.add_argument(
        "--corpus-root", default="/tmp/kotadb-corpus", help="where named corpora are laid out"
    )
    service.add_argument("--name", default="", help="the pushed prefix (default: the corpus's name)")
    service.add_argument("--queries", required=True, type=Path, help="one RE2 pattern per line")
    service.add_argument("--runs", type=int, default=5, help="timed runs per query and side (default 5)")
    service.add_argument("--load-seconds", type=float, default=10.0, help="seconds per concurrency level")
    service.add_argument("--freshness-samples", type=int, default=50, help="upserts timed (default 50)")
    service.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    service.add_argument("--work-dir", type=Path, default=None, help="keep the stack and indexes here")
    service.add_argument(
        "--tenant",
        type=uuid.UUID,
        default=None,
        help="reuse this user's corpus, pushed by an earlier run with the same --work-dir (no push)",
    )
    service.add_argument(
        "--pg-trgm-index-timeout",
        type=float,
        default=900.0,
        help="seconds the pg_trgm GIN index may take to build; past it pg_trgm is skipped (default 900)",
    )
    service.add_argument(
        "--pg-trgm-query-timeout",
        type=float,
        default=10.0,
        help="seconds one pg_trgm query may run; past it the query is reported as skipped (default 10)",
    )
    service.set_defaults(func=_service)


def _corpus(args: argparse.Namespace) -> Path:
    return _named_corpus(args.corpus, args.corpus_root)


def _named_corpus(corpus: str, root: str) -> Path:
    if corpus in ("stdlib", "linux"):
        out = subprocess.run(
            ["bash", str(CORPUS_SCRIPT), corpus, root],
            check=True,
            capture_output=True,
            text=True,
        )
        return Path(out.stdout.strip().splitlines()[-1])
    return Path(corpus)


def _search(args: argparse.Namespace) -> int:
    if args.runs < 1:
        print("kotadb bench: --runs must be at least 1", file=sys.stderr)
        return 2
    corpus = _corpus(args)
    if not corpus.is_dir():
        print(f"kotadb bench: {corpus}: not a directory", file=sys.stderr)
        return 2
    for path in args.queries:
        if not path.is_file():
            print(f"kotadb bench: {path}: no such file", file=sys.stderr)
            return 2
    options = BenchOptions(
        corpus=corpus,
        queries=args.queries,
        work_dir=args.work_dir,
        runs=args.runs,
        with_pg=not args.no_pg,
        with_codesearch=not args.no_codesearch,
        with_ripgrep=not args.no_ripgrep,
        symbol_sample_bytes=args.symbol_sample_mb * MIB,
        processes=args.processes,
        index=args.index,
    )
    report = run_bench(options, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_search_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        print(f"report written to {args.out}", file=sys.stderr)
    return 0


def _auth(args: argparse.Namespace) -> int:
    # Imported here so other `kotadb` commands do not load the Envoy stubs and the auth service.
    from services.bench.auth import AuthBenchOptions, render_auth_table, run_auth_bench
    from services.bench.h2load import H2loadMissing, find_h2load

    try:
        find_h2load()  # before the minute it takes to build the stack
    except H2loadMissing as exc:
        print(f"kotadb bench auth: {exc}", file=sys.stderr)
        return 2
    options = AuthBenchOptions(work_dir=args.work_dir)
    if args.quick:
        options = AuthBenchOptions(
            seconds_per_level=1.0,
            offered_seconds=1.0,
            burst_requests=300,
            envoy_rounds=1,
            envoy_requests_per_round=50,
            work_dir=args.work_dir,
        )
    report = run_auth_bench(options, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_auth_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        print(f"report written to {args.out}", file=sys.stderr)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from services.bench.ingest import (
        IngestBenchOptions,
        parse_pairs,
        render_ingest_table,
        run_ingest_bench,
        write_report,
    )

    try:
        corpora = {
            name: _named_corpus(value, args.corpus_root)
            for name, value in parse_pairs(args.corpus, "--corpus").items()
        }
        subsets = {name: value.split(",") for name, value in parse_pairs(args.subset, "--subset").items()}
    except ValueError as exc:
        print(f"kotadb bench ingest: {exc}", file=sys.stderr)
        return 2
    if not corpora:
        print("kotadb bench ingest: give at least one --corpus NAME=DIR", file=sys.stderr)
        return 2
    for name, root in corpora.items():
        missing = [root / part for part in subsets.get(name, [])] + [root]
        for path in missing:
            if not path.is_dir():
                print(f"kotadb bench ingest: {path}: not a directory", file=sys.stderr)
                return 2
    options = IngestBenchOptions(
        corpora=corpora,
        subsets=subsets,
        work_dir=args.work_dir,
        webhook_pushes=args.webhook_pushes,
        engine_build=not args.no_engine_build,
    )
    if args.quick:
        options = dataclasses.replace(
            options, webhook_pushes=3, claim_jobs=100, notify_writers=(1, 4), notify_seconds=0.5
        )
    report = run_ingest_bench(options, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_ingest_table(report))
    if args.out is not None:
        write_report(report, args.out)
        print(f"report written to {args.out}", file=sys.stderr)
    return 0


def _service(args: argparse.Namespace) -> int:
    from services.bench.service import ServiceBenchOptions, render_service_table, run_service_bench

    corpus = _corpus(args)
    if not corpus.is_dir() or not args.queries.is_file() or args.runs < 1:
        print(
            "kotadb bench service: --corpus must be a directory, --queries a file, --runs ≥ 1",
            file=sys.stderr,
        )
        return 2
    options = ServiceBenchOptions(
        corpus=corpus,
        queries=args.queries,
        name=args.name or corpus.name,
        work_dir=args.work_dir,
        runs=args.runs,
        load_seconds=args.load_seconds,
        freshness_samples=args.freshness_samples,
        pg_trgm_index_timeout=args.pg_trgm_index_timeout,
        pg_trgm_query_timeout=args.pg_trgm_query_timeout,
        tenant=args.tenant,
    )
    report = run_service_bench(options, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_service_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        print(f"report written to {args.out}", file=sys.stderr)
    return 0
