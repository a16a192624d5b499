"""Conversions between search protos and domain values, as paired `x_from_proto` / `x_to_proto` functions.

The engine's columns are 1-based code points; the proto's are 0-based (search.proto `Range`),
so they are shifted here. Byte offsets are the engine's, relative to the line.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2
from kotadb.v1 import document_pb2, search_pb2

from services.search.engine.model import Symbol
from services.search.engine.search.results import FileMatch, LimitReason, SearchMode, SearchResult
from services.search.searches import (
    CodeAnswer,
    CodeQuery,
    StatusAnswer,
    SymbolAnswer,
    SymbolQuery,
    check_common,
    check_page_size,
)
from services.search.streams import StreamBatch

DEFAULT_MATCHES_PER_FILE = 50

_MODES = {
    search_pb2.SEARCH_MODE_UNSPECIFIED: SearchMode.FIRST_PAGE,
    search_pb2.SEARCH_MODE_FIRST_PAGE: SearchMode.FIRST_PAGE,
    search_pb2.SEARCH_MODE_EXHAUSTIVE: SearchMode.EXHAUSTIVE,
}
_LIMITS = {
    LimitReason.FILE_LIMIT: search_pb2.SearchStats.FILE_LIMIT,
    LimitReason.MATCH_LIMIT: search_pb2.SearchStats.MATCH_LIMIT,
    LimitReason.DEADLINE: search_pb2.SearchStats.DEADLINE,
}
_SKIPS = {
    "binary": document_pb2.SkipReason.BINARY,
    "invalid_utf8": document_pb2.SkipReason.INVALID_UTF8,
    "too_large": document_pb2.SkipReason.TOO_LARGE,
    "too_many_trigrams": document_pb2.SkipReason.TOO_MANY_TRIGRAMS,
    "excluded": document_pb2.SkipReason.EXCLUDED,
    "empty": document_pb2.SkipReason.EMPTY,
}
_STATES = {
    "READY": search_pb2.IndexStatus.READY,
    "BUILDING": search_pb2.IndexStatus.BUILDING,
    "REBUILDING": search_pb2.IndexStatus.REBUILDING,
    "ERROR": search_pb2.IndexStatus.ERROR,
}


def _timeout(message: search_pb2.SearchCodeRequest | search_pb2.StreamSearchCodeRequest) -> float | None:
    if not message.HasField("timeout"):
        return None
    return float(message.timeout.seconds) + message.timeout.nanos / 1e9


def code_query_from_proto(request: search_pb2.SearchCodeRequest) -> CodeQuery:
    """code_query_from_proto checks a SearchCodeRequest and returns the domain query."""
    check_common(
        request.query,
        request.context_lines,
        request.min_revision,
        request.max_matches_per_file,
        request.page_token,
    )
    return CodeQuery(
        query=request.query,
        page_size=check_page_size(request.page_size),
        page_token=request.page_token,
        context_lines=request.context_lines,
        min_revision=request.min_revision,
        mode=_MODES.get(request.mode, SearchMode.FIRST_PAGE),
        max_matches_per_file=request.max_matches_per_file or DEFAULT_MATCHES_PER_FILE,
        regex=request.regex,
        timeout=_timeout(request),
    )


def stream_query_from_proto(request: search_pb2.StreamSearchCodeRequest) -> CodeQuery:
    """stream_query_from_proto checks a StreamSearchCodeRequest and returns the domain query."""
    check_common(request.query, request.context_lines, request.min_revision, request.max_matches_per_file, "")
    return CodeQuery(
        query=request.query,
        page_size=None,
        page_token="",
        context_lines=request.context_lines,
        min_revision=request.min_revision,
        mode=SearchMode.EXHAUSTIVE,
        max_matches_per_file=request.max_matches_per_file or DEFAULT_MATCHES_PER_FILE,
        regex=request.regex,
        timeout=_timeout(request),
    )


def symbol_query_from_proto(request: search_pb2.SearchSymbolsRequest) -> SymbolQuery:
    """symbol_query_from_proto checks a SearchSymbolsRequest (or its KotaDB-compatible spelling)."""
    pattern = (request.query or request.pattern).strip()
    field = "query" if request.query or not request.pattern else "pattern"
    check_common(pattern, 0, request.min_revision, 0, request.page_token, query_field=field)
    if len(pattern) > 2 and pattern.startswith("/") and pattern.endswith("/"):
        pattern = pattern[1:-1]
    size_field = "page_size" if request.page_size or not request.limit else "limit"
    return SymbolQuery(
        pattern=pattern,
        page_size=check_page_size(request.page_size or request.limit, size_field),
        page_token=request.page_token,
        kinds=tuple(request.kinds),
        language=request.language,
        repository=request.repository,
        path_prefix=request.path_prefix,
        min_revision=request.min_revision,
    )


def file_match_to_proto(match: FileMatch, max_lines: int) -> search_pb2.FileMatch:
    """file_match_to_proto converts one matching file, keeping at most `max_lines` line matches."""
    out = search_pb2.FileMatch()
    fill_file_match(out, match, max_lines)
    return out


def fill_file_match(out: search_pb2.FileMatch, match: FileMatch, max_lines: int) -> None:
    """fill_file_match writes one matching file into `out`, keeping at most `max_lines` line matches.

    Fields are set in place on messages added to their parents rather than built as keyword
    messages and copied in: a first page has thousands of lines, ranges and symbols, and this
    conversion runs once per search (searches.py runs it in the search thread, off the loop).
    """
    out.path = match.path
    out.repository = match.repository
    out.language = match.language
    out.score = match.score
    out.match_count = match.match_count
    out.document_id = match.external_id
    definitions = {s.start_line for s in match.symbols}
    lines = out.line_matches
    for line in match.line_matches[:max_lines]:
        proto = lines.add()
        number = line.line_number
        proto.line_number = number
        proto.line = line.text
        proto.line_start = line.line_start
        ranges = proto.ranges
        for r in line.ranges:
            ranges.add(
                start_byte=r.start,
                end_byte=r.end,
                start_column=r.start_column - 1,
                end_column=r.end_column - 1,
            )
        if line.before:
            proto.before.extend([c.text for c in line.before])
        if line.after:
            proto.after.extend([c.text for c in line.after])
        symbol = line.symbol
        proto.is_definition = number in definitions or (symbol is not None and symbol.start_line == number)
        if symbol is not None:
            _fill_symbol(proto.symbol, symbol)
    path_ranges = out.path_ranges
    for a, b in match.path_ranges:
        path_ranges.add(
            start_byte=a, end_byte=b, start_column=_column(match.path, a), end_column=_column(match.path, b)
        )


def _fill_symbol(out: search_pb2.Symbol, symbol: Symbol) -> None:
    out.name = symbol.name
    out.kind = symbol.kind
    out.qualified_name = symbol.qualified_name
    out.parent = symbol.parent
    out.start_line = symbol.start_line
    out.end_line = symbol.end_line


def _limit_reason(result: SearchResult) -> search_pb2.SearchStats.LimitReason.ValueType:
    if result.limit_reason is None:
        return search_pb2.SearchStats.LIMIT_REASON_UNSPECIFIED
    return _LIMITS.get(result.limit_reason, search_pb2.SearchStats.LIMIT_REASON_UNSPECIFIED)


def _column(text: str, byte_offset: int) -> int:
    return len(text.encode("utf-8")[:byte_offset].decode("utf-8", "ignore"))


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return out


def stats_to_proto(result: SearchResult, wait_seconds: float) -> search_pb2.SearchStats:
    """stats_to_proto converts the engine's stats (and the min_revision wait)."""
    stats = result.stats
    return search_pb2.SearchStats(
        candidate_count=stats.candidates,
        files_verified=stats.files_verified,
        segments_searched=stats.segments_searched,
        duration=_duration(stats.duration_seconds),
        plan=stats.plan,
        full_scan=stats.scan_fallback,
        wait_duration=_duration(wait_seconds),
    )


