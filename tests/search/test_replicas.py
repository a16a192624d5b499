"""Two search replicas behind the real gateway: a ring hash on the tenant, and one replica restarting.

Auth, ingest and two `kotadb serve search` processes (each its own data directory, named by
KOTADB_SEARCH_REPLICA) run against the session database with Envoy in front, rendered with
`search=a,b`. Tenants are added until both replicas own some. Every tenant then:

* gets exactly its own files, the same answer on every call, from the same replica each time
  (GetIndexStatus names the replica that answered);
* keeps getting that answer, from the other replica, while its own replica is killed (-9),
  including a write made during the outage (searched with its revision);
* is answered by its own replica again once that replica is back, with the outage's write;
* sees nothing of a tenant on the other replica: streaming search, symbol search, and a page
  token taken from the other tenant (refused).

The `kotadb search`, `kotadb symbols` and `kotadb index status` commands run against the same
gateway with each tenant's API key.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.common import stack as stacklib
from services.common.supervisor import ChildProcess, Supervisor
from tests.gatewayhttp import http_json, messages
from tests.harness import (
    Envoy,
    kotadb,
    port_file_probe,
    seed_key,
    service_env,
    spawn_service,
    start_envoy,
    wait_gateway_healthy,
    wait_healthy,
    wait_until,
)

IDENTITY_KEY = "search-replica-tests-identity-key-0123456789"
REPLICAS = ("replica-a", "replica-b")
MAX_TENANTS = 12
# How long a tenant may wait for an answer while its replica is going away or coming back.
SETTLE_LIMIT = 120.0


@dataclass
class Tenant:
    """Tenant is one API key, its unique word, its revision and the paths it wrote."""

    key: str
    word: str
    revision: int = 0
    paths: set[str] = field(default_factory=set)
    replica: str = ""


@dataclass
class Replicas:
    """Replicas is the gateway, the two search processes and the tenants spread over them."""

    envoy: Envoy
    search: dict[str, stacklib.ServiceProcess]
    tenants: list[Tenant]
    supervisor: Supervisor


def _write(envoy: Envoy, tenant: Tenant, files: dict[str, str]) -> None:
    body = {"documents": [{"path": p, "text": t} for p, t in files.items()]}
    code, answer = http_json("POST", f"{envoy.url}/v1/documents:batchUpsert", tenant.key, body)
    assert code == 200, answer
    tenant.revision = int(answer["revision"])
    tenant.paths |= set(files)


def _answer(envoy: Envoy, tenant: Tenant) -> tuple[int, Any]:
    """_answer searches the tenant's word at its revision: (HTTP status, sorted paths or the error)."""
    body = {"query": tenant.word, "pageSize": 100, "minRevision": str(tenant.revision)}
    code, answer = http_json("POST", f"{envoy.url}/v1/code:search", tenant.key, body)
    if code != 200:
        return code, answer
    return code, sorted(f["path"] for f in answer.get("fileMatches", []))


def _replica(envoy: Envoy, tenant: Tenant) -> str:
    code, answer = http_json("GET", f"{envoy.url}/v1/index", tenant.key)
    assert code == 200, answer
    return str(answer["replica"])


