"""AuthSettings: the auth service's configuration, read from `KOTADB_AUTH_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class AuthSettings(ServiceSettings):
    """AuthSettings configures the auth process; later auth work adds its key and quota settings here."""

    env_prefix: ClassVar[str] = "KOTADB_AUTH_"
    service_name: ClassVar[str] = "auth"

    port: int = setting(50051, minimum=0, help="gRPC port of the auth service; 0 picks a free one.")
