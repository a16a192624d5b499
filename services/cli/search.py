"""`kotadb search`, `kotadb symbols` and `kotadb index status`: the search service from the terminal.

    kotadb search QUERY [--regex] [--all] [--context N] [--json] [--min-revision R]
                        [--limit N] [--page-token T] [--color auto|always|never]
    kotadb symbols PATTERN [--kind K] [--limit N] [--json] [--min-revision R]
    kotadb index status [--json]

They are client commands like `kotadb push` (services/cli/client.py): gRPC to the gateway with
an API key from the flags, the environment or the dev stack, so the call is checked, rate
limited and metered like any other, and the tenant is the key's owner.

`kotadb search` prints what `kotadb index search` prints for an offline index, through the
same renderer (services/cli/render.py): ripgrep's form (`path:line:text`, context lines as
`path-line-text`, `--` between context groups within and across files, matches highlighted on
a terminal), or with `--json` ripgrep's JSON Lines (`begin`, `match`, `context`, `end` and
`summary` records, as `rg --json`). Without `--all`
it prints the first page and, on stderr, the token of the next; with `--all` it streams every
match (StreamSearchCode) and prints each batch as it arrives. `--min-revision R` (the revision
`kotadb push` prints) waits until the index covers that write.

Search and symbols exit 0 when something matched, 1 when nothing did, and 2 on an error, which
is printed as one line (`kotadb: STATUS REASON: message`), like `kotadb index search`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kotadb.v1 import search_pb2, search_pb2_grpc

    from services.cli import render
    from services.cli.client import Target

    Stub = search_pb2_grpc.SearchServiceAsyncStub
    Command = Callable[[Stub, Target, argparse.Namespace], Awaitable[int]]

# Exit codes, as grep and `kotadb index search`.
FOUND, NOTHING, ERROR = 0, 1, 2


def register(subparsers: Any) -> None:
    """register adds `kotadb search` and `kotadb symbols`."""
    search: argparse.ArgumentParser = subparsers.add_parser(
        "search", help="search the code stored in KotaDB (through the gateway)", description=__doc__
    )
    search.add_argument("query", metavar="QUERY", help="the query language, or one RE2 pattern with --regex")
    search.add_argument("--regex", action="store_true", help="QUERY is one RE2 pattern")
    search.add_argument("--all", action="store_true", help="stream every matching file, exact totals")
    search.add_argument("--context", type=int, default=0, metavar="N", help="lines of context around matches")
    search.add_argument("--json", action="store_true", help="one JSON object per line, as `rg --json`")
    search.add_argument(
        "--min-revision", type=int, default=0, metavar="R", help="wait until the index covers revision R"
    )
    search.add_argument("--limit", type=int, default=50, metavar="N", help="files per page (default 50)")
    search.add_argument("--page-token", default="", metavar="T", help="continue after a previous page")
    search.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    _add_target(search)
    search.set_defaults(func=lambda args: _run(_search, args))

    symbols: argparse.ArgumentParser = subparsers.add_parser(
        "symbols", help="search symbol definitions stored in KotaDB (through the gateway)"
    )
    symbols.add_argument("pattern", metavar="PATTERN", help="a symbol name or part of one")
    symbols.add_argument("--kind", action="append", default=[], help="only this kind (repeatable)")
    symbols.add_argument("--limit", type=int, default=50, metavar="N", help="symbols per page (default 50)")
    symbols.add_argument("--json", action="store_true", help="one JSON object per symbol")
    symbols.add_argument(
        "--min-revision", type=int, default=0, metavar="R", help="wait until the index covers revision R"
    )
    _add_target(symbols)
    symbols.set_defaults(func=lambda args: _run(_symbols, args))


def add_index_status(commands: Any) -> None:
    """add_index_status adds `kotadb index status` to the `kotadb index` group (services/cli/index.py)."""
    status: argparse.ArgumentParser = commands.add_parser(
        "status", help="the search service's index of your documents (through the gateway)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    _add_target(status)
    status.set_defaults(func=lambda args: _run(_status, args))


def _add_target(parser: argparse.ArgumentParser) -> None:
    # Imported here: `kotadb index --help` and `kotadb --help` load no gRPC.
    from services.cli import client

    client.add_target_arguments(parser)


def _run(command: Command, args: argparse.Namespace) -> int:
    """_run resolves the gateway, opens a channel and runs `command`; failures print as one line."""
    import asyncio

    import grpc
    from kotadb.v1 import search_pb2_grpc

    from services.cli import client

    try:
        target = client.resolve_target(args)
    except client.ClientError as exc:
        client.fail(str(exc))
        return ERROR

    async def go() -> int:
        async with client.open_channel(target) as channel:
            return await command(search_pb2_grpc.SearchServiceStub(channel), target, args)

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        client.fail(client.describe_rpc_error(exc))
        return ERROR
    except BrokenPipeError:
        # The reader (head, less) went away; stop quietly like grep does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FOUND


def _limit_reason(reason: int) -> str:
    from kotadb.v1 import search_pb2

    return search_pb2.SearchStats.LimitReason.Name(reason)  # type: ignore[arg-type]


async def _search(stub: Stub, target: Target, args: argparse.Namespace) -> int:
    """_search prints one page (SearchCode) or, with --all, every match as it streams in."""
    from kotadb.v1 import search_pb2

    from services.cli import client, render

    if args.limit < 1 or args.context < 0 or args.min_revision < 0:
        client.fail("--limit must be at least 1; --context and --min-revision at least 0")
        return ERROR
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not args.json)
    printer = render.Printer(color=color, context=args.context, as_json=args.json)
    out = sys.stdout.buffer
    metadata = client.call_metadata(target)
    started = time.perf_counter()
    if args.all:
        request = search_pb2.StreamSearchCodeRequest(
            query=args.query, context_lines=args.context, min_revision=args.min_revision, regex=args.regex
        )
        files = matches = revision = 0
        limited = ""
        stats = search_pb2.SearchStats()
        async for message in stub.StreamSearchCode(request, metadata=metadata):
            out.write(b"".join(printer.render(render.from_proto(file)) for file in message.file_matches))
            out.flush()
            if message.done:
                files, matches = message.total_file_count, message.total_match_count
                revision = message.index_revision
                limited = _limit_reason(message.limit_reason) if message.limit_hit else ""
                stats = message.stats
        _close(printer, stats, started)
        _summary(files, matches, limited, revision, "")
        return FOUND if files else NOTHING
    page_request = search_pb2.SearchCodeRequest(
        query=args.query,
        page_size=args.limit,
        page_token=args.page_token,
        context_lines=args.context,
        min_revision=args.min_revision,
        regex=args.regex,
    )
    page: search_pb2.SearchCodeResponse = await stub.SearchCode(page_request, metadata=metadata)
    out.write(b"".join(printer.render(render.from_proto(file)) for file in page.file_matches))
    _close(printer, page.stats, started)
    limited = _limit_reason(page.limit_reason) if page.limit_hit else ""
    totals = (page.total_file_count, page.total_match_count)
    _summary(*totals, limited, page.index_revision, page.next_page_token)
    return FOUND if page.file_matches else NOTHING


def _close(printer: render.Printer, stats: search_pb2.SearchStats, started: float) -> None:
    """_close ends `--json` output with ripgrep's summary record (the service's counts of work)."""
    closing = printer.summary(
        searches=stats.files_verified,
        bytes_searched=stats.bytes_verified or None,
        elapsed_total=time.perf_counter() - started,
    )
    sys.stdout.buffer.write(closing)
    sys.stdout.buffer.flush()


def _summary(files: int, matches: int, limited: str, revision: int, next_token: str) -> None:
    """_summary prints the totals on stderr, keeping stdout for results."""
    stopped = f" (stopped: {limited})" if limited else ""
    print(f"{files} files, {matches} lines{stopped}; index at revision {revision}", file=sys.stderr)
    if next_token:
        print(f"next page: --page-token {next_token}", file=sys.stderr)


async def _symbols(stub: Stub, target: Target, args: argparse.Namespace) -> int:
    """_symbols prints ranked symbol definitions, `path:line: kind qualified_name` or JSON lines."""
    from google.protobuf import json_format
    from kotadb.v1 import search_pb2

    from services.cli import client

    if args.limit < 1 or args.min_revision < 0:
        client.fail("--limit must be at least 1 and --min-revision at least 0")
        return ERROR
    request = search_pb2.SearchSymbolsRequest(
        query=args.pattern, page_size=args.limit, kinds=args.kind, min_revision=args.min_revision
    )
    found: search_pb2.SearchSymbolsResponse = await stub.SearchSymbols(
        request, metadata=client.call_metadata(target)
    )
    out = sys.stdout
    for match in found.symbols:
        if args.json:
            row = json_format.MessageToDict(match, preserving_proto_field_name=True)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            out.write(f"{match.path}:{match.start_line}: {match.kind} {match.qualified_name or match.name}\n")
    out.flush()
    more = " (more: raise --limit)" if found.next_page_token else ""
    print(f"{found.total_count} matching symbols{more}", file=sys.stderr)
    return FOUND if found.symbols else NOTHING


async def _status(stub: Stub, target: Target, args: argparse.Namespace) -> int:
    """_status prints the caller's index status: coverage, lag, size, skipped documents."""
    from google.protobuf import json_format
    from kotadb.v1 import document_pb2, search_pb2

    from services.cli import client

    found: search_pb2.IndexStatus = await stub.GetIndexStatus(
        search_pb2.GetIndexStatusRequest(), metadata=client.call_metadata(target)
    )
    if args.json:
        print(json.dumps(json_format.MessageToDict(found, preserving_proto_field_name=True), indent=2))
        return 0
    state = search_pb2.IndexStatus.State.Name(found.state)
    lag = max(found.latest_revision - found.revision, 0)
    lines = [
        f"state        {state}" + (f": {found.message}" if found.message else ""),
        f"revision     {found.revision} of {found.latest_revision} (lag {lag})",
        f"documents    {found.document_count} ({found.skipped_document_count} skipped)",
        *(f"  {document_pb2.SkipReason.Code.Name(s.reason).lower():<18} {s.count}" for s in found.skipped),
        f"segments     {found.segment_count}",
        f"index size   {found.index_bytes:,} bytes (+ {found.content_bytes:,} bytes of content)",
        f"symbols      {found.symbol_count}",
        f"replica      {found.replica}",
    ]
    if found.HasField("update_time"):
        lines.append(f"updated      {found.update_time.ToJsonString()}")
    print("\n".join(lines))
    return 0
