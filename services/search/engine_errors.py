"""engine_errors maps the engine's error tree (engine/errors.py) to the service's domain errors.

This is the one place where an engine failure becomes a gRPC code and reason: every search
path (searches.py's `Searches._engine`: code search, streaming, symbols, index status) calls
`domain_error` on an `EngineError` and raises what it returns; services/common/errors.py and
its interceptor turn that into a `google.rpc.Status`. The engine itself never imports grpc.
It decides by `isinstance` on engine/errors.py's tree, so a new subclass lands in its
parent's row until it gets its own.

| engine error                  | code                | reason               |
|-------------------------------|---------------------|----------------------|
| QuerySyntaxError              | INVALID_ARGUMENT    | INVALID_QUERY        |
|   ... caused by a bad /regex/ | INVALID_ARGUMENT    | INVALID_REGEX        |
| InvalidPatternError (and its  | INVALID_ARGUMENT    | INVALID_REGEX        |
| RegexSyntaxError)             |                     |                      |
| CursorError, stale_generation | FAILED_PRECONDITION | PAGE_TOKEN_EXPIRED   |
| CursorError, any other cause  | INVALID_ARGUMENT    | INVALID_PAGE_TOKEN   |
| SearchCancelled               | ABORTED             | SEARCH_CANCELLED     |
| SearchDeadlineError           | DEADLINE_EXCEEDED   | SEARCH_DEADLINE      |
| IndexNotFoundError            | UNAVAILABLE         | INDEX_NOT_READY      |
| IndexLockedError              | UNAVAILABLE         | INDEX_LOCKED         |
| IndexCorruptError             | UNAVAILABLE         | INDEX_CORRUPT        |
| IndexVersionError             | FAILED_PRECONDITION | INDEX_VERSION        |
| any other EngineError         | UNAVAILABLE         | INDEX_UNAVAILABLE    |

Index errors are the server's, not the caller's: the message names no file path (paths are
internals), and a corrupt or missing index is UNAVAILABLE because the service rebuilds it.
The search service catches `IndexFileError` before this mapping to start that rebuild
(tenants.py's `TenantManager.corrupt`, reason INDEX_REBUILDING); the index rows answer
where no rebuild can be started. A page token expires only once the snapshot its first page
pinned is released (pins.py) and the index has changed since. SearchCancelled only happens
once the client has gone, so nobody reads its status.
"""

from __future__ import annotations

from services.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    KotaError,
    Unavailable,
)
from services.search.engine.errors import (
    CursorError,
    EngineError,
    IndexFileError,
    InvalidPatternError,
    QuerySyntaxError,
    SearchCancelled,
    SearchDeadlineError,
)
from services.search.engine.index.format import IndexCorruptError, IndexNotFoundError, IndexVersionError
from services.search.engine.index.index import IndexLockedError

# Seconds a client should wait before retrying a search whose index is being (re)built.
INDEX_RETRY_SECONDS = 1.0


def domain_error(
    exc: EngineError, *, query_field: str = "query", cursor_field: str = "page_token"
) -> KotaError:
    """domain_error returns the domain error to raise for an engine error (see the table above).

    `query_field` and `cursor_field` name the request fields the violations point at.
    """
    if isinstance(exc, QuerySyntaxError):
        regex = isinstance(exc.__cause__, InvalidPatternError)
        reason = "INVALID_REGEX" if regex else "INVALID_QUERY"
        detail = f"{exc.message} at position {exc.position} (expected {exc.expected})"
        return InvalidArgument(
            f"invalid query: {detail}",
            field_violations=[FieldViolation(query_field, detail, reason)],
            reason=reason,
            metadata={"position": str(exc.position), "expected": exc.expected},
        )
    if isinstance(exc, InvalidPatternError):
        position = getattr(exc, "position", None)  # RegexSyntaxError knows where
        return InvalidArgument(
            f"invalid regular expression: {exc}",
            field_violations=[FieldViolation(query_field, str(exc), "INVALID_REGEX")],
            reason="INVALID_REGEX",
            metadata={} if position is None else {"position": str(position)},
        )
    if isinstance(exc, CursorError):
        if exc.reason == "stale_generation":
            return FailedPrecondition(
                "this page token has expired: the index changed and the snapshot its first page read"
                " is no longer kept; start the search again",
                reason="PAGE_TOKEN_EXPIRED",
            )
        return InvalidArgument(
            "the page token was not issued for this query and caller",
            field_violations=[FieldViolation(cursor_field, exc.reason, "INVALID_PAGE_TOKEN")],
            reason="INVALID_PAGE_TOKEN",
            metadata={"cause": exc.reason},
        )
    if isinstance(exc, SearchCancelled):
        return Aborted("the search was cancelled", reason="SEARCH_CANCELLED")
    if isinstance(exc, SearchDeadlineError):
        return DeadlineExceeded("the deadline passed before the search started", reason="SEARCH_DEADLINE")
    if isinstance(exc, IndexVersionError):
        return FailedPrecondition("the search index was written by a newer version", reason="INDEX_VERSION")
    if isinstance(exc, IndexFileError):
        reason = {
            IndexNotFoundError: "INDEX_NOT_READY",
            IndexLockedError: "INDEX_LOCKED",
            IndexCorruptError: "INDEX_CORRUPT",
        }.get(type(exc), "INDEX_UNAVAILABLE")
        return Unavailable(
            "the search index is not available", retry_after=INDEX_RETRY_SECONDS, reason=reason
        )
    return Unavailable(
        "the search index is not available", retry_after=INDEX_RETRY_SECONDS, reason="INDEX_UNAVAILABLE"
    )
