"""Bad requests to the search RPCs answer INVALID_ARGUMENT (or UNAVAILABLE), never INTERNAL.

Each case checks the status code and the ErrorInfo reason; query syntax errors also carry the
position and what was expected, and a min_revision the index cannot reach in time carries
RetryInfo.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import pytest
from kotadb.v1 import search_pb2

from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details
from tests.search.conftest import Services, caller


async def _refusal(
    services: Services, user: uuid.UUID, **fields: Any
) -> tuple[grpc.StatusCode, dict[str, Any]]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await services.search(user, **fields)
    return raised.value.code(), unpack_details(status_details(raised.value))


@pytest.fixture(scope="module")
async def tenant(services: Services, user_factory: UserFactory) -> tuple[uuid.UUID, int]:
    user = await user_factory()
    files = {f"src/f{i}.py": f"def handler_{i}():\n    return {i}\n" for i in range(5)}
    written = await services.write(user, files)
    await services.search(user, "handler", min_revision=written.revision)
    return user, written.revision


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"query": ""}, "EMPTY_QUERY"),
        ({"query": "   "}, "EMPTY_QUERY"),
        ({"query": "x" * 5000}, "QUERY_TOO_LONG"),
        ({"query": "handler", "page_size": -1}, "INVALID_PAGE_SIZE"),
        ({"query": "handler", "page_size": 1001}, "INVALID_PAGE_SIZE"),
        ({"query": "handler", "page_size": 2**31 - 1}, "INVALID_PAGE_SIZE"),
        ({"query": "handler", "context_lines": 11}, "OUT_OF_RANGE"),
        ({"query": "handler", "context_lines": -1}, "OUT_OF_RANGE"),
        ({"query": "handler", "min_revision": -5}, "OUT_OF_RANGE"),
        ({"query": "handler", "max_matches_per_file": -1}, "OUT_OF_RANGE"),
        ({"query": "handler", "page_token": "not a token!"}, "INVALID_PAGE_TOKEN"),
        (
            {"query": "handler", "page_token": base64.urlsafe_b64encode(b"x" * 64).decode()},
            "INVALID_PAGE_TOKEN",
        ),
        ({"query": "handler", "page_token": "A" * 9000}, "INVALID_PAGE_TOKEN"),
        ({"query": "/a(b/"}, "INVALID_REGEX"),
        ({"query": "a(b", "regex": True}, "INVALID_REGEX"),
        ({"query": "(handler"}, "INVALID_QUERY"),
        ({"query": "handler", "min_revision": 2**62}, "REVISION_IN_FUTURE"),
    ],
)
async def test_bad_search_requests_are_invalid_argument(
    services: Services, tenant: tuple[uuid.UUID, int], fields: dict[str, Any], reason: str
) -> None:
    code, details = await _refusal(services, tenant[0], **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details["ErrorInfo"].reason == reason


async def test_query_syntax_errors_say_where_and_what_was_expected(
    services: Services, tenant: tuple[uuid.UUID, int]
) -> None:
    _, details = await _refusal(services, tenant[0], query="(handler")
    info = details["ErrorInfo"]
    assert info.metadata["position"].isdigit() and info.metadata["expected"]
    assert details["BadRequest"].field_violations[0].field == "query"


async def test_page_size_zero_means_the_default(services: Services, tenant: tuple[uuid.UUID, int]) -> None:
    found = await services.search(tenant[0], "handler", page_size=0)
    assert found.total_file_count == 5 and len(found.file_matches) == 5


async def test_a_revision_not_reached_in_time_is_unavailable_with_retry_info(
    services: Services, user_factory: UserFactory, pool: Any, tenant: tuple[uuid.UUID, int]
) -> None:
    user = tenant[0]
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # An open write of this tenant holds its covered revision below the revision it drew.
        await conn.execute(
            "insert into public.documents (user_id, path, content) values ($1, 'held.txt', 'held')", user
        )
        later = await services.write(user, {"later.txt": "handler later\n"})
        code, details = await _refusal(
            services, user, query="handler", min_revision=later.revision, timeout={"nanos": 300_000_000}
        )
        await tx.rollback()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details["ErrorInfo"].reason == "INDEX_NOT_CAUGHT_UP"
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0


async def test_symbol_search_refuses_bad_pages(services: Services, tenant: tuple[uuid.UUID, int]) -> None:
    stub = services.search_stub()
    for request, reason in (
        (search_pb2.SearchSymbolsRequest(query="handler", page_size=-3), "INVALID_PAGE_SIZE"),
        (search_pb2.SearchSymbolsRequest(pattern="handler", limit=5000), "INVALID_PAGE_SIZE"),
        (search_pb2.SearchSymbolsRequest(query="handler", page_token="garbage"), "INVALID_PAGE_TOKEN"),
        (search_pb2.SearchSymbolsRequest(query=""), "EMPTY_QUERY"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SearchSymbols(request, metadata=caller(tenant[0]))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert unpack_details(status_details(raised.value))["ErrorInfo"].reason == reason


async def test_symbol_page_tokens_belong_to_their_tenant_and_pattern(
    services: Services, tenant: tuple[uuid.UUID, int], user_factory: UserFactory
) -> None:
    stub = services.search_stub()
    first = await stub.SearchSymbols(
        search_pb2.SearchSymbolsRequest(query="handler", page_size=2), metadata=caller(tenant[0])
    )
    assert first.total_count == 5 and len(first.symbols) == 2 and first.next_page_token
    names = [s.name for s in first.symbols]
    token = first.next_page_token
    while token:
        page = await stub.SearchSymbols(
            search_pb2.SearchSymbolsRequest(query="handler", page_size=2, page_token=token),
            metadata=caller(tenant[0]),
        )
        names += [s.name for s in page.symbols]
        token = page.next_page_token
    assert sorted(names) == [f"handler_{i}" for i in range(5)]
    stranger = await user_factory()
    for user, query in ((stranger, "handler"), (tenant[0], "other")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SearchSymbols(
                search_pb2.SearchSymbolsRequest(query=query, page_size=2, page_token=first.next_page_token),
                metadata=caller(user),
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_budget_spent_before_the_search_starts_is_deadline_exceeded(
    services: Services, tenant: tuple[uuid.UUID, int]
) -> None:
    # One nanosecond is gone before the engine looks at the clock: the engine's deadline error.
    code, details = await _refusal(services, tenant[0], query="handler", timeout={"nanos": 1})
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details["ErrorInfo"].reason == "SEARCH_DEADLINE"


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"query": "(handler"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY"),
        ({"query": "a(b", "regex": True}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REGEX"),
        ({"query": "handler", "max_file_count": -1}, grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE"),
        ({"query": "handler", "timeout": {"nanos": 1}}, grpc.StatusCode.DEADLINE_EXCEEDED, "SEARCH_DEADLINE"),
    ],
)
async def test_bad_stream_requests_are_refused_with_their_reason(
    services: Services,
    tenant: tuple[uuid.UUID, int],
    fields: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    call = services.search_stub().StreamSearchCode(
        search_pb2.StreamSearchCodeRequest(**fields), metadata=caller(tenant[0])
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [m async for m in call]
    assert raised.value.code() == code
    assert unpack_details(status_details(raised.value))["ErrorInfo"].reason == reason