def _settled(
    envoy: Envoy, tenant: Tenant, watch: Supervisor | list[ChildProcess], replica: str | None = None
) -> None:
    """_settled waits until the tenant gets its own files (from `replica`, when given).

    `watch` is the supervisor, or while a replica is down on purpose the children that must live.
    """

    def probe() -> tuple[bool, str]:
        code, answer = _answer(envoy, tenant)
        if code != 200 or answer != sorted(tenant.paths):
            return False, f"{code} {answer}"
        if replica is not None:
            found = _replica(envoy, tenant)
            return found == replica, f"answered by {found}"
        return True, "ok"

    try:
        stacklib.wait_until(f"tenant {tenant.word}", probe, watch, SETTLE_LIMIT)
    except stacklib.StackError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def replicas(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("search-replicas")
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_INGEST_SYMBOL_WORKERS="1")
    # Page tokens are keyed by a secret every replica shares, so a token outlives a move.
    env["KOTADB_SEARCH_CURSOR_SECRET"] = "search-replica-tests-cursor-secret-0123456789"
    env["KOTADB_SEARCH_LISTEN_URL"] = database_url
    with Supervisor(grace=20) as supervisor:
        addresses = {
            name: spawn_service(supervisor, workdir, name, name, env)[0] for name in ("auth", "ingest")
        }
        search: dict[str, stacklib.ServiceProcess] = {}
        for name in REPLICAS:
            replica_env = dict(env, KOTADB_SEARCH_REPLICA=name)
            replica_env["KOTADB_SEARCH_DATA_DIR"] = str(workdir / f"{name}-data")
            search[name] = stacklib.spawn_service(
                supervisor,
                name,
                "search",
                port_file=workdir / f"{name}.port",
                log_path=workdir / f"{name}.log",
                env=replica_env,
            )
            wait_until(f"{name} port", port_file_probe(search[name].port_file), supervisor)
        for address in [*addresses.values(), *(s.address for s in search.values())]:
            wait_healthy(address, supervisor)
        for process in search.values():
            process.pin_ports()  # a restarted replica comes back where Envoy looks for it
        envoy = start_envoy(
            supervisor,
            workdir,
            "envoy",
            auth=addresses["auth"],
            ingest=addresses["ingest"],
            search=",".join(s.address for s in search.values()),
            identity_key=IDENTITY_KEY,
        )
        wait_gateway_healthy(envoy, supervisor)
        tenants: list[Tenant] = []
        # Tenants are added until both replicas own one (the ring decides; 12 leave a 2^-11 chance).
        while len(tenants) < MAX_TENANTS and (len(tenants) < 4 or len({t.replica for t in tenants}) < 2):
            index = len(tenants)
            key = seed_key(database_url, email_prefix=f"replica-{index}", permissions=("read", "write"))
            tenant = Tenant(key=key, word=f"ringword{index}x")
            _write(
                envoy,
                tenant,
                {
                    f"t{index}/main.py": f"def {tenant.word}_fn():\n    return '{tenant.word}'\n",
                    f"t{index}/notes.txt": f"see {tenant.word}\nand more\n",
                },
            )
            _settled(envoy, tenant, supervisor)
            tenant.replica = _replica(envoy, tenant)
            tenants.append(tenant)
        yield Replicas(envoy, search, tenants, supervisor)


def test_tenants_stick_to_one_replica_and_each_sees_only_its_own_files(replicas: Replicas) -> None:
    owners = {t.replica for t in replicas.tenants}
    assert owners == set(REPLICAS), f"the ring put every tenant on {owners}"
    for tenant in replicas.tenants:
        for _ in range(3):
            assert _answer(replicas.envoy, tenant) == (200, sorted(tenant.paths))
            assert _replica(replicas.envoy, tenant) == tenant.replica


def test_a_killed_replica_s_tenants_are_answered_by_the_other_and_return(replicas: Replicas) -> None:
    envoy, supervisor = replicas.envoy, replicas.supervisor
    victim_name = REPLICAS[0]
    survivor = REPLICAS[1]
    victim = replicas.search[victim_name]
    moved = [t for t in replicas.tenants if t.replica == victim_name]
    assert moved
    os.killpg(victim.child.pid, signal.SIGKILL)
    assert victim.child.popen is not None
    victim.child.popen.wait(timeout=30)

    # Every tenant is answered, correctly, while the victim is down; its tenants by the survivor.
    living = [child for child in supervisor.children if child is not victim.child]
    for tenant in replicas.tenants:
        _settled(envoy, tenant, living, replica=survivor)
    # A write during the outage is searchable at its revision (the survivor tails the feed).
    outage = moved[0]
    _write(envoy, outage, {f"outage/{outage.word}.md": f"# {outage.word} written during the outage\n"})
    assert _answer(envoy, outage) == (200, sorted(outage.paths))

    victim.child.restart()
    wait_healthy(victim.address, supervisor)
    # Back on the ring: the victim's tenants return to it, with the outage's write.
    for tenant in replicas.tenants:
        _settled(envoy, tenant, supervisor, replica=tenant.replica)
    for tenant in replicas.tenants:
        assert _answer(envoy, tenant) == (200, sorted(tenant.paths))


def _cli_env(replicas: Replicas, tenant: Tenant) -> dict[str, str]:
    env = dict(os.environ, KOTADB_URL=replicas.envoy.url, KOTADB_API_KEY=tenant.key)
    env["XDG_CACHE_HOME"] = str(Path(replicas.envoy.config_path).parent / "no-dev-stack")
    return env


