"""SearchSettings: the search service's configuration, from `KOTADB_SEARCH_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class SearchSettings(ServiceSettings):
    """SearchSettings configures the search process, including where its index segments live."""

    env_prefix: ClassVar[str] = "KOTADB_SEARCH_"
    service_name: ClassVar[str] = "search"

    port: int = setting(50053, minimum=0, help="gRPC port of the search service; 0 picks a free one.")
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
