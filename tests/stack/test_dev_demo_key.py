"""`kotadb dev`'s demo API key: in stack.json (0600), works through the gateway as printed, metered.

The stack runs as the user runs it (a `kotadb dev` subprocess on free ports, its own embedded
Postgres). The printed curl command is run as printed; then the stack is restarted on the same
data dir, which must issue a fresh key and revoke the previous one.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg

from services.auth.keys import hash_key, parse_key
from services.cli.dev import DEMO_PATH, demo_curl
from services.cli.keys import DEMO_USER_ID
from tests.harness import DevStack
from tests.stack.test_dev_stack import data_dir  # noqa: F401  (data_dir is a fixture)

SETTLE_LIMIT = 30.0


def _curl(command: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """_curl runs a curl command line and returns the HTTP status and the JSON body."""
    argv = [*shlex.split(command), "--silent", "--show-error", "--write-out", "\n%{http_code}", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def _printed(stack: DevStack, text: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if text in stack.output:
            return True
        time.sleep(0.1)
    return False


async def _key_rows(database_url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(
            "select k.id, k.name, k.key_hash, k.key_prefix, k.permissions, k.revoked_at,"
            " row_to_json(k)::text as everything"
            " from public.api_keys k where k.user_id = $1 order by k.created_at",
            DEMO_USER_ID,
        )
    finally:
        await connection.close()
    return rows


GET_USAGE = "/kotadb.v1.AuthService/GetUsage"


async def _usage_rows(database_url: str, key_id: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + SETTLE_LIMIT
        while True:
            rows: list[asyncpg.Record] = await connection.fetch(
                "select endpoint, method, status_code from public.usage_metrics where key_id = $1", key_id
            )
            if any(row["endpoint"] == GET_USAGE for row in rows) or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


def test_the_demo_key_works_as_printed_and_a_restart_replaces_it(data_dir: Path) -> None:  # noqa: F811
    first = DevStack(data_dir, "--gateway-port", "0")
    try:
        stack = first.wait_for_stack()
        assert stat.S_IMODE((data_dir / "stack.json").stat().st_mode) == 0o600
        key = stack["demo_api_key"]
        parse_key(key)  # well formed, checksum included
        assert key.startswith("kdb_live_")
        command = demo_curl(stack)
        assert command.endswith(DEMO_PATH)
        assert _printed(first, command), first.output

        code, body = _curl(command)
        assert code == 200, body
        assert body["apiKeyId"] == stack["demo_api_key_id"]
        unauthenticated, _ = _curl(f"curl {stack['gateway']}{DEMO_PATH}")
        assert unauthenticated == 401

        rows = asyncio.run(_key_rows(stack["database_url"]))
        (demo,) = [row for row in rows if str(row["id"]) == stack["demo_api_key_id"]]
        assert demo["key_hash"] == hash_key(key)
        assert sorted(demo["permissions"]) == ["read", "write"]
        assert all(key not in row["everything"] for row in rows), "the secret is stored in plain text"
        usage = asyncio.run(_usage_rows(stack["database_url"], stack["demo_api_key_id"]))
        # The curl above, and `kotadb dev` registering its demo repository with the same key.
        assert sorted((r["endpoint"], r["status_code"]) for r in usage) == [
            (GET_USAGE, 200),
            ("/kotadb.v1.IngestService/CreateRepository", 200),
            ("/kotadb.v1.IngestService/ListRepositories", 200),
        ]
    finally:
        first.kill_if_running()

    second = DevStack(data_dir, "--gateway-port", "0")
    try:
        again = second.wait_for_stack()
        assert again["demo_api_key"] != key
        code, _ = _curl(demo_curl(again))
        assert code == 200
        old_code, _ = _curl(demo_curl({**again, "demo_api_key": key}))
        assert old_code == 401, "the previous run's demo key still works"
        rows = asyncio.run(_key_rows(again["database_url"]))
        active = [str(row["id"]) for row in rows if row["revoked_at"] is None]
        assert active == [again["demo_api_key_id"]]
    finally:
        second.kill_if_running()
