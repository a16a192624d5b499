"""Rendering: KotaDB answers as compact text for a model's context, never longer than a cap.

Search results use grep's shape, which models read without instruction: `path:line: text` for a
matching line (matches wrapped in « »), `path-line- text` for context, one blank line between
files. Every answer ends with its totals and whether a limit was hit, so an agent can tell "no
more matches" from "stopped counting". `Output` enforces the cap: once a line would pass it, the
rest is replaced by one note saying how much was left out and how to narrow the query — a model
given 200 KB of matches learns less than one told to add `file:`.
"""

from __future__ import annotations

from collections.abc import Iterable

from kotadb.v1 import document_pb2, ingest_pb2, job_pb2, repository_pb2, search_pb2

MARK_OPEN = "«"
MARK_CLOSE = "»"
# Characters of one source line shown; minified files have lines of megabytes.
LINE_CHARS = 300

NARROW = "narrow the query (file:, lang:, repo:, a longer literal) or lower limit/context_lines"


class Output:
    """Output collects lines up to `cap` characters; past it, lines are counted, not kept."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lines: list[str] = []
        self.size = 0
        self.dropped = 0

    def add(self, line: str) -> None:
        """add appends a line, or counts it as dropped once the cap is reached."""
        if self.dropped or self.size + len(line) + 1 > self.cap:
            self.dropped += 1
            return
        self.lines.append(line)
        self.size += len(line) + 1

    @property
    def truncated(self) -> bool:
        """truncated tells whether any line was left out."""
        return self.dropped > 0

    def text(self, footer: Iterable[str] = (), advice: str = NARROW) -> str:
        """text joins the kept lines, the truncation note if any, then `footer` (always shown)."""
        lines = list(self.lines)
        if self.dropped:
            lines.append(
                f"[truncated: {self.dropped} more lines not shown (the output is capped at {self.cap} chars);"
                f" {advice}]"
            )
        lines.extend(footer)
        return "\n".join(lines)


def clip(text: str, limit: int = LINE_CHARS) -> str:
    """clip shortens one line to `limit` characters, marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def marked(line: str, ranges: Iterable[search_pb2.Range]) -> str:
    """marked wraps each match range (UTF-8 byte offsets) of `line` in « »."""
    raw = line.encode()
    pieces: list[bytes] = []
    at = 0
    for match in sorted(ranges, key=lambda r: r.start_byte):
        start, end = max(match.start_byte, at), min(match.end_byte, len(raw))
        if start >= end:
            continue
        pieces += [raw[at:start], MARK_OPEN.encode(), raw[start:end], MARK_CLOSE.encode()]
        at = end
    pieces.append(raw[at:])
    return b"".join(pieces).decode(errors="replace")


def _symbol_note(line: search_pb2.LineMatch) -> str:
    symbol = line.symbol
    if not symbol.name:
        return ""
    name = symbol.qualified_name or symbol.name
    if line.is_definition:
        return f"  [definition: {symbol.kind} {name}]"
    return f"  [in {symbol.kind} {name}]"


def search_code(response: search_pb2.SearchCodeResponse, cap: int) -> str:
    """search_code renders one page of code search results."""
    out = Output(cap)
    for file in response.file_matches:
        where = f" (repository {file.repository})" if file.repository else ""
        out.add(f"# {file.path}{where} — {file.match_count} matching lines")
        previous = 0
        matches = list(file.line_matches)
        for index, line in enumerate(matches):
            # Context after a line stops before the next matching line, which is shown as a match.
            following = matches[index + 1].line_number if index + 1 < len(matches) else None
            after = list(line.after)
            if following is not None:
                after = after[: max(0, following - line.line_number - 1)]
            first_before = line.line_number - len(line.before)
            if previous and first_before > previous + 1:
                out.add("--")
            for offset, text in enumerate(line.before):
                number = first_before + offset
                if number > previous:
                    out.add(f"{file.path}-{number}- {clip(text)}")
            out.add(
                f"{file.path}:{line.line_number}: {clip(marked(line.line, line.ranges))}{_symbol_note(line)}"
            )
            for offset, text in enumerate(after, start=1):
                out.add(f"{file.path}-{line.line_number + offset}- {clip(text)}")
            previous = line.line_number + len(after)
        out.add("")
    limit = "yes — totals are lower bounds" if response.limit_hit else "no"
    footer = [
        f"{response.total_match_count} matching lines in {response.total_file_count} files;"
        f" this page shows {len(response.file_matches)} files; limit_hit: {limit};"
        f" index revision {response.index_revision}"
    ]
    if not response.file_matches:
        footer.insert(0, "no matches")
    if response.next_page_token:
        footer.append(f"more files: call again with page_token={response.next_page_token!r}")
    return out.text(footer)


