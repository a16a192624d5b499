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
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TextIO

# Engine modules are imported inside each command: `kotadb index search` never loads the
# builder (tree-sitter, the symbol pool) and `kotadb index --help` loads nothing of the engine.
if TYPE_CHECKING:
    from services.cli.render import Printer, Stats
    from services.search.engine import MatchStream, Searcher, SearchResult
    from services.search.engine.index.build import BuildProgress


def register(subparsers: Any) -> None:
    """register adds `kotadb index` and all its sub-commands."""
    register_for(subparsers, ())


def register_for(subparsers: Any, words: Sequence[str]) -> None:
    """register_for adds `kotadb index` with only the sub-command `words` (those after `index`) name.

    When they name none of them (`kotadb index --help`, a misspelt sub-command) every one is
    added, so that help and errors list them all. One parser instead of five is a few ms of
    every `kotadb index search`: each parser's help strings go through gettext, and `index
    status`'s flags import the gateway client.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "index", help="build, inspect and search an offline index", description=__doc__
    )
    commands = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    commands.required = True
    only = words[0] if words and words[0] in _SUBCOMMANDS else None
    for name, add in _SUBCOMMANDS.items():
        if only is None or name == only:
            add(commands)


def _add_build(commands: Any) -> None:
    build = commands.add_parser("build", help="index a source tree")
    build.add_argument("src", metavar="SRC_DIR", help="directory to index")
    build.add_argument(
        "--out", required=True, metavar="INDEX_DIR", help="index directory (created if missing)"
    )
    build.add_argument("--repository", default="", help="repository name stored with every document")
    build.add_argument("--workers", type=int, default=2, help="symbol-extraction processes (default 2)")
    build.add_argument("--no-symbols", action="store_true", help="skip tree-sitter symbol extraction")
    build.add_argument(
        "--segment-mb",
        type=int,
        help="content per segment in MiB, 1 to 1024 (default 256): fewer segments answer faster, "
        "a build holds a few times one segment in memory",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)


def _add_stats(commands: Any) -> None:
    stats = commands.add_parser("stats", help="describe an index")
    stats.add_argument("index", metavar="INDEX_DIR")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_stats)


def _add_search(commands: Any) -> None:
    search = commands.add_parser("search", help="search an index")
    search.add_argument("index", metavar="INDEX_DIR")
    search.add_argument("query", metavar="QUERY")
    search.add_argument("--limit", type=int, default=50, metavar="N", help="files per page (default 50)")
    search.add_argument(
        "--all",
        action="store_true",
        help="every matching line in index (path) order, streamed as found, exact totals",
    )
    search.add_argument(
        "--count", action="store_true", help="only `path:N` matching lines per file, and exact totals"
    )
    search.add_argument("--context", type=int, default=0, metavar="N", help="lines of context around matches")
    search.add_argument(
        "--regex", action="store_true", help="QUERY is one RE2 pattern, not the query language"
    )
    search.add_argument(
        "--json",
        action="store_true",
        help="ripgrep's JSON Lines (as `rg --json`): begin, match, context, end and summary records",
    )
    search.add_argument("--cursor", default=None, help="continue after a previous page")
    search.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    search.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="deadline for the search"
    )
    search.set_defaults(func=_search, quick_exit=True)  # see services/cli/main.py's run


def _add_symbols(commands: Any) -> None:
    symbols = commands.add_parser("symbols", help="search symbol definitions")
    symbols.add_argument("index", metavar="INDEX_DIR")
    symbols.add_argument("pattern", metavar="PATTERN")
    symbols.add_argument("--kind", default=None, help="only this kind (function, class, method, ...)")
    symbols.add_argument("--limit", type=int, default=50, metavar="N")
    symbols.add_argument("--case-sensitive", action="store_true")
    symbols.add_argument("--json", action="store_true", help="one JSON object per symbol")
    symbols.set_defaults(func=_symbols)


def _add_status(commands: Any) -> None:
    # The service's index of the caller's documents, not an offline one (a gateway client).
    from services.cli.search import add_index_status

    add_index_status(commands)


# Each sub-command of `kotadb index` and the function adding its parser, in help order.
_SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "build": _add_build,
    "stats": _add_stats,
    "search": _add_search,
    "symbols": _add_symbols,
    "status": _add_status,
}


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
    from services.search.engine.index.build import BUILD_SEGMENT_BYTES, MAX_SEGMENT_BYTES, build_index
    from services.search.engine.index.format import IndexFileError

    if not os.path.isdir(args.src):
        return _fail(f"{args.src}: not a directory")
    segment_bytes = BUILD_SEGMENT_BYTES if args.segment_mb is None else args.segment_mb << 20
    if not 1 << 20 <= segment_bytes <= MAX_SEGMENT_BYTES:
        return _fail(f"--segment-mb must be between 1 and {MAX_SEGMENT_BYTES >> 20}")
    bar = _ProgressBar(sys.stderr, not args.quiet)
    try:
        report = build_index(
            args.src,
            args.out,
            repository=args.repository,
            workers=args.workers,
            symbols=not args.no_symbols,
            progress=bar,
            segment_bytes=segment_bytes,
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
    import json

    from services.search.engine.index.format import IndexFileError
    from services.search.engine.index.index import Index

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


# Streamed output is handed to stdout in chunks of about this size: one write per file
# would cost a system call per file (thousands for a common pattern).
_FLUSH_BYTES = 1 << 20


# A stream with at least this many candidates is split over two processes (this one and a
# forked child, on hosts with a second core), as ripgrep spreads files over threads: on Linux,
# `^#include <linux/[a-z_]+\.h>$` verifies 36,150 candidates, a second or more of Python per
# process. Below it, the fork (a few ms) is not worth it.
SPLIT_MIN = 2000


def _stream(
    args: argparse.Namespace, searcher: Searcher, deadline: float | None, printer: Printer
) -> Summary:
    """_stream prints every match (or per-file counts) in index order as the stream finds them.

    A large stream is cut in two contiguous halves: a forked child renders the second into
    an unlinked temporary file while this process prints the first, then copies the child's
    output after its own, so the order is the index order either way.
    """
    out = sys.stdout.buffer
    with searcher.stream(args.query, regex=args.regex, lines=not args.count, deadline=deadline) as found:
        total = found.candidates
        if total >= SPLIT_MIN and (os.cpu_count() or 1) > 1 and hasattr(os, "fork"):
            import tempfile

            with tempfile.TemporaryFile() as spool:
                return _stream_split(args, found, out, spool, printer)
        _render(args, found, 0, total, out, printer)
        return Summary(found.file_count, found.match_count, found.limit_reason, total, found.verified, False)


def _stream_split(
    args: argparse.Namespace, found: MatchStream, out: BinaryIO, spool: BinaryIO, printer: Printer
) -> Summary:
    """_stream_split prints the first half of the stream while a forked child renders the second."""
    total = found.candidates
    middle = found.middle()
    sys.stdout.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - the parent checks the child's output and totals
        code = 0
        try:
            printer.printed_any = True  # the parent's half comes first
            _render(args, found, middle, total, spool, printer)
            stopped = found.limit_reason is not None
            totals = (found.file_count, found.match_count, found.verified)
            spool.write(_COUNTS.pack(*totals, *_stats_fields(printer.stats), stopped))
            spool.flush()
        except BaseException:
            code = 1
        os._exit(code)
    _render(args, found, 0, middle, out, printer)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the second half of the search failed in its worker process")
    size = spool.seek(0, os.SEEK_END)
    if size < _COUNTS.size:
        raise RuntimeError("the search worker wrote no totals")
    spool.seek(size - _COUNTS.size)
    files, lines, verified, *stats, stopped = _COUNTS.unpack(spool.read(_COUNTS.size))
    spool.seek(0)
    remaining = size - _COUNTS.size
    if remaining >= 3 and found.file_count == 0 and spool.read(3) == b"--\n":
        remaining -= 3  # the child's leading "--" separates nothing when this half printed no file
    else:
        spool.seek(0)
    while remaining:
        chunk = spool.read(min(remaining, _FLUSH_BYTES))
        out.write(chunk)
        remaining -= len(chunk)
    out.flush()
    from services.cli.render import Stats

    printer.stats.add(Stats(*stats))
    reason = found.limit_reason or ("deadline" if stopped else None)
    counts = (found.file_count + files, found.match_count + lines)
    return Summary(*counts, reason, total, found.verified + verified, False)


# The totals a forked stream worker appends to its output: files, lines, verified, the
# printer's statistics (services/cli/render.py's Stats, for the JSON summary), stopped.
_COUNTS = struct.Struct("<qqqqqqqqd?")


def _stats_fields(stats: Stats) -> tuple[int, int, int, int, int, float]:
    return (
        stats.searches_with_match,
        stats.matched_lines,
        stats.matches,
        stats.bytes_searched,
        stats.bytes_printed,
        stats.elapsed,
    )


def _render(
    args: argparse.Namespace, found: MatchStream, start: int, stop: int, out: BinaryIO, printer: Printer
) -> None:
    """_render writes the output of candidates [start, stop) of the stream to `out`.

    Plain text goes through the C renderer (`_fastscan.render_lines`) and JSON through its
    JSON mode (`_fastscan.render_json`, which also returns the `end` record's statistics for
    the closing summary): the same bytes as `Printer`'s, without building a Python object per
    line. Only colour goes through `Printer`, which decodes the lines.
    """
    import json

    from services.cli.render import Stats, from_groups, json_text
    from services.search.engine import _fastscan

    sink = _Sink(out)
    if args.count:
        # Counts need only each file's path and count: `MatchStream.counts` builds nothing else.
        for name, lines in found.counts(start, stop):
            if args.json:
                row = {"type": "count", "path": name, "lines": lines}
                sink.add((json.dumps(row, ensure_ascii=False) + "\n").encode())
            else:
                sink.add(b"%s:%d\n" % (name.encode("utf-8", "surrogateescape"), lines))
        sink.close()
        return
    native = not printer.color and not printer.as_json
    stats = printer.stats
    for file in found.files(start, stop):
        path = file.path.encode("utf-8", "surrogateescape")
        if printer.as_json:
            rendered = _fastscan.render_json(file.content, file.groups, json_text(file.path), args.context)
            chunk, lines, matches, printed, elapsed = rendered
            stats.add(Stats(1, lines, matches, len(file.content), printed, elapsed))
            printer.printed_any = True
        elif native and file.groups:
            if printer.context and printer.printed_any:
                sink.add(b"--\n")  # ripgrep separates context groups across files too
            chunk = _fastscan.render_lines(file.content, file.groups, path, False, args.context)
            printer.printed_any = True
        else:
            chunk = printer.render(from_groups(file.path, file.content, file.groups, args.context))
        sink.add(chunk)
    sink.close()


class _Sink:
    """_Sink hands streamed output to `out` in chunks of about _FLUSH_BYTES, then flushes it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pending: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        self.size += len(chunk)
        if self.size >= _FLUSH_BYTES:
            self.out.write(b"".join(self.pending))
            self.pending, self.size = [], 0

    def close(self) -> None:
        self.out.write(b"".join(self.pending))
        self.pending, self.size = [], 0
        self.out.flush()


