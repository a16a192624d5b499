"""SearchCode, SearchSymbols and GetIndexStatus over gRPC on an in-process server, two tenants.

Documents go in through the ingest RPCs; every search carries the write's revision as
min_revision, so what it sees must include that write (read-your-writes).
"""

from __future__ import annotations

import pytest
from kotadb.v1 import search_pb2

from services.common import metrics
from tests.conftest import UserFactory
from tests.search.conftest import Services, caller, paths

# The phases of kotadb_search_phase_seconds (services/search/searches.py).
PHASES = ("ready", "queue", "engine", "render", "resume")

PY = (
    "class Parser:\n    def parse_tokens(self, text):\n        return text.split()\n\n\n"
    "def helper():\n    return Parser()\n"
)


async def test_search_sees_own_writes_and_nothing_of_other_tenants(
    services: Services, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    docs = {"src/parser.py": PY, "README.md": "parse_tokens is documented here\n"}
    written = await services.write(alice, docs)
    other = await services.write(bob, {"bob/parser.py": PY.replace("Parser", "BobParser")})
    found = await services.search(alice, "parse_tokens", min_revision=written.revision)
    assert sorted(paths(found)) == ["README.md", "src/parser.py"]
    assert found.total_file_count == 2 and not found.limit_hit
    assert found.index_revision >= written.revision
    line = next(f for f in found.file_matches if f.path == "src/parser.py").line_matches[0]
    assert line.line_number == 2
    assert line.line[line.ranges[0].start_byte : line.ranges[0].end_byte] == "parse_tokens"
    assert line.symbol.name == "parse_tokens" and line.is_definition

    theirs = await services.search(bob, "parse_tokens", min_revision=other.revision)
    assert paths(theirs) == ["bob/parser.py"]
    assert (await services.search(bob, "README")).total_file_count == 0


async def test_symbol_search_is_per_tenant_and_ranked(services: Services, user_factory: UserFactory) -> None:
    alice, bob = await user_factory(), await user_factory()
    written = await services.write(alice, {"a.py": PY})
    other = await services.write(bob, {"b.py": "def parse_tokens_bob():\n    pass\n"})
    stub = services.search_stub()
    found = await stub.SearchSymbols(
        search_pb2.SearchSymbolsRequest(query="parse_tok", min_revision=written.revision),
        metadata=caller(alice),
    )
    got = [(s.name, s.kind, s.path, s.start_line) for s in found.symbols]
    assert got == [("parse_tokens", "method", "a.py", 2)]
    assert found.total_count == 1
    assert found.symbols[0].line == "    def parse_tokens(self, text):"
    assert found.symbols[0].qualified_name == "Parser.parse_tokens"
    compat = await stub.SearchSymbols(
        search_pb2.SearchSymbolsRequest(pattern="parse_tok", limit=5, min_revision=other.revision),
        metadata=caller(bob),
    )
    assert [s.name for s in compat.symbols] == ["parse_tokens_bob"]


async def test_pages_cover_everything_once_and_tokens_stay_with_their_tenant(
    services: Services, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    files = {f"f{i:02d}.txt": f"needle {i}\n" for i in range(7)}
    written = await services.write(alice, files)
    await services.write(bob, files)
    first = await services.search(alice, "needle", page_size=3, mode=2, min_revision=written.revision)
    seen = paths(first)
    token = first.next_page_token
    assert token and len(seen) == 3
    with pytest.raises(Exception) as refused:
        await services.search(bob, "needle", page_size=3, page_token=token)
    assert refused.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    with pytest.raises(Exception) as other_query:
        await services.search(alice, "needle 1", page_size=3, page_token=token)
    assert other_query.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    while token:
        page = await services.search(alice, "needle", page_size=3, mode=2, page_token=token)
        seen += paths(page)
        token = page.next_page_token
    assert sorted(seen) == sorted(files)


async def test_index_status_counts_only_the_callers_documents(
    services: Services, user_factory: UserFactory
) -> None:
    alice, bob = await user_factory(), await user_factory()
    written = await services.write(alice, {"one.py": PY, "two.py": "x = 1\n", "empty.txt": ""})
    await services.write(bob, {"bob.py": PY})
    await services.search(alice, "x", min_revision=written.revision)
    stub = services.search_stub()
    status = await stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(), metadata=caller(alice))
    assert status.document_count == 2
    assert status.revision >= written.revision and status.latest_revision == written.revision
    assert status.skipped_document_count == 1
    assert [(s.reason, s.count) for s in status.skipped] == [(6, 1)]  # EMPTY
    assert status.segment_count >= 1 and status.index_bytes > 0 and status.content_bytes > 0
    assert status.state == search_pb2.IndexStatus.READY


def _phase_counts() -> dict[str, float]:
    return {
        phase: metrics.REGISTRY.get_sample_value("kotadb_search_phase_seconds_count", {"phase": phase}) or 0.0
        for phase in PHASES
    }


async def test_a_search_is_timed_in_every_phase(services: Services, user_factory: UserFactory) -> None:
    alice = await user_factory()
    written = await services.write(alice, {"a.py": PY})
    before = _phase_counts()
    found = await services.search(alice, "parse_tokens", min_revision=written.revision)
    assert paths(found) == ["a.py"]
    assert _phase_counts() == {phase: count + 1 for phase, count in before.items()}
