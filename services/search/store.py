"""SearchStore: the search service's database access (asyncpg, reads of the change feed).

Only the readiness query exists so far; tailing the document change feed arrives with the
search service issue.
"""

from __future__ import annotations

from services.common.server import LazyPool, require_tables

# The tables the search service reads; readiness fails until migrations created them.
TABLES: tuple[str, ...] = ("public.documents",)


class SearchStore:
    """SearchStore runs the search service's queries on the shared pool."""

    def __init__(self, pool: LazyPool) -> None:
        self._pool = pool

    async def check_ready(self) -> None:
        """check_ready raises unless the tables the search service reads exist."""
        await require_tables(self._pool, TABLES)
