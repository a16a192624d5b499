"""Tools: what an agent sees of KotaDB — names, JSON schemas (from the annotations), descriptions.

Descriptions are written for a model deciding what to call: what the tool returns, the query
language with examples, the bounds, and what to do next (page_token, min_revision). Arguments
are validated by their schemas before a tool runs (pydantic, through the SDK), and every tool's
output is capped (`Limits.output_chars`) with a note saying how to narrow the query.

`build(name, backend_for, limits)` returns an MCPServer; `backend_for(ctx)` decides who is
calling (services/mcp/server.py: the API key for stdio, the forwarded identity for HTTP).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from kotadb.v1 import document_pb2, job_pb2, search_pb2
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from services.mcp import render
from services.mcp.backend import TERMINAL_STATES, Backend

BackendFor = Callable[[Context], Awaitable[Backend]]

QUERY_LANGUAGE = """\
Query language (Zoekt/GitHub code search style):
  foo bar              lines of files containing both terms (AND is implicit)
  foo or bar           either term
  "exact phrase("      a literal, punctuation included
  /fo+\\(/              an RE2 regular expression (no backtracking)
  -foo  -file:test     negation
  (a or b) c           grouping
  file:\\.py$ path:src/ a regex on the path; file:"x.py" a literal; -file: excludes
  repo:acme/api        a regex on the repository name
  lang:python          one language (py, ts, go, rust, java, c, cpp, ruby, ...)
  sym:Parser           a symbol definition named Parser
  case:yes             case sensitive (default auto: sensitive iff the term has an upper-case letter)
  type:path            match paths instead of lines
Examples:
  "def main(" lang:python            where main is defined in Python
  /func \\w+Handler\\(/ -file:_test.go  Go handler functions outside tests
  TODO repo:acme/api file:^src/       TODOs in one repository's src/
  sym:UserService                     the definition of UserService"""

SEARCH_CODE = f"""\
Search the code indexed in KotaDB (exact matches, never fuzzy). Returns matching lines as
`path:line: text` with each match wrapped in «», context lines as `path-line- text`, the
enclosing symbol in [brackets], then totals: matching lines, files, and limit_hit (yes means
counting stopped early, so totals are lower bounds). Results are ranked: definitions and
non-test files first. If the answer ends with a page_token, call again with it for more files.
Pass min_revision (from push_files or sync_repository) to search only once those writes are
indexed.

{QUERY_LANGUAGE}

With regex=true the whole query is one RE2 pattern (no query language)."""

SEARCH_SYMBOLS = """\
Find symbol definitions (functions, methods, classes, structs, interfaces, ...) by name.
pattern is a name ("parse"), a qualified name ("Parser.parse") or a /regex/; exact matches rank
first, then case-insensitive, prefix and substring matches. Returns `path:line: kind name`."""

READ_FILE = """\
Read a file stored in KotaDB, numbered like `cat -n`. path is the exact path as search results
show it; pass repository (full name or id) when the same path exists in several repositories.
start_line/end_line (1-based, inclusive) read a range: search first, then read around a match."""

LIST_REPOSITORIES = (
    "List the repositories this API key can search: name, state, documents, last synced commit, id."
)

INDEX_STATUS = """\
Show the search index of this API key's tenant: state, the revision it covers versus the latest
written (how far search lags writes), document, symbol and skip counts."""

PUSH_FILES = """\
Write files into KotaDB so they become searchable (needs an API key with write permission).
Each file is {path, content}; an existing path is replaced. Returns each file's outcome and a
revision: pass it as min_revision to search_code to see these files (read-your-writes)."""

SYNC_REPOSITORY = """\
Sync a registered repository from its git host now (needs write permission). Waits up to
wait_seconds for the sync job; when it succeeds, returns the revision to pass as min_revision
to search_code. repository is the full name (see list_repositories) or id."""


class FileInput(BaseModel):
    """FileInput is one file to push: its path and its UTF-8 text."""

    path: Annotated[str, Field(min_length=1, max_length=1024, description="relative path, e.g. src/app.py")]
    content: Annotated[str, Field(max_length=10 * 1024 * 1024, description="the file's full text")]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Limits bounds what tools return: characters per answer, files per push, seconds of waiting."""

    output_chars: int = 24_000
    push_files: int = 100
    max_wait_seconds: float = 50.0


DEFAULT_LIMITS = Limits()

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
WRITE = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


def build(name: str, backend_for: BackendFor, limits: Limits | None = None) -> MCPServer:
    """build returns the MCP server with every KotaDB tool registered."""
    server: MCPServer = MCPServer(
        name,
        instructions=(
            "KotaDB is an exact code search index over your repositories. Use search_code to find code"
            " (see its description for the query language), read_file to read around a match,"
            " search_symbols to find definitions."
        ),
    )
    limits = limits or DEFAULT_LIMITS
    cap = limits.output_chars

    async def search_code(
        ctx: Context,
        query: Annotated[
            str, Field(min_length=1, max_length=4096, description="query in the query language")
        ],
        regex: Annotated[bool, Field(description="treat the whole query as one RE2 pattern")] = False,
        limit: Annotated[int, Field(ge=1, le=100, description="files per page")] = 20,
        context_lines: Annotated[
            int, Field(ge=0, le=10, description="lines of context around each match")
        ] = 0,
        page_token: Annotated[
            str, Field(max_length=4096, description="from a previous answer, for more")
        ] = "",
        min_revision: Annotated[int, Field(ge=0, description="wait until this revision is indexed")] = 0,
    ) -> str:
        backend = await backend_for(ctx)
        request = search_pb2.SearchCodeRequest(
            query=query,
            regex=regex,
            page_size=limit,
            context_lines=context_lines,
            page_token=page_token,
            min_revision=min_revision,
            max_matches_per_file=20,
        )
        return render.search_code(await backend.search_code(request), cap)

    async def search_symbols(
        ctx: Context,
        pattern: Annotated[
            str, Field(min_length=1, max_length=1024, description="name, Qualified.name or /regex/")
        ],
        kind: Annotated[str, Field(max_length=64, description="function, method, class, struct, ...")] = "",
        limit: Annotated[int, Field(ge=1, le=200, description="symbols to return")] = 50,
        min_revision: Annotated[int, Field(ge=0, description="wait until this revision is indexed")] = 0,
    ) -> str:
        backend = await backend_for(ctx)
        request = search_pb2.SearchSymbolsRequest(
            query=pattern, kinds=[kind] if kind else [], page_size=limit, min_revision=min_revision
        )
        return render.search_symbols(await backend.search_symbols(request), cap)

    async def read_file(
        ctx: Context,
        path: Annotated[str, Field(min_length=1, max_length=1024, description="exact path")],
        repository: Annotated[str, Field(max_length=256, description="repository full name or id")] = "",
        start_line: Annotated[int, Field(ge=1, description="first line, 1-based")] = 1,
        end_line: Annotated[int, Field(ge=0, description="last line, inclusive; 0 = end of file")] = 0,
    ) -> str:
        if end_line and end_line < start_line:
            raise ToolError("INVALID_ARGUMENT: end_line is before start_line")
        backend = await backend_for(ctx)
        found = await backend.find_document(path, repository or None)
        return render.document(found, start_line, end_line, cap)

    async def list_repositories(ctx: Context) -> str:
        backend = await backend_for(ctx)
        return render.repositories(await backend.repositories(), cap)

    async def index_status(ctx: Context) -> str:
        backend = await backend_for(ctx)
        return render.index_status(await backend.index_status())

    async def push_files(
        ctx: Context,
        files: Annotated[list[FileInput], Field(min_length=1, description="files to write")],
    ) -> str:
        if len(files) > limits.push_files:
            raise ToolError(f"INVALID_ARGUMENT: at most {limits.push_files} files per call; split the push")
        backend = await backend_for(ctx)
        documents = [document_pb2.Document(path=f.path, text=f.content) for f in files]
        return render.upserted(await backend.upsert(documents), cap)

    async def sync_repository(
        ctx: Context,
        repository: Annotated[str, Field(min_length=1, max_length=256, description="full name or id")],
        wait_seconds: Annotated[float, Field(ge=0, le=50, description="how long to wait for the job")] = 30,
    ) -> str:
        backend = await backend_for(ctx)
        found = await backend.repository(repository)
        job = await backend.sync(found.id)
        deadline = time.monotonic() + min(wait_seconds, limits.max_wait_seconds)
        if job.state not in TERMINAL_STATES and wait_seconds > 0:
            await backend.watch(job.id, max(deadline - time.monotonic(), 0.1))
            job = await backend.job(job.id)
        revision = None
        if job.state == job_pb2.Job.SUCCEEDED:
            # The job's writes are committed: the tenant's latest revision covers them.
            revision = (await backend.index_status()).latest_revision
        return render.job(job, revision)

    tools: list[tuple[Callable[..., Awaitable[str]], str, ToolAnnotations]] = [
        (search_code, SEARCH_CODE, READ_ONLY),
        (search_symbols, SEARCH_SYMBOLS, READ_ONLY),
        (read_file, READ_FILE, READ_ONLY),
        (list_repositories, LIST_REPOSITORIES, READ_ONLY),
        (index_status, INDEX_STATUS, READ_ONLY),
        (push_files, PUSH_FILES, WRITE),
        (sync_repository, SYNC_REPOSITORY, WRITE),
    ]
    for function, description, hints in tools:
        server.add_tool(function, description=description, annotations=hints, structured_output=False)
    return server
