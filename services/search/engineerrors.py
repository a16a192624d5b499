"""engineerrors maps the search engine's exceptions to the shared error model, in one place.

The engine (services/search/engine) raises plain Python exceptions and knows nothing of gRPC;
`translated` turns those a caller can cause into `services.common.errors` subclasses, so bad
queries, patterns and page tokens answer INVALID_ARGUMENT (with the position and what was
expected) and a cancelled search CANCELLED-free: the client is gone. Anything else propagates
and becomes INTERNAL at the interceptor.

Engine imports (the whole surface this service uses is listed in tenants.py's docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, KotaError
from services.search.engine.cursor import CursorError
from services.search.engine.query import QuerySyntaxError
from services.search.engine.regexsyntax import RegexSyntaxError
from services.search.engine.verify import InvalidPatternError

# Cursor reasons (cursor.py) that mean "this token is not yours or not a token at all".
_FOREIGN_CURSOR = {"malformed", "tampered", "unsupported_version", "query_mismatch"}


def translate(exc: BaseException, *, query_field: str = "query") -> KotaError | None:
    """translate returns the shared error for an engine exception a caller can cause, else None."""
    if isinstance(exc, QuerySyntaxError):
        # A /regex/ term RE2 refused: still a query error, with its position, but named as a regex.
        regex = isinstance(exc.__cause__, (RegexSyntaxError, InvalidPatternError))
        reason = "INVALID_REGEX" if regex else "INVALID_QUERY"
        return InvalidArgument(
            f"invalid query: {exc.message} at position {exc.position} (expected {exc.expected})",
            reason=reason,
            field_violations=[FieldViolation(query_field, str(exc), reason)],
            metadata={"position": str(exc.position), "expected": exc.expected},
        )
    if isinstance(exc, RegexSyntaxError):
        return InvalidArgument(
            f"invalid regular expression: {exc.message} at position {exc.position}",
            reason="INVALID_REGEX",
            field_violations=[FieldViolation(query_field, str(exc), "INVALID_REGEX")],
            metadata={"position": str(exc.position)},
        )
    if isinstance(exc, InvalidPatternError):
        return InvalidArgument(
            f"invalid regular expression: {exc.message}",
            reason="INVALID_REGEX",
            field_violations=[FieldViolation(query_field, exc.message, "INVALID_REGEX")],
        )
    if isinstance(exc, CursorError):
        if exc.reason == "stale_generation":
            return FailedPrecondition(
                "the index changed since this page token was issued; start the search again",
                reason="PAGE_TOKEN_EXPIRED",
            )
        if exc.reason in _FOREIGN_CURSOR:
            return InvalidArgument(
                "page_token was not issued for this query and caller",
                reason="INVALID_PAGE_TOKEN",
                field_violations=[FieldViolation("page_token", str(exc), "INVALID_PAGE_TOKEN")],
                metadata={"cause": exc.reason},
            )
    return None


@contextlib.contextmanager
def translated(*, query_field: str = "query") -> Iterator[None]:
    """translated re-raises engine exceptions a caller can cause as shared errors."""
    try:
        yield
    except (QuerySyntaxError, RegexSyntaxError, InvalidPatternError, CursorError) as exc:
        mapped = translate(exc, query_field=query_field)
        if mapped is None:
            raise
        raise mapped from exc
