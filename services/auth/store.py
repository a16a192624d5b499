"""AuthStore: the auth service's database access (asyncpg, this service's tables only).

Only the readiness query exists so far; API-key and quota queries arrive with the auth and
quota service issue. Database errors are translated into services.common.errors here, never
in the servicer.
"""

from __future__ import annotations

from services.common.server import LazyPool, require_tables

# The tables the auth service reads and writes; readiness fails until migrations created them.
TABLES: tuple[str, ...] = ("public.api_keys", "public.usage_metrics", "public.rate_limit_windows")


class AuthStore:
    """AuthStore runs the auth service's queries on the shared pool."""

    def __init__(self, pool: LazyPool) -> None:
        self._pool = pool

    async def check_ready(self) -> None:
        """check_ready raises unless every auth table exists."""
        await require_tables(self._pool, TABLES)