def search_symbols(response: search_pb2.SearchSymbolsResponse, cap: int) -> str:
    """search_symbols renders symbol search results, one definition a line."""
    out = Output(cap)
    for symbol in response.symbols:
        name = symbol.qualified_name or symbol.name
        where = f" (repository {symbol.repository})" if symbol.repository else ""
        line = f"{symbol.path}:{symbol.start_line}: {symbol.kind} {name}{where}"
        if symbol.line:
            line += f" — {clip(symbol.line.strip(), 160)}"
        out.add(line)
    footer = [
        f"{response.total_count} symbols; this page shows {len(response.symbols)};"
        f" limit_hit: {'yes' if response.limit_hit else 'no'}; index revision {response.index_revision}"
    ]
    if not response.symbols:
        footer.insert(0, "no symbols")
    return out.text(footer, advice="use a longer pattern, kind, or lower limit")


def document(doc: document_pb2.Document, start: int, end: int, cap: int) -> str:
    """document renders lines `start`..`end` (1-based, inclusive; 0 = to the end) numbered like `cat -n`."""
    where = f" (repository {doc.repository_name})" if doc.repository_name else ""
    head = f"# {doc.path}{where} — {doc.language or 'text'}, revision {doc.revision}"
    if doc.WhichOneof("body") != "text":
        return f"{head}\n[binary content ({doc.size} bytes) is not shown]"
    lines = doc.text.splitlines()
    last = len(lines) if end <= 0 else min(end, len(lines))
    first = max(start, 1)
    out = Output(cap)
    out.add(f"{head}, lines {first}-{last} of {len(lines)}")
    width = len(str(last))
    for number in range(first, last + 1):
        out.add(f"{number:>{width}}| {clip(lines[number - 1], 2000)}")
    return out.text(advice="read a smaller range with start_line/end_line")


def repositories(found: list[repository_pb2.Repository], cap: int) -> str:
    """repositories renders the caller's repositories, one a line."""
    out = Output(cap)
    for repo in found:
        state = repository_pb2.Repository.State.Name(repo.state)
        commit = f" commit {repo.last_synced_commit[:12]}" if repo.last_synced_commit else ""
        out.add(
            f"{repo.full_name}  [{state}] {repo.document_count} documents{commit}  id={repo.id}  {repo.url}"
        )
    return out.text([f"{len(found)} repositories"] if found else ["no repositories"])


def index_status(status: search_pb2.IndexStatus) -> str:
    """index_status renders the caller's index state and how far it lags Postgres."""
    state = search_pb2.IndexStatus.State.Name(status.state)
    lag = status.latest_revision - status.revision
    lines = [
        f"state: {state}",
        f"covered revision: {status.revision} (latest written: {status.latest_revision}; {lag} behind)",
        f"documents: {status.document_count} indexed, {status.skipped_document_count} skipped",
        f"symbols: {status.symbol_count}; segments: {status.segment_count}; bytes: {status.index_bytes}",
    ]
    lines.extend(f"skipped {document_pb2.SkipReason.Code.Name(s.reason)}: {s.count}" for s in status.skipped)
    if status.message:
        lines.append(f"message: {status.message}")
    return "\n".join(lines)


def upserted(response: ingest_pb2.UpsertDocumentsResponse, cap: int) -> str:
    """upserted renders each pushed file's outcome and the revision to search at."""
    out = Output(cap)
    for result in response.results:
        if result.field_violations:
            why = "; ".join(f"{v.field}: {v.description}" for v in result.field_violations)
            out.add(f"{result.path}: refused ({why})")
            continue
        outcome = "unchanged" if result.unchanged else "created" if result.created else "updated"
        state = document_pb2.Document.IndexState.Name(result.index_state)
        skip = f" ({result.skip_reason.message})" if result.skip_reason.message else ""
        out.add(f"{result.path}: {outcome}, revision {result.revision}, {state}{skip}")
    footer = [
        f"revision: {response.revision} — pass min_revision={response.revision} to search_code or"
        " search_symbols to see these writes"
    ]
    return out.text(footer, advice="push fewer files per call")


def job(found: job_pb2.Job, revision: int | None) -> str:
    """job renders a sync job's state and, once it succeeded, the revision to search at."""
    state = job_pb2.Job.State.Name(found.state)
    progress = found.progress
    lines = [
        f"job {found.id}: {state}",
        f"files: {progress.files_processed}/{progress.files_total} processed,"
        f" {progress.files_indexed} indexed,"
        f" {progress.files_skipped} skipped, {progress.files_deleted} deleted",
    ]
    if found.commit_sha:
        lines.append(f"commit: {found.commit_sha}")
    if found.error.message:
        lines.append(f"error: {found.error.message}")
    if revision is not None:
        lines.append(
            f"revision: {revision} — pass min_revision={revision} to search_code to search the synced files"
        )
    elif found.state not in (job_pb2.Job.FAILED, job_pb2.Job.CANCELLED):
        lines.append(
            "still running: index_status shows the latest written revision once it finishes;"
            " pass that as min_revision"
        )
    return "\n".join(lines)
