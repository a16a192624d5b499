"""`kotadb keys` as a subprocess against the session's migrated database."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import asyncpg

from services.cli.keys import DEMO_USER_ID, parse_time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def kotadb(*args: str, database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KOTADB_")}
    if database_url is not None:
        env["KOTADB_DATABASE_URL"] = database_url
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "keys", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_create_list_rotate_revoke(database_url: str, pool: asyncpg.Pool) -> None:
    user = uuid.uuid4()
    assert await pool.fetchval("select count(*) from auth.users where id = $1", user) == 0
    created = as_json(
        await kotadb(
            "create",
            "--name",
            "ci runner",
            "--permissions",
            "read,write",
            "--rate-limit",
            "120",
            "--monthly-quota",
            "5000",
            "--expires-at",
            "+30d",
            "--user",
            str(user),
            "--json",
            database_url=database_url,
        )
    )
    secret = created["secret"]
    assert secret.startswith("kdb_live_") and len(secret) == 47
    assert created["user_id"] == str(user) and created["permissions"] == ["read", "write"]
    assert (created["rate_limit"], created["monthly_quota"], created["state"]) == (120, 5000, "ACTIVE")
    assert created["expires_at"] is not None
    assert await pool.fetchval("select count(*) from auth.users where id = $1", user) == 1
    row = await pool.fetchrow(
        "select key_hash, row_to_json(k)::text as text from public.api_keys k where id = $1",
        uuid.UUID(created["id"]),
    )
    assert row is not None and row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in row["text"]

    listed = await kotadb("list", "--user", str(user), database_url=database_url)
    assert listed.returncode == 0, listed.stderr
    assert created["id"] in listed.stdout and secret[15:] not in listed.stdout
    listed_json = as_json(await kotadb("list", "--user", str(user), "--json", database_url=database_url))
    assert [key["id"] for key in listed_json] == [created["id"]]
    assert all("secret" not in key and "key_hash" not in key for key in listed_json)

    rotated = as_json(
        await kotadb("rotate", created["id"], "--grace", "60", "--json", database_url=database_url)
    )
    assert rotated["secret"] and rotated["secret"] != secret
    assert rotated["rotated_from"] == created["id"]
    assert rotated["previous"]["state"] == "ROTATING" and rotated["previous"]["grace_until"]

    revoked = as_json(await kotadb("revoke", rotated["id"], "--json", database_url=database_url))
    assert revoked["state"] == "REVOKED"
    assert await pool.fetchval(
        "select revoked_at is not null from public.api_keys where id = $1", uuid.UUID(rotated["id"])
    )
    remaining = as_json(await kotadb("list", "--user", str(user), "--json", database_url=database_url))
    assert [key["id"] for key in remaining] == [created["id"]], "only the rotating key is still active"
    everything = as_json(
        await kotadb("list", "--user", str(user), "--all", "--json", database_url=database_url)
    )
    assert {key["id"] for key in everything} == {created["id"], rotated["id"]}


async def test_create_defaults_to_the_demo_user_and_prints_the_secret_once(database_url: str) -> None:
    result = await kotadb("create", "--name", "demo", "--request-id", "cli-demo-1", database_url=database_url)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    secret, key_id = lines["secret"].strip(), lines["id"].strip()
    assert secret.startswith("kdb_live_")
    again = await kotadb(
        "create", "--name", "demo", "--request-id", "cli-demo-1", "--json", database_url=database_url
    )
    body = as_json(again)
    assert body["id"] == key_id and body["secret"] == "" and body["user_id"] == str(DEMO_USER_ID)


async def test_invalid_requests_fail_and_write_nothing(database_url: str, pool: asyncpg.Pool) -> None:
    user = uuid.uuid4()
    bad = await kotadb(
        "create",
        "--name",
        "x",
        "--permissions",
        "read,delete",
        "--user",
        str(user),
        database_url=database_url,
    )
    assert bad.returncode == 1
    assert "api_key.permissions" in bad.stderr and "INVALID_ARGUMENT" in bad.stderr
    over = await kotadb(
        "create",
        "--name",
        "x",
        "--rate-limit",
        "-3",
        "--user",
        str(user),
        "--json",
        database_url=database_url,
    )
    assert over.returncode == 1
    assert json.loads(over.stdout)["field_violations"][0]["field"] == "api_key.rate_limit"
    past = await kotadb(
        "create",
        "--name",
        "x",
        "--expires-at",
        "2001-01-01T00:00:00Z",
        "--user",
        str(user),
        database_url=database_url,
    )
    assert past.returncode == 1 and "api_key.expire_time" in past.stderr
    assert await pool.fetchval("select count(*) from public.api_keys where user_id = $1", user) == 0
    missing = await kotadb("revoke", str(uuid.uuid4()), database_url=database_url)
    assert missing.returncode == 1 and "API_KEY_NOT_FOUND" in missing.stderr
    no_database = await kotadb("list", database_url=None)
    assert no_database.returncode == 1 and "KOTADB_DATABASE_URL" in no_database.stderr


def test_parse_time() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_time("+30d", now) == now + dt.timedelta(days=30)
    assert parse_time("90m", now) == now + dt.timedelta(minutes=90)
    assert parse_time("2026-02-01T00:00:00") == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    assert parse_time("2026-02-01T01:00:00+01:00") == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
