"""SearchSettings: the search service's configuration, from `KOTADB_SEARCH_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class SearchSettings(ServiceSettings):
    """SearchSettings configures the search process: its index volume, the feed tailer and the limits."""

    env_prefix: ClassVar[str] = "KOTADB_SEARCH_"
    service_name: ClassVar[str] = "search"

    port: int = setting(50053, minimum=0, help="gRPC port of the search service; 0 picks a free one.")
    db_statement_timeout: float = setting(
        30.0,
        env="KOTADB_SEARCH_DB_STATEMENT_TIMEOUT",
        minimum=0.01,
        help="Seconds one search query may run (client command timeout and server `statement_timeout`);"
        " tenant rebuilds and feed batches need more than the 1.5 s that"
        " bounds auth's Check path. Past it the call fails UNAVAILABLE (DATABASE_UNAVAILABLE).",
    )
    metrics_port: int = setting(
        9463,
        minimum=0,
        help="Prometheus `GET /metrics` port of the search service; 0 picks a free one.",
    )
    # `setting` returns a dataclasses.Field, which ruff cannot see through for non-builtin types.
    data_dir: Path = setting(  # noqa: RUF009
        Path("data/search"),
        help="Directory of the index segments (a cache rebuilt from Postgres); `/data` in the container.",
    )
    listen_url: str = setting(
        "",
        help="Direct or session Postgres URL for LISTEN on the change feed; empty: poll only"
        " (as behind Supabase's port-6543 transaction pooler).",
    )
    poll_interval: float = setting(
        1.0, minimum=0.01, help="Seconds between change-feed polls when no notification arrives."
    )
    health_max_lag: float = setting(
        30.0,
        minimum=0.1,
        help="Seconds since the change feed was last read after which health reports the index as lagging"
        " (GetHealth's change_feed component, the gateway's /health answers 503); searches go on.",
    )
    feed_batch_rows: int = setting(
        1000, minimum=1, help="Change-feed rows applied per index commit for one tenant."
    )
    build_batch_rows: int = setting(
        200, minimum=1, help="Documents fetched per round trip while building a tenant's index."
    )
    max_open_tenants: int = setting(
        64, minimum=1, help="Tenant indexes kept open (file descriptors, caches); the least recent is closed."
    )
    disk_budget_bytes: int = setting(
        0,
        minimum=0,
        help="Bytes the index volume may hold; past it the least recently used closed tenants are"
        " deleted (rebuilt on next use). 0: no budget.",
    )
    search_threads: int = setting(
        2, minimum=1, help="Threads running searches off the event loop (verification releases the GIL)."
    )
    default_timeout: float = setting(
        10.0, minimum=0.01, help="Seconds a search may take when neither the request nor its deadline says."
    )
    max_timeout: float = setting(60.0, minimum=0.01, help="Upper bound on any one search's time, in seconds.")
    max_stream_files: int = setting(
        10000, minimum=1, help="Most files one StreamSearchCode call returns (limit_hit past it)."
    )
    page_snapshot_ttl: float = setting(
        300.0,
        minimum=0.01,
        help="Seconds the index snapshot of a page with a next page stays pinned after its last use, so"
        " its page token reads the same snapshot while the index changes; past it the token expires"
        " (PAGE_TOKEN_EXPIRED).",
    )
    page_snapshots_per_tenant: int = setting(
        8,
        minimum=1,
        help="Most pinned page snapshots per open tenant (files and mappings kept alive); the least"
        " recently used is released first.",
    )
    max_page_offset: int = setting(
        10000, minimum=1, help="Deepest symbol an offset page token of SearchSymbols may reach."
    )
    cursor_secret: str = setting(
        "",
        help="Secret keying page tokens (shared by every replica); empty: a random key kept in"
        " the data directory.",
    )
    replica: str = setting(
        "",
        help="This replica's name in IndexStatus.replica (several replicas share a host); empty: the"
        " host name.",
    )
    durable: bool = setting(
        True, help="fsync index files before publishing them (off only in tests: the index is a cache)."
    )