def code_answer_to_proto(answer: CodeAnswer, max_lines: int) -> search_pb2.SearchCodeResponse:
    """code_answer_to_proto renders one page of a code search."""
    result = answer.result
    response = search_pb2.SearchCodeResponse(
        total_file_count=result.file_count,
        total_match_count=result.match_count,
        limit_hit=result.limit_hit,
        limit_reason=_limit_reason(result),
        stats=stats_to_proto(result, answer.wait_seconds),
        next_page_token=result.next_cursor or "",
        index_revision=answer.revision,
    )
    files = response.file_matches
    for match in result.files:
        fill_file_match(files.add(), match, max_lines)
    return response


def stream_batch_to_proto(batch: StreamBatch, max_lines: int) -> search_pb2.StreamSearchCodeResponse:
    """stream_batch_to_proto renders one batch of a streamed search, with the candidates verified so far."""
    response = search_pb2.StreamSearchCodeResponse(
        stats=search_pb2.SearchStats(files_verified=batch.verified), index_revision=batch.revision
    )
    files = response.file_matches
    for match in batch.files:
        fill_file_match(files.add(), match, max_lines)
    return response


def stream_summary_to_proto(answer: CodeAnswer) -> search_pb2.StreamSearchCodeResponse:
    """stream_summary_to_proto renders the last message of a streamed search: totals, limit and stats."""
    result = answer.result
    return search_pb2.StreamSearchCodeResponse(
        done=True,
        total_file_count=result.file_count,
        total_match_count=result.match_count,
        limit_hit=result.limit_hit,
        limit_reason=_limit_reason(result),
        stats=stats_to_proto(result, answer.wait_seconds),
        index_revision=answer.revision,
    )


