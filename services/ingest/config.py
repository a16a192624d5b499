"""IngestSettings: the ingest service's configuration, from `KOTADB_INGEST_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class IngestSettings(ServiceSettings):
    """IngestSettings configures the ingest process; later ingest work adds worker settings here."""

    env_prefix: ClassVar[str] = "KOTADB_INGEST_"
    service_name: ClassVar[str] = "ingest"

    port: int = setting(50052, minimum=0, help="gRPC port of the ingest service; 0 picks a free one.")
    metrics_port: int = setting(
        9462,
        minimum=0,
        help="Prometheus `GET /metrics` port of the ingest service; 0 picks a free one.",
    )