def test_kotadb_search_symbols_and_index_status_through_the_gateway(replicas: Replicas) -> None:
    tenant = replicas.tenants[0]
    env = _cli_env(replicas, tenant)
    found = kotadb("search", tenant.word, "--min-revision", str(tenant.revision), "--color", "never", env=env)
    assert found.returncode == 0, found.stderr
    index = replicas.tenants.index(tenant)
    assert f"t{index}/main.py:2:    return '{tenant.word}'" in found.stdout.splitlines()
    assert f"t{index}/notes.txt:1:see {tenant.word}" in found.stdout.splitlines()
    lines = len(found.stdout.splitlines())
    assert found.stderr.startswith(f"{len(tenant.paths)} files, {lines} lines; index at revision ")

    as_json = kotadb("search", tenant.word, "--json", "--context", "1", env=env)
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    notes = [r for r in records if r["data"].get("path", {}).get("text") == f"t{index}/notes.txt"]
    path = {"text": f"t{index}/notes.txt"}
    assert [r["type"] for r in notes] == ["begin", "match", "context", "end"]
    assert notes[1]["data"] == {
        "path": path, "lines": {"text": f"see {tenant.word}\n"}, "line_number": 1, "absolute_offset": 0,
        "submatches": [{"match": {"text": tenant.word}, "start": 4, "end": 4 + len(tenant.word)}],
    }  # fmt: skip
    assert notes[2]["data"] == {
        "path": path, "lines": {"text": "and more\n"}, "line_number": 2,
        "absolute_offset": len(f"see {tenant.word}\n"), "submatches": [],
    }  # fmt: skip
    assert records[-1]["type"] == "summary"

    streamed = kotadb("search", tenant.word, "--all", "--color", "never", env=env)
    assert streamed.returncode == 0, streamed.stderr
    assert sorted(streamed.stdout.splitlines()) == sorted(found.stdout.splitlines())

    # Another tenant's word finds nothing for this key: exit 1, nothing printed.
    other = replicas.tenants[1]
    nothing = kotadb("search", other.word, env=env)
    assert (nothing.returncode, nothing.stdout) == (1, "")

    symbols = kotadb("symbols", f"{tenant.word}_fn", "--kind", "function", env=env)
    assert symbols.returncode == 0, symbols.stderr
    assert symbols.stdout.splitlines() == [f"t{index}/main.py:1: function {tenant.word}_fn"]

    index_status = kotadb("index", "status", "--json", env=env)
    assert index_status.returncode == 0, index_status.stderr
    answer = json.loads(index_status.stdout)
    assert answer["replica"] == tenant.replica
    assert int(answer["document_count"]) == len(tenant.paths)

    bad = kotadb("search", "foo(", "--regex", env=env)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith("kotadb: INVALID_ARGUMENT") and len(bad.stderr.splitlines()) == 1

    refused = kotadb("search", "x", env=dict(env, KOTADB_API_KEY="kdb_live_not_a_key"))
    assert refused.returncode == 2
    assert refused.stderr.startswith("kotadb: UNAUTHENTICATED")


def test_tenants_on_different_replicas_see_nothing_of_each_other(replicas: Replicas) -> None:
    base = replicas.envoy.url
    owner = next(t for t in replicas.tenants if t.replica == REPLICAS[0])
    other = next(t for t in replicas.tenants if t.replica == REPLICAS[1])
    for me, them in ((owner, other), (other, owner)):
        code, mine = http_json("POST", f"{base}/v1/code:streamSearch", me.key, {"query": me.word})
        streamed = sorted(f["path"] for m in messages(mine) for f in m.get("fileMatches", []))
        assert code == 200 and streamed == sorted(me.paths)
        code, theirs = http_json("POST", f"{base}/v1/code:streamSearch", me.key, {"query": them.word})
        assert code == 200 and [m.get("fileMatches", []) for m in messages(theirs)] == [[]]
        code, symbols = http_json("POST", f"{base}/v1/symbols:search", me.key, {"query": f"{them.word}_fn"})
        assert code == 200 and symbols.get("symbols", []) == [], symbols
        code, own_symbols = http_json("POST", f"{base}/v1/symbols:search", me.key, {"query": f"{me.word}_fn"})
        assert code == 200 and [s["name"] for s in own_symbols["symbols"]] == [f"{me.word}_fn"]

        # A page token is bound to its tenant (and every replica shares the key that signs it).
        body = {"query": me.word, "pageSize": 1, "mode": "SEARCH_MODE_EXHAUSTIVE"}
        code, first = http_json("POST", f"{base}/v1/code:search", me.key, body)
        assert code == 200 and first["nextPageToken"], first
        code, refused = http_json(
            "POST", f"{base}/v1/code:search", them.key, {**body, "pageToken": first["nextPageToken"]}
        )
        assert code == 400, refused
        code, second = http_json(
            "POST", f"{base}/v1/code:search", me.key, {**body, "pageToken": first["nextPageToken"]}
        )
        assert code == 200 and len(second["fileMatches"]) == 1
