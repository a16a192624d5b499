"""Structured logging: one JSON object per line on stderr, with the current RPC's context.

The request interceptor stores the request id and method in context variables; every record
logged while that RPC runs (in its task, or in tasks it spawns, which copy the context) carries
them without the caller passing them along. Extra fields go through `extra={"fields": {...}}`.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kotadb_request_id", default=None)
method_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kotadb_method", default=None)

# Attributes every LogRecord has; anything else set through `extra=` is treated as a field.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """JsonFormatter renders a record as one JSON object: ts, level, logger, msg, context, fields."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """format returns the single-line JSON form of `record`."""
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            entry["service"] = self.service
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        method = method_var.get()
        if method is not None:
            entry["method"] = method
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        for key, value in vars(record).items():
            if key not in _RESERVED and key != "fields" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", *, service: str | None = None, stream: TextIO | None = None
) -> None:
    """configure_logging sends the root logger's records, as JSON lines, to `stream` (stderr).

    Calling it again replaces the handler it installed earlier rather than adding another, so
    tests that start several services in one process do not duplicate lines.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_kotadb", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler._kotadb = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


@contextmanager
def log_context(*, request_id: str | None, method: str | None) -> Iterator[None]:
    """log_context sets the request id and method for records logged inside the block."""
    rid_token = request_id_var.set(request_id)
    method_token = method_var.set(method)
    try:
        yield
    finally:
        method_var.reset(method_token)
        request_id_var.reset(rid_token)


def current_request_id() -> str | None:
    """current_request_id is the id of the RPC being served in this context, if any."""
    return request_id_var.get()