class Summary(NamedTuple):
    """Summary is what the stderr line reports about a finished search."""

    file_count: int
    match_count: int
    limit_reason: str | None
    candidates: int
    verified: int
    scan: bool


def _search(args: argparse.Namespace) -> int:
    from services.cli.render import Printer
    from services.search.engine import EngineError, Index, Searcher, SearchMode

    if args.limit < 1:
        return _fail("--limit must be at least 1")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not args.json)
    printer = Printer(color=color, context=args.context, as_json=args.json)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    started = time.perf_counter()
    result: SearchResult | None = None
    try:
        with Index.open(args.index) as index:
            searcher = Searcher(index)
            if (args.all or args.count) and not args.cursor:
                summary = _stream(args, searcher, deadline, printer)
            else:
                result = searcher.search(
                    args.query,
                    limit_files=None if args.all else args.limit,
                    context_lines=args.context,
                    mode=SearchMode.EXHAUSTIVE if args.all else SearchMode.FIRST_PAGE,
                    cursor=args.cursor,
                    deadline=deadline,
                    regex=args.regex,
                    with_symbols=not args.json,
                )
                summary = _print_page(result, printer)
        if not args.count:
            elapsed = time.perf_counter() - started
            closing = printer.summary(searches=summary.verified, bytes_searched=None, elapsed_total=elapsed)
            sys.stdout.buffer.write(closing)
            sys.stdout.buffer.flush()
    except BrokenPipeError:
        # The reader (head, less) went away; stop quietly like grep does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (EngineError, ValueError) as exc:
        return _fail(str(exc))
    line = (
        f"{summary.file_count} files, {summary.match_count} lines"
        + (f" (stopped: {summary.limit_reason})" if summary.limit_reason else "")
        + f"; {summary.candidates} candidates, {summary.verified} verified"
        + (", scan" if summary.scan else "")
        + f", {(time.perf_counter() - started) * 1e3:.1f} ms"
    )
    print(line, file=sys.stderr)
    if result is not None and result.next_cursor:
        print(f"next page: --cursor {result.next_cursor}", file=sys.stderr)
    return 0 if summary.file_count else 1


def _print_page(result: SearchResult, printer: Printer) -> Summary:
    from services.cli.render import from_engine

    out = sys.stdout.buffer
    out.write(b"".join(printer.render(from_engine(file)) for file in result.files))
    out.flush()
    stats = result.stats
    reason = str(result.limit_reason) if result.limit_hit else None
    return Summary(
        result.file_count,
        result.match_count,
        reason,
        stats.candidates,
        stats.files_verified,
        stats.scan_fallback,
    )


def _symbols(args: argparse.Namespace) -> int:
    import json

    from services.search.engine.index.format import IndexFileError
    from services.search.engine.index.index import Index
    from services.search.engine.search.searcher import Searcher

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
