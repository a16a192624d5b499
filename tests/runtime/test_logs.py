"""The JSON log format: one object per line, with the RPC context and extra fields."""

from __future__ import annotations

import io
import json
import logging

from services.common.logs import configure_logging, log_context


def test_records_are_single_line_json_with_context() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("DEBUG", service="ingest", stream=stream)
        configure_logging("DEBUG", service="ingest", stream=stream)  # replaces, does not duplicate
        logger = logging.getLogger("kotadb.test")
        with log_context(request_id="rid-7", method="/kotadb.v1.IngestService/GetJob"):
            logger.info("multi\nline %s", "message", extra={"fields": {"duration_ms": 1.5}, "job": "j1"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
        logger.debug("outside")
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["msg"] == "multi\nline message"
    assert first["level"] == "INFO"
    assert first["logger"] == "kotadb.test"
    assert first["service"] == "ingest"
    assert first["request_id"] == "rid-7"
    assert first["method"] == "/kotadb.v1.IngestService/GetJob"
    assert first["duration_ms"] == 1.5
    assert first["job"] == "j1"
    assert first["ts"].endswith("Z")
    assert "request_id" not in second
    assert "RuntimeError: boom" in second["exception"]
    assert third["level"] == "DEBUG"
