"""Job RPCs through the real gateway: REST sync, WatchJob as newline-delimited JSON, two tenants.

The three services run as `kotadb serve` processes (the ingest service with one job worker, in
polling mode: no listen URL) behind Envoy and auth's Check; each tenant has its own API key.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.common.supervisor import Supervisor
from tests.harness import (
    Envoy,
    seed_key,
    service_env,
    spawn_services,
    start_gateway,
)
from tests.ingest.jobhelpers import SECRET_KEYS, SourceRepo, make_repository

IDENTITY_KEY = "ingest-jobs-gateway-tests-identity-key-01234"


@dataclass(frozen=True)
class Stack:
    """Stack is the gateway and one API key (with its user's email prefix) for each of two tenants."""

    envoy: Envoy
    alice: str
    alice_prefix: str
    bob: str


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("jobs-gateway")
    env = service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_INGEST_SYMBOL_WORKERS="1",
        KOTADB_INGEST_WORKERS="1",
        KOTADB_INGEST_ALLOW_LOCAL_URLS="true",
        KOTADB_INGEST_WORK_DIR=str(workdir / "checkouts"),
        KOTADB_INGEST_POLL_INTERVAL="0.1",
        KOTADB_INGEST_SECRET_KEYS=SECRET_KEYS,
    )
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        envoy = start_gateway(supervisor, workdir, addresses, IDENTITY_KEY)
        prefix = f"jobs-alice-{secrets.token_hex(4)}"
        alice = seed_key(database_url, email_prefix=prefix, permissions=("read", "write"), rate_limit=6000)
        bob = seed_key(database_url, email_prefix="jobs-bob", permissions=("read", "write"), rate_limit=6000)
        yield Stack(envoy, alice, prefix, bob)


def _http(method: str, url: str, key: str, body: Any = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {key}"}
    if data is not None:
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_sync_and_watch_over_rest(stack: Stack, pool: asyncpg.Pool, tmp_path: Path) -> None:
    user = await pool.fetchval("select user_id from public.api_keys where name = $1", stack.alice_prefix)
    repo = SourceRepo(tmp_path / "src")
    repo.write("main.py", "def main():\n    return 0\n")
    repo.write("notes.md", "# notes\n")
    repo.commit("first")
    repository_id = await make_repository(pool, user, repo.url)
    code, raw = _http(
        "POST", f"{stack.envoy.url}/v1/repositories/{repository_id}:sync", stack.alice, {"full": True}
    )
    assert code == 200, raw
    job = json.loads(raw)
    assert job["kind"] == "FULL_SYNC" and job["repositoryId"] == str(repository_id)
    code, raw = _http("GET", f"{stack.envoy.url}/v1/jobs/{job['id']}:watch", stack.alice)
    assert code == 200, raw
    lines = [line for line in raw.decode().split("\n") if line.strip()]
    events = [json.loads(line) for line in lines]
    assert len(events) >= 5, raw
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "queued" and events[-1]["kind"] == "finished"
    assert events[-1]["state"] == "SUCCEEDED"
    code, raw = _http(
        "GET", f"{stack.envoy.url}/v1/jobs/{job['id']}:watch?afterSequence={len(events) - 1}", stack.alice
    )
    assert code == 200 and [
        json.loads(line)["kind"] for line in raw.decode().split("\n") if line.strip()
    ] == ["finished"]
    code, raw = _http("GET", f"{stack.envoy.url}/v1/jobs/{job['id']}", stack.alice)
    assert code == 200 and json.loads(raw)["state"] == "SUCCEEDED"
    # Bob can neither read nor watch nor cancel nor sync Alice's.
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}:watch"),
        ("POST", f"/v1/jobs/{job['id']}:cancel"),
        ("POST", f"/v1/repositories/{repository_id}:sync"),
    ):
        code, raw = _http(method, f"{stack.envoy.url}{path}", stack.bob, {} if method == "POST" else None)
        assert code == 404, (path, raw)
    code, raw = _http("GET", f"{stack.envoy.url}/v1/jobs", stack.bob)
    assert code == 200 and json.loads(raw).get("jobs", []) == []
