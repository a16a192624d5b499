"""Read-your-writes and a differential check of every search result against Postgres.

Two tenants, two concurrent writers each (on disjoint paths), random upserts, updates,
renames and deletes through the ingest RPCs. Every write is followed at once by a search that
carries its revision as `min_revision` and must see it: the new content found, the old content
gone (zero stale results). Between rounds, and at the end, every query of a fixed set runs as
an exhaustive RE2 search and must equal a brute-force RE2 scan of the tenant's current rows in
Postgres: the same files and, per file, the same matching line numbers.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field

import asyncpg
import re2

from tests.conftest import UserFactory
from tests.search.conftest import Services, paths

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "Alpha", "lambda_x")
QUERIES = (
    r"alpha",
    r"beta\s+gamma",
    r"^delta",
    r"omega$",
    r"k[a-z]+a \d+",
    r"(alpha|kappa) beta",
    r"(?i)ALPHA omega",
    r"lambda_x \d{2}",
)


@dataclass
class Writer:
    """Writer owns a disjoint set of paths of one tenant and remembers their document ids."""

    user: uuid.UUID
    prefix: str
    rng: random.Random
    ids: dict[str, str] = field(default_factory=dict)
    counter: int = 0

    def content(self, marker: str) -> str:
        lines = [
            " ".join(
                self.rng.choice(WORDS) + (f" {self.rng.randint(0, 99)}" if self.rng.random() < 0.3 else "")
                for _ in range(3)
            )
            for _ in range(self.rng.randint(1, 6))
        ]
        lines.insert(self.rng.randint(0, len(lines)), marker)
        return "\n".join(lines) + ("\n" if self.rng.random() < 0.7 else "")


async def _step(services: Services, writer: Writer) -> None:
    """_step makes one random change and checks that a search carrying its revision sees it."""
    writer.counter += 1
    marker = f"mark{writer.prefix}x{writer.counter}"
    choice = writer.rng.random()
    if not writer.ids or choice < 0.4:
        path = f"{writer.prefix}/file{writer.counter}.txt"
    else:
        path = writer.rng.choice(sorted(writer.ids))
    if writer.ids and choice > 0.85:
        # Delete: its marker must vanish.
        gone = writer.rng.choice(sorted(writer.ids))
        revision = await services.delete(writer.user, writer.ids.pop(gone))
        found = await services.search(
            writer.user, f"/{re2.escape(writer.prefix)}/", min_revision=revision, mode=2, page_size=1000
        )
        assert gone not in paths(found), (gone, revision)
        return
    if writer.ids and choice > 0.7:
        # Rename: delete the old path, write its content under a new one.
        old = writer.rng.choice(sorted(writer.ids))
        await services.delete(writer.user, writer.ids.pop(old))
        path = f"{writer.prefix}/renamed{writer.counter}.txt"
    written = await services.write(writer.user, {path: writer.content(marker)})
    writer.ids[path] = written.results[0].id
    found = await services.search(writer.user, marker, min_revision=written.revision)
    assert paths(found) == [path], (marker, written.revision, paths(found))


async def _rows(pool: asyncpg.Pool, user: uuid.UUID) -> dict[str, str]:
    rows = await pool.fetch(
        "select path, content from public.documents where user_id = $1 and deleted_at is null"
        " and index_skip is null",
        user,
    )
    return {r["path"]: r["content"] for r in rows}


async def _differential(services: Services, pool: asyncpg.Pool, user: uuid.UUID, revision: int) -> None:
    rows = await _rows(pool, user)
    for pattern in QUERIES:
        compiled = re2.compile(pattern)
        expected: dict[str, list[int]] = {}
        for path, content in rows.items():
            lines = content.split("\n")
            if content.endswith("\n"):
                lines.pop()
            hits = [i + 1 for i, line in enumerate(lines) if compiled.search(line)]
            if hits:
                expected[path] = hits
        found = await services.search(
            user,
            pattern,
            regex=True,
            mode=2,
            page_size=1000,
            max_matches_per_file=1000,
            min_revision=revision,
        )
        assert not found.limit_hit
        got = {f.path: [m.line_number for m in f.line_matches] for f in found.file_matches}
        assert got == expected, pattern
        assert found.total_file_count == len(expected)
        assert found.total_match_count == sum(len(v) for v in expected.values())


async def test_concurrent_writers_read_their_writes_and_searches_equal_postgres(
    services: Services, user_factory: UserFactory, pool: asyncpg.Pool
) -> None:
    rng = random.Random(20261207)
    tenants = [await user_factory(), await user_factory()]
    writers = [
        Writer(user, f"w{t}{w}", random.Random(rng.random()))
        for t, user in enumerate(tenants)
        for w in range(2)
    ]
    for round_ in range(3):

        async def run(writer: Writer) -> None:
            for _ in range(6):
                await _step(services, writer)

        await asyncio.gather(*(run(w) for w in writers))
        head = int(await pool.fetchval("select coalesce(max(revision), 0) from public.document_changes"))
        for user in tenants:
            await _differential(services, pool, user, head)
        del round_
