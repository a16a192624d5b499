"""/health through the real gateway: each service's GetHealth in the body, and search's lag threshold.

Two stacks of real processes against the session database, each with Envoy in front:

* `fresh`: the search service tails the change feed every 0.2 s; /health is 200 and its body
  carries every service's own answer: Postgres as each sees it, ingest's queue depth and search's
  change-feed lag.
* `lagging`: the search service polls the feed only every 120 s and calls more than 1 s of lag
  unhealthy (KOTADB_SEARCH_HEALTH_MAX_LAG), so its change_feed component is NOT_SERVING and
  /health answers 503 with the reason, while search itself stays SERVING and answers searches.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from services.common.supervisor import Supervisor
from tests.gatewayhttp import http_json
from tests.harness import Envoy, seed_key, service_env, spawn_service, start_envoy, wait_healthy, wait_until

IDENTITY_KEY = "search-health-tests-identity-key-0123456789"


def _stack(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, name: str, **search_env: str
) -> Iterator[tuple[Envoy, str]]:
    workdir = tmp_path_factory.mktemp(name)
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_INGEST_SYMBOL_WORKERS="1")
    with Supervisor(grace=20) as supervisor:
        addresses = {
            service: spawn_service(supervisor, workdir, service, service, dict(env, **search_env))[0]
            for service in ("auth", "ingest", "search")
        }
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
        key = seed_key(database_url, email_prefix=name, permissions=("read", "write"), rate_limit=6000)

        def answered() -> tuple[bool, str]:
            code, body = http_json("GET", f"{envoy.url}/health", None)
            # Envoy's first active health checks, then the services' first readiness rounds.
            ready = "services" in body and all(s in body["services"] for s in ("auth", "ingest", "search"))
            return ready and code in (200, 503), f"{code} {body}"

        wait_until(f"{name} /health", answered, supervisor)
        yield envoy, key


@pytest.fixture(scope="module")
def fresh(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Envoy, str]]:
    yield from _stack(database_url, tmp_path_factory, "health-fresh", KOTADB_SEARCH_POLL_INTERVAL="0.2")


@pytest.fixture(scope="module")
def lagging(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Envoy, str]]:
    yield from _stack(
        database_url,
        tmp_path_factory,
        "health-lagging",
        KOTADB_SEARCH_POLL_INTERVAL="120",
        KOTADB_SEARCH_HEALTH_MAX_LAG="1",
    )


def _components(body: dict[str, Any], service: str) -> dict[str, dict[str, Any]]:
    return {part["name"]: part for part in body["services"][service]["components"]}


def test_health_carries_every_service_s_own_answer(fresh: tuple[Envoy, str]) -> None:
    envoy, _ = fresh

    def healthy() -> tuple[bool, str]:
        code, body = http_json("GET", f"{envoy.url}/health", None)
        return code == 200, f"{code} {body}"

    wait_until("fresh /health 200", healthy, Supervisor())
    code, body = http_json("GET", f"{envoy.url}/health", None)
    assert code == 200 and body["status"] == "SERVING"
    assert {name: answer["service"] for name, answer in body["services"].items()} == {
        "auth": "auth",
        "ingest": "ingest",
        "search": "search",
    }
    for service in ("auth", "ingest", "search"):
        assert _components(body, service)["database"]["status"] == "SERVING"
    assert _components(body, "ingest")["queue"]["message"].startswith("queued=")
    feed = _components(body, "search")["change_feed"]
    assert feed["status"] == "SERVING" and feed["message"].startswith("lag ")


def test_lag_past_the_threshold_turns_health_unhealthy_while_search_goes_on(
    lagging: tuple[Envoy, str],
) -> None:
    envoy, key = lagging
    code, body = http_json("GET", f"{envoy.url}/health", None)
    assert code == 503
    assert body["status"] == "NOT_SERVING" and body["reason"] == "BACKENDS_NOT_SERVING"
    feed = _components(body, "search")["change_feed"]
    assert feed["status"] == "NOT_SERVING"
    assert "change feed" in feed["message"], feed
    assert body["services"]["search"]["status"] == "SERVING"  # the replica itself still serves
    assert _components(body, "ingest")["database"]["status"] == "SERVING"

    request = urllib.request.Request(
        f"{envoy.url}/v1/code:search",
        data=json.dumps({"query": "anything"}).encode(),
        method="POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
