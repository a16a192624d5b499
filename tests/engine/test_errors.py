"""Tests of the engine's error tree (engine/errors.py) and its one mapping to domain errors.

Every error a caller can provoke through the engine is an EngineError with the right kind,
and services/search/engine_errors.py turns each into the code and reason the service returns
(one test per row of its table; the service-level paths are in tests/search/test_bad_input.py).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.search.engine import errors
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
from services.search.engine.index.index import Index, IndexLockedError
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument
from services.search.engine.query.regexsyntax import RegexSyntaxError
from services.search.engine.search.searcher import Searcher
from services.search.engine_errors import INDEX_RETRY_SECONDS, domain_error

FIXTURE = Path(__file__).parent / "fixtures" / "format_v1" / "index"


@pytest.fixture
def searcher(tmp_path: Path) -> Searcher:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        for i in range(3):
            writer.add(SourceDocument(f"d{i}", f"src/d{i}.py", b"needle = 1\n"))
        writer.commit()
    return Searcher(index)


def test_every_kind_has_one_subclass_of_the_root() -> None:
    kinds = {
        cls.kind
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, EngineError) and cls is not EngineError
    }
    assert kinds == {"index", "query_syntax", "pattern", "cursor", "cancelled", "deadline"}
    for cls in (IndexCorruptError, IndexVersionError, IndexNotFoundError, IndexLockedError):
        assert issubclass(cls, IndexFileError)


def test_query_errors_map_to_invalid_argument_with_the_field(searcher: Searcher) -> None:
    with pytest.raises(QuerySyntaxError) as syntax:
        searcher.search('foo "unterminated')
    mapped = domain_error(syntax.value)
    assert mapped.code is grpc.StatusCode.INVALID_ARGUMENT and mapped.reason == "INVALID_QUERY"
    assert mapped.metadata["position"] == str(syntax.value.position)
    with pytest.raises(InvalidPatternError) as pattern:
        searcher.search("(oops", regex=True)
    mapped = domain_error(pattern.value)
    assert (mapped.code, mapped.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REGEX")
    with pytest.raises(QuerySyntaxError) as in_query:
        searcher.search("foo /(oops/")
    assert domain_error(in_query.value).reason == "INVALID_REGEX"
    unreadable = RegexSyntaxError("missing )", 4)
    assert isinstance(unreadable, InvalidPatternError)
    assert domain_error(unreadable).metadata == {"position": "4"}
    with pytest.raises(CursorError) as cursor:
        searcher.search("needle", cursor="garbage")
    mapped = domain_error(cursor.value, cursor_field="page_token")
    assert (mapped.code, mapped.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert mapped.metadata["cause"] == cursor.value.reason == "malformed"
    stale = domain_error(CursorError("old", reason="stale_generation"))
    assert (stale.code, stale.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PAGE_TOKEN_EXPIRED")


def test_cancel_and_past_deadline_raise_and_map(searcher: Searcher) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SearchCancelled) as cancelled:
        searcher.search("needle", cancel=cancel)
    assert domain_error(cancelled.value).code is grpc.StatusCode.ABORTED
    with pytest.raises(SearchDeadlineError) as late:
        searcher.search("needle", deadline=searcher.clock() - 1)
    assert domain_error(late.value).code is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(SearchDeadlineError), searcher.stream("needle", deadline=searcher.clock() - 1):
        pass


def test_index_errors_are_unavailable_and_never_leak_paths(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError) as missing:
        Index.open(tmp_path / "nothing")
    mapped = domain_error(missing.value)
    assert (mapped.code, mapped.reason) == (grpc.StatusCode.UNAVAILABLE, "INDEX_NOT_READY")
    assert str(tmp_path) not in mapped.message
    copy = tmp_path / "v1"
    shutil.copytree(FIXTURE, copy)
    (copy / "seg-00000001" / "meta.json").write_text("{}")
    with pytest.raises(IndexCorruptError) as corrupt:
        Index.open(copy).snapshot()
    assert domain_error(corrupt.value).reason == "INDEX_CORRUPT"
    version = IndexVersionError(copy / "manifest-000000000002.json", 9)
    assert domain_error(version).code is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("cause", ["malformed", "tampered", "unsupported_version", "query_mismatch"])
def test_every_foreign_cursor_is_an_invalid_page_token(cause: str) -> None:
    mapped = domain_error(CursorError("no", reason=cause), cursor_field="page_token")
    assert (mapped.code, mapped.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert isinstance(mapped, InvalidArgument)
    assert [v.field for v in mapped.field_violations] == ["page_token"]
    assert mapped.metadata == {"cause": cause}


def test_a_bad_regex_in_a_query_keeps_its_position_and_expectation(searcher: Searcher) -> None:
    with pytest.raises(QuerySyntaxError) as in_query:
        searcher.search("foo /(oops/")
    mapped = domain_error(in_query.value, query_field="q")
    assert isinstance(mapped, InvalidArgument)
    assert mapped.metadata == {"position": str(in_query.value.position), "expected": in_query.value.expected}
    assert [(v.field, v.reason) for v in mapped.field_violations] == [("q", "INVALID_REGEX")]


def test_other_index_errors_are_unavailable_with_retry_info(tmp_path: Path) -> None:
    for error, reason in (
        (IndexLockedError(tmp_path / "LOCK", "held by another writer"), "INDEX_LOCKED"),
        (IndexFileError(tmp_path / "seg", "unreadable"), "INDEX_UNAVAILABLE"),
        (EngineError("something else"), "INDEX_UNAVAILABLE"),
    ):
        mapped = domain_error(error)
        assert (mapped.code, mapped.reason) == (grpc.StatusCode.UNAVAILABLE, reason)
        assert isinstance(mapped, Unavailable) and mapped.retry_after == INDEX_RETRY_SECONDS
        assert str(tmp_path) not in mapped.message
