"""Job RPCs through the real gateway: REST sync, WatchJob as newline-delimited JSON, two tenants.

The three services run as `kotadb serve` processes (the ingest service with one job worker, in
polling mode: no listen URL) behind Envoy and auth's Check; each tenant has its own API key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.gatewayhttp import GatewayStack, http, two_tenants
from tests.ingest.jobhelpers import SECRET_KEYS, SourceRepo, make_repository

IDENTITY_KEY = "ingest-jobs-gateway-tests-identity-key-01234"


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    workdir = tmp_path_factory.mktemp("jobs-gateway")
    with two_tenants(
        database_url,
        workdir,
        IDENTITY_KEY,
        "jobs",
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        KOTADB_INGEST_WORKERS="1",
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_WORK_DIR=str(workdir / "checkouts"),
        KOTADB_INGEST_POLL_INTERVAL="0.1",
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
    ) as stack:
        yield stack


async def test_sync_and_watch_over_rest(stack: GatewayStack, pool: asyncpg.Pool, tmp_path: Path) -> None:
    user = await pool.fetchval("select user_id from public.api_keys where name = $1", stack.alice_name)
    repo = SourceRepo(tmp_path / "src")
    repo.write("main.py", "def main():\n    return 0\n")
    repo.write("notes.md", "# notes\n")
    repo.commit("first")
    repository_id = await make_repository(pool, user, repo.url)
    code, raw = http(
        "POST", f"{stack.envoy.url}/v1/repositories/{repository_id}:sync", stack.alice, {"full": True}
    )
    assert code == 200, raw
    job = json.loads(raw)
    assert job["kind"] == "FULL_SYNC" and job["repositoryId"] == str(repository_id)
    code, raw = http("GET", f"{stack.envoy.url}/v1/jobs/{job['id']}:watch", stack.alice)
    assert code == 200, raw
    lines = [line for line in raw.decode().split("\n") if line.strip()]
    events = [json.loads(line) for line in lines]
    assert len(events) >= 5, raw
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "queued" and events[-1]["kind"] == "finished"
    assert events[-1]["state"] == "SUCCEEDED"
    code, raw = http(
        "GET", f"{stack.envoy.url}/v1/jobs/{job['id']}:watch?afterSequence={len(events) - 1}", stack.alice
    )
    assert code == 200 and [
        json.loads(line)["kind"] for line in raw.decode().split("\n") if line.strip()
    ] == ["finished"]
    code, raw = http("GET", f"{stack.envoy.url}/v1/jobs/{job['id']}", stack.alice)
    assert code == 200 and json.loads(raw)["state"] == "SUCCEEDED"
    # Bob can neither read nor watch nor cancel nor sync Alice's.
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}:watch"),
        ("POST", f"/v1/jobs/{job['id']}:cancel"),
        ("POST", f"/v1/repositories/{repository_id}:sync"),
    ):
        code, raw = http(method, f"{stack.envoy.url}{path}", stack.bob, {} if method == "POST" else None)
        assert code == 404, (path, raw)
    code, raw = http("GET", f"{stack.envoy.url}/v1/jobs", stack.bob)
    assert code == 200 and json.loads(raw).get("jobs", []) == []
