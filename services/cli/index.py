"""`kotadb index`: build, inspect and search an offline index from the command line.

    kotadb index build SRC_DIR --out INDEX_DIR      index a source tree (progress on stderr)
    kotadb index stats INDEX_DIR [--json]            documents, sizes by part, skipped files
    kotadb index search INDEX_DIR QUERY [...]        grep-like results, or JSON lines
    kotadb index symbols INDEX_DIR PATTERN [...]     ranked symbol definitions

Search exits 0 when something matched, 1 when nothing did and 2 on an error, like grep.
Results go to stdout; progress, totals and the next-page cursor go to stderr so that stdout
stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from services.search.engine.build import BuildProgress, build_index
from services.search.engine.cursor import CursorError
from services.search.engine.format import IndexFileError
from services.search.engine.index import Index
from services.search.engine.query import QuerySyntaxError
from services.search.engine.results import FileMatch, LineMatch, SearchMode, SearchResult
from services.search.engine.searcher import Searcher
from services.search.engine.verify import InvalidPatternError

# ripgrep's default palette: magenta paths, green line numbers, bold red matches.
_PATH = "\x1b[35m"
_LINE = "\x1b[32m"
_MATCH = "\x1b[1;31m"
_RESET = "\x1b[0m"


def register(subparsers: Any) -> None:
    """register adds `kotadb index` and its sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "index", help="build, inspect and search an offline index", description=__doc__
    )
    commands = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    commands.required = True

    build = commands.add_parser("build", help="index a source tree")
    build.add_argument("src", metavar="SRC_DIR", help="directory to index")
    build.add_argument(
        "--out", required=True, metavar="INDEX_DIR", help="index directory (created if missing)"
    )
    build.add_argument("--repository", default="", help="repository name stored with every document")
    build.add_argument("--workers", type=int, default=2, help="symbol-extraction processes (default 2)")
    build.add_argument("--no-symbols", action="store_true", help="skip tree-sitter symbol extraction")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    stats = commands.add_parser("stats", help="describe an index")
    stats.add_argument("index", metavar="INDEX_DIR")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_stats)

    search = commands.add_parser("search", help="search an index")
    search.add_argument("index", metavar="INDEX_DIR")
    search.add_argument("query", metavar="QUERY")
    search.add_argument("--limit", type=int, default=50, metavar="N", help="files per page (default 50)")
    search.add_argument("--all", action="store_true", help="every matching file, exact totals")
    search.add_argument("--context", type=int, default=0, metavar="N", help="lines of context around matches")
    search.add_argument(
        "--regex", action="store_true", help="QUERY is one RE2 pattern, not the query language"
    )
    search.add_argument("--json", action="store_true", help='one {"path","line","ranges"} object per line')
    search.add_argument("--cursor", default=None, help="continue after a previous page")
    search.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    search.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="deadline for the search"
    )
    search.set_defaults(func=_search)

    symbols = commands.add_parser("symbols", help="search symbol definitions")
    symbols.add_argument("index", metavar="INDEX_DIR")
    symbols.add_argument("pattern", metavar="PATTERN")
    symbols.add_argument("--kind", default=None, help="only this kind (function, class, method, ...)")
    symbols.add_argument("--limit", type=int, default=50, metavar="N")
    symbols.add_argument("--case-sensitive", action="store_true")
    symbols.add_argument("--json", action="store_true", help="one JSON object per symbol")
    symbols.set_defaults(func=_symbols)

    # The service's index of the caller's documents, not an offline one (a gateway client).
    from services.cli.search import add_index_status

    add_index_status(commands)


def _fail(message: str) -> int:
    print(f"kotadb index: {message}", file=sys.stderr, flush=True)
    return 2


