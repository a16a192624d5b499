"""Transport specifics: the gateway's checks on `/mcp`, the forwarded identity, rate limits as tool errors.

* HTTP through the gateway without a key is refused by Envoy's ext_authz (401) before the MCP
  server sees it; a request that reaches the MCP server directly, bypassing the gateway, has no
  signed identity and every tool answers UNAUTHENTICATED; a forged identity header is rejected
  by the services.
* HTTP with a key allowed two requests a minute: the third `/mcp` request is Envoy's 429 with
  Retry-After; every `/mcp` request is metered in usage_metrics for the caller.
* stdio with a key allowed two requests a minute: once the gateway refuses, the tool answers a
  tool error naming RESOURCE_EXHAUSTED and the retry time, and the server keeps running.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx2
import pytest
from mcp_types import CallToolResult, TextContent

from services.auth.routes import RouteTable
from tests.mcp.conftest import McpStack, connect, stdio_client, user_of


def text(result: CallToolResult) -> str:
    """text is a tool result's text content."""
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_gateway_refuses_mcp_without_a_key(mcp_stack: McpStack) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    async with httpx2.AsyncClient(timeout=60) as http:
        missing = await http.post(f"{mcp_stack.envoy.url}/mcp", json=body, headers=headers)
        wrong = await http.post(
            f"{mcp_stack.envoy.url}/mcp",
            json=body,
            headers={**headers, "authorization": "Bearer kdb_live_nope"},
        )
    assert missing.status_code == 401, missing.text
    assert wrong.status_code == 401, wrong.text


async def test_mcp_reached_around_the_gateway_acts_for_no_one(mcp_stack: McpStack) -> None:
    direct = f"{mcp_stack.mcp_direct}/mcp"
    async with connect(mcp_stack, "http", "", url=direct) as client:
        # Listing tools needs no caller; every tool call does.
        assert len((await client.list_tools()).tools) == 7
        result = await client.call_tool("index_status", {})
    assert result.is_error and "UNAUTHENTICATED" in text(result), text(result)


async def test_forged_identity_is_rejected_by_the_services(mcp_stack: McpStack) -> None:
    forged = "eyJzdWIiOiAiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIn0.c2lnbmF0dXJl"
    async with (
        httpx2.AsyncClient(headers={"x-kotadb-identity": forged}, timeout=60) as http,
    ):
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        async with Client(streamable_http_client(f"{mcp_stack.mcp_direct}/mcp", http_client=http)) as client:
            result = await client.call_tool("list_repositories", {})
    assert result.is_error and "UNAUTHENTICATED" in text(result), text(result)


@pytest.mark.timeout(300)
async def test_rate_limit_is_a_tool_error_with_the_retry_time(mcp_stack: McpStack) -> None:
    async with stdio_client(mcp_stack, mcp_stack.limited) as client:
        answers = [await client.call_tool("index_status", {}) for _ in range(3)]
        assert [a.is_error for a in answers] == [False, False, True], [text(a) for a in answers]
        refused = text(answers[2])
        assert "RESOURCE_EXHAUSTED RATE_LIMITED" in refused and "retry after" in refused
        assert "wait the retry time" in refused
        assert (await client.list_tools()).tools  # still serving


async def test_mcp_over_http_is_rate_limited_by_the_gateway(mcp_stack: McpStack) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "authorization": f"Bearer {mcp_stack.limited_http}",
    }
    async with httpx2.AsyncClient(timeout=60) as http:
        answers = [
            await http.post(f"{mcp_stack.envoy.url}/mcp", json=body, headers=headers) for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200, 200, 429], [a.text for a in answers]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert answers[2].json()["reason"] == "RATE_LIMITED"


async def test_mcp_requests_are_metered_for_the_caller(mcp_stack: McpStack) -> None:
    user = await user_of(mcp_stack.database_url, mcp_stack.reader)
    async with connect(mcp_stack, "http", mcp_stack.reader) as client:
        assert not (await client.call_tool("index_status", {})).is_error
    connection = await asyncpg.connect(mcp_stack.database_url)
    try:
        for _ in range(300):  # Envoy's access log and auth's meter both batch: poll, bounded
            count = await connection.fetchval(
                "select count(*) from public.usage_metrics where user_id = $1 and endpoint = '/mcp'",
                uuid.UUID(user),
            )
            if count:
                break
            await asyncio.sleep(0.1)
    finally:
        await connection.close()
    assert count >= 1


def test_auth_routes_know_the_mcp_path() -> None:
    table = RouteTable()
    for verb in ("GET", "POST", "DELETE"):
        route = table.resolve(verb, "/mcp")
        assert route is not None and route.permission == "read" and not route.sessions_allowed
    assert table.resolve("PUT", "/mcp") is None
    assert table.resolve("POST", "/mcp/other") is None
