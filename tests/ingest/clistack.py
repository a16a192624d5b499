"""A stack for the client-command tests: the services and Envoy, and `kotadb` run as a user runs it.

`start_cli_stack` runs auth, ingest (one job worker, local URLs allowed, a secret key) and search as
`kotadb serve` processes on the session database, Envoy in front; `CliStack.run` runs one `kotadb`
command in a fresh interpreter with `KOTADB_URL`/`KOTADB_API_KEY` pointing at that gateway, and
with a dev data dir that does not exist, so a developer's running `kotadb dev` is never used.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from services.auth import keys
from services.cli import status
from services.common.supervisor import Supervisor
from services.ingest.secretbox import generate_key_spec
from tests.harness import (
    Envoy,
    kotadb,
    seed_key,
    service_env,
    spawn_service,
    start_envoy,
    wait_gateway_healthy,
    wait_healthy,
)

IDENTITY_KEY = "ingest-cli-tests-identity-key-0123456789abcd"
# Seconds one CLI command may take: a push streams through Envoy on a shared, busy machine.
COMMAND_TIMEOUT = 300.0


@dataclass(frozen=True)
class CliStack:
    """CliStack is the gateway, the work directory and the API keys of the tests' users."""

    envoy: Envoy
    workdir: Path
    writer: str
    reader: str

    def run(self, *args: str, key: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        """run runs `kotadb ARGS` against this gateway with `key` (default: the writer's)."""
        environment = dict(os.environ)
        environment.pop("KOTADB_DATABASE_URL", None)
        environment.update(
            KOTADB_URL=self.envoy.url,
            KOTADB_API_KEY=key if key is not None else self.writer,
            KOTADB_DEV_DATA_DIR=str(self.workdir / "no-dev-stack"),
            **env,
        )
        return kotadb(*args, env=environment, timeout=COMMAND_TIMEOUT)


def query(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """query runs one statement as the database owner (outside RLS) and returns its rows."""

    async def fetch() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(database_url)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
            return rows
        finally:
            await connection.close()

    return asyncio.run(fetch())


def user_of_key(database_url: str, key: str) -> uuid.UUID:
    """user_of_key is the user a seeded API key belongs to."""
    rows = query(database_url, "select user_id from public.api_keys where key_hash = $1", keys.hash_key(key))
    user_id: uuid.UUID = rows[0]["user_id"]
    return user_id


@contextmanager
def start_cli_stack(database_url: str, workdir: Path, name: str) -> Iterator[CliStack]:
    """start_cli_stack runs the services and Envoy until the block ends; keys are new users'."""
    env = service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        KOTADB_INGEST_WORKERS="1",
        KOTADB_INGEST_POLL_INTERVAL="0.2",
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_SECRET_KEYS=generate_key_spec("cli1"),
        KOTADB_INGEST_WORK_DIR=str(workdir / "checkouts"),
    )
    with Supervisor(grace=20) as supervisor:
        addresses = {svc: spawn_service(supervisor, workdir, svc, svc, env)[0] for svc in status.SERVICES}
        for address in addresses.values():
            wait_healthy(address, supervisor)
        envoy = start_envoy(
            supervisor,
            workdir,
            "envoy",
            auth=addresses["auth"],
            ingest=addresses["ingest"],
            search=addresses["search"],
            identity_key=IDENTITY_KEY,
        )
        wait_gateway_healthy(envoy, supervisor)
        writer = seed_key(
            database_url, email_prefix=f"{name}-w", permissions=("read", "write"), rate_limit=6000
        )
        reader = seed_key(database_url, email_prefix=f"{name}-r", permissions=("read",), rate_limit=6000)
        yield CliStack(envoy, workdir, writer, reader)