class _ProgressBar:
    """_ProgressBar draws a one-line bar on a terminal, or nothing when stderr is redirected."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled and stream.isatty()

    def __call__(self, state: BuildProgress) -> None:
        if not self.enabled:
            return
        total = max(state.bytes_total, 1)
        frac = min(state.bytes_done / total, 1.0)
        width = 30
        filled = int(frac * width)
        rate = state.bytes_done / state.elapsed / 1e6 if state.elapsed > 0 else 0.0
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{state.files_done}/{state.files_total} files {rate:6.1f} MB/s skipped {state.skipped}"
        )
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _build(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.src):
        return _fail(f"{args.src}: not a directory")
    bar = _ProgressBar(sys.stderr, not args.quiet)
    try:
        report = build_index(
            args.src,
            args.out,
            repository=args.repository,
            workers=args.workers,
            symbols=not args.no_symbols,
            progress=bar,
        )
    except IndexFileError as exc:
        return _fail(str(exc))
    bar.finish()
    print(
        f"indexed {report.indexed} of {report.files} files ({report.bytes / 1e6:.1f} MB) in "
        f"{report.seconds:.2f} s ({report.throughput / 1e6:.1f} MB/s); skipped {len(report.skipped)}; "
        f"generation {report.generation}",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        with Index.open(args.index) as index:
            stats = index.stats()
    except IndexFileError as exc:
        return _fail(str(exc))
    skipped = [{"path": s.path, "reason": s.reason.value, "detail": s.detail} for s in stats.skipped]
    if args.json:
        print(
            json.dumps(
                {
                    "generation": stats.generation,
                    "documents": stats.documents,
                    "deleted": stats.deleted,
                    "bytes": stats.content_bytes,
                    "segments": stats.segments,
                    "trigrams": stats.trigrams,
                    "index_bytes": stats.total_bytes,
                    "index_bytes_by_part": stats.bytes_by_part,
                    "skipped": skipped,
                },
                indent=2,
            )
        )
        return 0
    out = sys.stdout
    out.write(f"generation   {stats.generation}\n")
    out.write(f"documents    {stats.documents} ({stats.deleted} deleted, not yet merged away)\n")
    out.write(f"content      {stats.content_bytes:,} bytes\n")
    out.write(f"segments     {stats.segments}\n")
    out.write(f"trigrams     {stats.trigrams:,} (summed over segments)\n")
    out.write(f"index size   {stats.total_bytes:,} bytes\n")
    for part, size in sorted(stats.bytes_by_part.items(), key=lambda kv: -kv[1]):
        out.write(f"  {part:<12} {size:>14,}\n")
    out.write(f"skipped      {len(skipped)}\n")
    for row in skipped:
        detail = f" ({row['detail']})" if row["detail"] else ""
        out.write(f"  {row['path']}: {row['reason']}{detail}\n")
    return 0


def _highlight(line: LineMatch, color: bool) -> str:
    if not color or not line.ranges:
        return line.text
    raw = line.text.encode("utf-8")
    parts: list[str] = []
    at = 0
    for rng in line.ranges:
        if rng.end <= rng.start:
            continue
        parts.append(raw[at : rng.start].decode("utf-8", "replace"))
        parts.append(_MATCH + raw[rng.start : rng.end].decode("utf-8", "replace") + _RESET)
        at = rng.end
    parts.append(raw[at:].decode("utf-8", "replace"))
    return "".join(parts)


def _print_file(out: TextIO, file: FileMatch, color: bool, context: int) -> None:
    path = f"{_PATH}{file.path}{_RESET}" if color else file.path
    if not file.line_matches:
        out.write(path + "\n")
        return
    last_printed = 0
    for line in file.line_matches:
        rows: list[tuple[int, str, str]] = [(c.line_number, "-", c.text) for c in line.before]
        rows.append((line.line_number, ":", _highlight(line, color)))
        rows += [(c.line_number, "-", c.text) for c in line.after]
        for number, sep, text in rows:
            if number <= last_printed:
                continue
            if context and last_printed and number > last_printed + 1:
                out.write("--\n")
            num = f"{_LINE}{number}{_RESET}" if color else str(number)
            out.write(f"{path}{sep}{num}{sep}{text}\n")
            last_printed = number


def _print_json(out: TextIO, result: SearchResult) -> None:
    for file in result.files:
        if not file.line_matches:
            out.write(
                json.dumps({"path": file.path, "line": None, "ranges": [list(r) for r in file.path_ranges]})
            )
            out.write("\n")
            continue
        for line in file.line_matches:
            ranges = [[r.start, r.end] for r in line.ranges]
            out.write(json.dumps({"path": file.path, "line": line.line_number, "ranges": ranges}) + "\n")


def _search(args: argparse.Namespace) -> int:
    if args.limit < 1:
        return _fail("--limit must be at least 1")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not args.json)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        with Index.open(args.index) as index:
            result = Searcher(index).search(
                args.query,
                limit_files=None if args.all else args.limit,
                context_lines=args.context,
                mode=SearchMode.EXHAUSTIVE if args.all else SearchMode.FIRST_PAGE,
                cursor=args.cursor,
                deadline=deadline,
                regex=args.regex,
                with_symbols=not args.json,
            )
    except (QuerySyntaxError, InvalidPatternError, CursorError, IndexFileError, ValueError) as exc:
        return _fail(str(exc))
    out = sys.stdout
    try:
        if args.json:
            _print_json(out, result)
        else:
            for file in result.files:
                _print_file(out, file, color, args.context)
        out.flush()
    except BrokenPipeError:
        # The reader (head, less) went away; stop quietly like grep does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0 if result.file_count else 1
    summary = (
        f"{result.file_count} files, {result.match_count} lines"
        + (f" (stopped: {result.limit_reason})" if result.limit_hit else "")
        + f"; {result.stats.candidates} candidates, {result.stats.files_verified} verified"
        + (", scan" if result.stats.scan_fallback else "")
        + f", {result.stats.duration_seconds * 1e3:.1f} ms"
    )
    print(summary, file=sys.stderr)
    if result.next_cursor:
        print(f"next page: --cursor {result.next_cursor}", file=sys.stderr)
    return 0 if result.file_count else 1


def _symbols(args: argparse.Namespace) -> int:
    try:
        with Index.open(args.index) as index:
            found = Searcher(index).symbols(
                args.pattern, kind=args.kind, limit=args.limit, case_sensitive=args.case_sensitive
            )
    except IndexFileError as exc:
        return _fail(str(exc))
    out = sys.stdout
    for match in found.matches:
        sym = match.symbol
        if args.json:
            row = {
                "path": match.path,
                "repository": match.repository,
                "language": match.language,
                "name": sym.name,
                "kind": sym.kind,
                "qualified_name": sym.qualified_name,
                "parent": sym.parent,
                "start_line": sym.start_line,
                "end_line": sym.end_line,
                "tier": match.tier.name.lower(),
            }
            out.write(json.dumps(row) + "\n")
        else:
            out.write(f"{match.path}:{sym.start_line}: {sym.kind} {sym.qualified_name}\n")
    print(f"{found.total} matching symbols", file=sys.stderr)
    return 0 if found.total else 1