def symbol_answer_to_proto(answer: SymbolAnswer) -> search_pb2.SearchSymbolsResponse:
    """symbol_answer_to_proto renders one page of a symbol search."""
    return search_pb2.SearchSymbolsResponse(
        symbols=[
            search_pb2.SymbolMatch(
                name=h.match.symbol.name,
                kind=h.match.symbol.kind,
                qualified_name=h.match.symbol.qualified_name,
                path=h.match.path,
                repository=h.match.repository,
                language=h.match.language,
                start_line=h.match.symbol.start_line,
                end_line=h.match.symbol.end_line,
                parent=h.match.symbol.parent,
                score=h.score,
                document_id=h.document_id,
                line=h.line,
            )
            for h in answer.hits
        ],
        total_count=answer.total,
        next_page_token=answer.next_token,
        index_revision=answer.revision,
    )


def status_to_proto(answer: StatusAnswer, replica: str) -> search_pb2.IndexStatus:
    """status_to_proto renders a tenant index's status."""
    status = search_pb2.IndexStatus(
        state=_STATES.get(answer.state, search_pb2.IndexStatus.STATE_UNSPECIFIED),
        revision=answer.revision,
        latest_revision=answer.latest_revision,
        document_count=answer.document_count,
        skipped_document_count=sum(answer.skipped.values()),
        skipped=[
            search_pb2.IndexStatus.SkipCount(
                reason=_SKIPS.get(reason, document_pb2.SkipReason.CODE_UNSPECIFIED), count=count
            )
            for reason, count in sorted(answer.skipped.items())
        ],
        segment_count=answer.segment_count,
        index_bytes=answer.index_bytes,
        content_bytes=answer.content_bytes,
        symbol_count=answer.symbol_count,
        message=answer.message,
        replica=replica,
    )
    if answer.state == "READY" and answer.document_count == 0 and not answer.skipped:
        status.state = search_pb2.IndexStatus.EMPTY
    if answer.update_time:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(answer.update_time * 1e9))
        status.update_time.CopyFrom(stamp)
    return status
