"""errors holds the engine's one error tree: a root, `EngineError`, and a subclass per reason.

Every error the engine raises on purpose is an `EngineError`, so a caller (the search
service, the CLI) catches one type and maps it in one place; services/search/engine_errors.py
maps them to the service's domain errors and so to gRPC codes and reasons. Each subclass
carries a stable machine-readable `kind` and what a caller needs to explain it:

* `IndexFileError` (kind `index`): a file of an index is missing, corrupt, from a newer
  format or locked; `path` names the file. Subclasses refine it (format.py, index.py).
* `QuerySyntaxError` (`query_syntax`): `position` and `expected` say where and what.
* `InvalidPatternError` (`pattern`): RE2's message for a pattern it refused.
* `CursorError` (`cursor`): `reason` says why (malformed, tampered, stale, ...).
* `SearchCancelled` (`cancelled`): the caller's cancellation event was set mid-search.
* `SearchDeadlineError` (`deadline`): the deadline had passed before the search started (a
  deadline passing mid-search is not an error: the partial result says DEADLINE).

The value errors also subclass ValueError, as they did before this tree existed.
"""

from __future__ import annotations

import os


class EngineError(Exception):
    """EngineError is the root of every error the engine raises on purpose; `kind` names which."""

    kind = "engine"


class IndexFileError(EngineError):
    """IndexFileError is the base of every error about a file of an index; `path` names the file."""

    kind = "index"

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class QuerySyntaxError(EngineError, ValueError):
    """QuerySyntaxError names where a query stopped making sense and what would have fit there."""

    kind = "query_syntax"

    def __init__(self, message: str, position: int, expected: str) -> None:
        super().__init__(f"{message} at position {position} (expected {expected})")
        self.message = message
        self.position = position
        self.expected = expected


class InvalidPatternError(EngineError, ValueError):
    """InvalidPatternError carries RE2's message for a pattern it refused to compile."""

    kind = "pattern"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CursorError(EngineError, ValueError):
    """CursorError reports a cursor that cannot be used; `reason` is a stable machine name.

    Reasons: `malformed`, `tampered`, `unsupported_version`, `stale_generation`,
    `query_mismatch`.
    """

    kind = "cursor"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SearchCancelled(EngineError):
    """SearchCancelled is raised when the caller's cancellation event was set mid-search."""

    kind = "cancelled"


class SearchDeadlineError(EngineError):
    """SearchDeadlineError is raised when a search's deadline had passed before it started."""

    kind = "deadline"
