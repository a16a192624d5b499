"""KotaDB's MCP tools driven by the MCP SDK's own client, over stdio and Streamable HTTP, on a real stack.

Every test runs once per transport: stdio is a `kotadb mcp` subprocess calling the gateway with
the key in its environment; HTTP goes through Envoy's `/mcp` route (ext_authz on) to the
`kotadb mcp --http` process, which calls the services as the identity Check signed.
"""

from __future__ import annotations

import re
import secrets
import uuid

import grpc
import pytest
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc, repository_pb2
from mcp_types import CallToolResult, TextContent

from tests.ingest.jobhelpers import SourceRepo
from tests.mcp.conftest import TRANSPORTS, McpStack, add_repository, connect

pytestmark = pytest.mark.parametrize("transport", TRANSPORTS)

TOOLS = {
    "search_code",
    "search_symbols",
    "read_file",
    "list_repositories",
    "index_status",
    "push_files",
    "sync_repository",
}


def text(result: CallToolResult) -> str:
    """text is a tool result's text content."""
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def revision_of(answer: str) -> int:
    """revision_of reads the `revision: N` line a write tool returns."""
    found = re.search(r"^revision: (\d+)", answer, re.M)
    assert found, answer
    return int(found.group(1))


async def test_tools_are_listed_with_schemas_and_the_query_language(
    mcp_stack: McpStack, transport: str
) -> None:
    async with connect(mcp_stack, transport, mcp_stack.reader) as client:
        listed = (await client.list_tools()).tools
    by_name = {tool.name: tool for tool in listed}
    assert set(by_name) == TOOLS
    search = by_name["search_code"]
    assert search.description is not None
    for piece in ("lang:", "file:", "repo:", "case:yes", "RE2", "limit_hit", "page_token"):
        assert piece in search.description, piece
    properties = search.input_schema["properties"]
    assert set(properties) >= {"query", "regex", "limit", "context_lines", "page_token", "min_revision"}
    assert search.input_schema["required"] == ["query"]
    assert properties["limit"]["maximum"] == 100
    push = by_name["push_files"].input_schema
    assert push["required"] == ["files"]
    assert (
        by_name["search_code"].annotations is not None and by_name["search_code"].annotations.read_only_hint
    )
    assert (
        by_name["push_files"].annotations is not None and not by_name["push_files"].annotations.read_only_hint
    )


async def test_push_then_search_read_file_and_symbols_see_the_write(
    mcp_stack: McpStack, transport: str
) -> None:
    token = f"needle_{transport}_{secrets.token_hex(4)}"
    source = f"import os\n\n\ndef {token}(x):\n    return x + 1\n\n\nclass Holder:\n    value = '{token}'\n"
    path = f"pkg/{token}.py"
    async with connect(mcp_stack, transport, mcp_stack.alice) as client:
        pushed = await client.call_tool("push_files", {"files": [{"path": path, "content": source}]})
        assert not pushed.is_error, text(pushed)
        assert f"{path}: created" in text(pushed)
        revision = revision_of(text(pushed))

        found = await client.call_tool(
            "search_code", {"query": f"{token} lang:python", "min_revision": revision, "context_lines": 1}
        )
        answer = text(found)
        assert not found.is_error, answer
        assert f"{path}:4: def «{token}»(x):" in answer
        assert f"{path}-5-     return x + 1" in answer
        line_nine = [line for line in answer.splitlines() if line.startswith(f"{path}:9: ")]
        assert line_nine and line_nine[0].startswith(f"{path}:9:     value = '«{token}»'  [")
        assert "Holder" in line_nine[0]  # the enclosing (or defined) symbol
        assert "2 matching lines in 1 files" in answer and "limit_hit: no" in answer

        symbols = await client.call_tool("search_symbols", {"pattern": token, "min_revision": revision})
        assert not symbols.is_error, text(symbols)
        assert f"{path}:4: function {token}" in text(symbols)

        read = await client.call_tool("read_file", {"path": path, "start_line": 4, "end_line": 5})
        assert not read.is_error, text(read)
        assert text(read).splitlines()[1:] == [f"4| def {token}(x):", "5|     return x + 1"]

        status = await client.call_tool("index_status", {})
        assert not status.is_error and "state: READY" in text(status), text(status)
        repos = await client.call_tool("list_repositories", {})
        assert not repos.is_error and "no repositories" in text(repos), text(repos)


async def test_another_tenant_never_sees_the_data(mcp_stack: McpStack, transport: str) -> None:
    token = f"secret_{transport}_{secrets.token_hex(4)}"
    async with connect(mcp_stack, transport, mcp_stack.alice) as client:
        pushed = await client.call_tool("push_files", {"files": [{"path": f"{token}.txt", "content": token}]})
        revision = revision_of(text(pushed))
    async with connect(mcp_stack, transport, mcp_stack.bob) as client:
        # Bob's own write, so his index has a revision past Alice's (revisions are global).
        mine = await client.call_tool(
            "push_files", {"files": [{"path": "bob.txt", "content": "bob " + token[:3]}]}
        )
        assert not mine.is_error, text(mine)
        found = await client.call_tool(
            "search_code", {"query": token, "min_revision": revision_of(text(mine))}
        )
        assert not found.is_error, text(found)
        assert "no matches" in text(found) and f"{token}.txt" not in text(found)
        read = await client.call_tool("read_file", {"path": f"{token}.txt"})
        assert read.is_error and "NOT_FOUND" in text(read)
    assert revision > 0


