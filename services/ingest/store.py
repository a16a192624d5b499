"""IngestStore: the ingest service's database access (asyncpg, this service's tables only).

Only the readiness query exists so far; document, repository and job queries arrive with the
ingest service issue. Database errors are translated into services.common.errors here, never in
the servicer.
"""

from __future__ import annotations

from services.common.server import LazyPool, require_tables

# The tables the ingest service reads and writes; readiness fails until migrations created them.
TABLES: tuple[str, ...] = (
    "public.documents",
    "public.repositories",
    "public.indexing_jobs",
    "public.indexing_job_events",
    "public.webhook_deliveries",
)


class IngestStore:
    """IngestStore runs the ingest service's queries on the shared pool."""

    def __init__(self, pool: LazyPool) -> None:
        self._pool = pool

    async def check_ready(self) -> None:
        """check_ready raises unless every ingest table exists."""
        await require_tables(self._pool, TABLES)
