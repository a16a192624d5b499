"""Transport specifics: the gateway's checks on `/mcp`, the forwarded identity, rate limits as tool errors.

* HTTP through the gateway without a key is refused by Envoy's ext_authz (401) before the MCP
  server sees it; a request that reaches the MCP server directly, bypassing the gateway, has no
  signed identity and every tool answers UNAUTHENTICATED; a forged identity header is rejected
  by the services.
* stdio with a key allowed two requests a minute: once the gateway refuses, the tool answers a
  tool error naming RESOURCE_EXHAUSTED and the retry time, and the server keeps running.
"""

from __future__ import annotations

import httpx2
import pytest
from mcp_types import CallToolResult, TextContent

from tests.mcp.conftest import McpStack, connect, stdio_client


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