async def test_read_only_key_is_refused_on_write_tools(mcp_stack: McpStack, transport: str) -> None:
    name = f"acme/readonly-{transport}-{secrets.token_hex(3)}"
    await add_repository(mcp_stack.database_url, mcp_stack.reader, name)
    async with connect(mcp_stack, transport, mcp_stack.reader) as client:
        pushed = await client.call_tool("push_files", {"files": [{"path": "a.txt", "content": "a"}]})
        assert pushed.is_error
        assert "PERMISSION_DENIED" in text(pushed) and "permission" in text(pushed)
        synced = await client.call_tool("sync_repository", {"repository": name, "wait_seconds": 0})
        assert synced.is_error and "PERMISSION_DENIED" in text(synced), text(synced)
        # Reading still works with the same key.
        listed = await client.call_tool("list_repositories", {})
        assert not listed.is_error and name in text(listed)


async def test_bad_arguments_and_queries_are_tool_errors(mcp_stack: McpStack, transport: str) -> None:
    async with connect(mcp_stack, transport, mcp_stack.reader) as client:
        bad = await client.call_tool("search_code", {"query": "foo (bar"})
        assert bad.is_error and "INVALID_ARGUMENT" in text(bad), text(bad)
        too_many = await client.call_tool("search_code", {"query": "x", "limit": 1000})
        assert too_many.is_error and "limit" in text(too_many)
        missing = await client.call_tool("read_file", {"path": "nowhere/at/all.py"})
        assert missing.is_error and "NOT_FOUND" in text(missing)
        unknown = await client.call_tool("sync_repository", {"repository": str(uuid.uuid4())})
        assert unknown.is_error and "NOT_FOUND" in text(unknown)
        # The server is still answering after the errors.
        assert not (await client.call_tool("index_status", {})).is_error


async def test_oversized_results_are_truncated_with_a_note(mcp_stack: McpStack, transport: str) -> None:
    token = f"bulk_{transport}_{secrets.token_hex(4)}"
    line = f"{token} " + "x" * 120
    files = [{"path": f"bulk/{i:03}.txt", "content": "\n".join([line] * 30)} for i in range(40)]
    async with connect(mcp_stack, transport, mcp_stack.alice) as client:
        pushed = await client.call_tool("push_files", {"files": files})
        assert not pushed.is_error, text(pushed)
        revision = revision_of(text(pushed))
        found = await client.call_tool(
            "search_code", {"query": token, "limit": 100, "min_revision": revision}
        )
        answer = text(found)
        assert not found.is_error
        assert len(answer) < 26_000
        assert "[truncated:" in answer and "narrow the query" in answer
        assert "1200 matching lines in 40 files" in answer
        whole = await client.call_tool("read_file", {"path": "bulk/000.txt"})
        assert not whole.is_error and len(text(whole)) < 26_000
        paged = await client.call_tool("search_code", {"query": token, "limit": 5, "min_revision": revision})
        token_line = re.search(r"page_token='([^']+)'", text(paged))
        assert token_line, text(paged)
        more = await client.call_tool(
            "search_code", {"query": token, "limit": 5, "page_token": token_line.group(1)}
        )
        assert not more.is_error and "bulk/" in text(more)
        first = set(re.findall(r"^# (bulk/\d+\.txt)", text(paged), re.M))
        second = set(re.findall(r"^# (bulk/\d+\.txt)", text(more), re.M))
        assert len(first) == len(second) == 5 and not first & second


async def test_sync_repository_then_search_sees_the_synced_files(mcp_stack: McpStack, transport: str) -> None:
    token = f"synced_{transport}_{secrets.token_hex(4)}"
    source = SourceRepo(mcp_stack.workdir / f"source-{token}")
    source.write("lib/synced.py", f"def {token}():\n    return 42\n")
    commit = source.commit("first")
    name = f"acme/{token}"
    channel = grpc.aio.insecure_channel(mcp_stack.envoy.target)
    try:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.CreateRepository(
            ingest_pb2.CreateRepositoryRequest(
                repository=repository_pb2.Repository(full_name=name, url=source.url, default_branch="main")
            ),
            metadata=(("authorization", f"Bearer {mcp_stack.alice}"),),
            timeout=60,
        )
    finally:
        await channel.close(None)
    async with connect(mcp_stack, transport, mcp_stack.alice) as client:
        synced = await client.call_tool("sync_repository", {"repository": name, "wait_seconds": 50})
        answer = text(synced)
        assert not synced.is_error, answer
        assert ": SUCCEEDED" in answer and f"commit: {commit}" in answer
        found = await client.call_tool("search_code", {"query": token, "min_revision": revision_of(answer)})
        assert f"lib/synced.py:1: def «{token}»():" in text(found), text(found)
        read = await client.call_tool("read_file", {"path": "lib/synced.py", "repository": name})
        assert not read.is_error and f"(repository {name})" in text(read), text(read)
        listed = await client.call_tool("list_repositories", {})
        assert name in text(listed) and "[READY]" in text(listed), text(listed)
