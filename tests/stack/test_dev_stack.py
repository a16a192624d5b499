"""`kotadb dev` as a user runs it: a subprocess, stack.json, health, reflection, status, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cli import devrepo, gateway
from services.cli.keys import DEMO_USER_ID
from services.common.stack import StackInfo
from tests.harness import DevStack, free_port

# Started with two search replicas: `search` and `search-2`, then the MCP server.
COMPONENTS = ["postgres", "auth", "ingest", "search", "search-2", "mcp", "envoy", "gateway"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    # The unprivileged Postgres user must be able to traverse to the cluster directory.
    tmp_path.chmod(0o711)
    yield tmp_path / "dev"


def _mcp_tools(gateway_url: str, key: str) -> tuple[int, str]:
    """_mcp_tools asks the gateway's /mcp for the tool list with `key`: (HTTP status, body)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "authorization": f"Bearer {key}",
    }
    request = urllib.request.Request(f"{gateway_url}/mcp", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status), response.read().decode()


def _http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status), response.headers.get("content-type", ""), response.read().decode()


def _serving_health(url: str, limit: float = 60.0) -> tuple[int, str, str]:
    deadline = time.monotonic() + limit
    while True:
        try:
            return _http_get(url)
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _reflected_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {service.name for response in responses for service in response.list_services_response.service}


async def _system_identifier(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        identifier: int = await connection.fetchval("select system_identifier from pg_control_system()")
    finally:
        await connection.close()
    return identifier


def _status(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _demo_documents(database_url: str) -> dict[str, int]:
    """_demo_documents maps each live document of the demo repository to its symbol count."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "select d.path, count(s.*) as symbols from public.documents d"
            " join public.repositories r on r.id = d.repository_id"
            " left join public.symbols s on s.document_id = d.id"
            " where r.full_name = $1 and r.user_id = $2 and d.deleted_at is null group by d.path",
            devrepo.DEMO_REPOSITORY,
            DEMO_USER_ID,
        )
    finally:
        await connection.close()
    return {row["path"]: row["symbols"] for row in rows}


def _printed_example(output: str, command: str) -> list[str]:
    """_printed_example is the argv of the `kotadb COMMAND …` example `kotadb dev` printed."""
    for line in output.splitlines():
        if line.split()[:2] != ["kotadb", command.split()[0]]:
            continue
        words = shlex.split(line.split("#", 1)[0])
        if words[:2] == ["kotadb", *command.split()[:1]] and " ".join(words[1:]).startswith(command):
            return words[1:]
    raise AssertionError(f"no `kotadb {command}` example in:\n{output}")


def _wait_for_output(dev: DevStack, text: str) -> None:
    deadline = time.monotonic() + 120
    while text not in dev.output:
        assert dev.process.poll() is None and time.monotonic() < deadline, dev.output
        time.sleep(0.25)


def _kotadb(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("KOTADB_DATABASE_URL", None)
    env.pop("KOTADB_URL", None)
    env.pop("KOTADB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
        cwd=gateway.REPO_ROOT,
    )


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dev_stack_starts_reports_stops_and_restarts(data_dir: Path) -> None:
    first = DevStack(data_dir, "--gateway-port", "0", "--search-replicas", "2")
    try:
        stack = first.wait_for_stack()

        # stack.json names every endpoint, on real (non-zero) ports.
        assert set(stack) >= {"gateway", "grpc", "database_url", "envoy_admin", "pid", "started_at"}
        assert stack["pid"] == first.process.pid
        addresses = [stack["gateway"], stack["envoy_admin"], stack["auth_check"], *stack["grpc"].values()]
        ports = [int(address.rsplit(":", 1)[1]) for address in addresses]
        assert all(port > 0 for port in ports) and len(set(ports)) == len(ports)
        assert stack["database_url"].startswith("postgresql://")

        # The demo repository starts syncing as the stack comes up; on a loaded machine a
        # readiness probe may time out meanwhile, so /health is awaited (bounded), not sampled once.
        status, content_type, body = _serving_health(f"{stack['gateway']}/health")
        assert status == 200 and content_type.startswith("application/json")
        assert json.loads(body)["status"] == "SERVING"

        expected = {"auth": "kotadb.v1.AuthService", "ingest": "kotadb.v1.IngestService"}
        expected["search"] = expected["search-2"] = "kotadb.v1.SearchService"
        assert list(stack["grpc"]) == ["auth", "ingest", "search", "search-2"]
        for name, service in expected.items():
            listed = _reflected_services(stack["grpc"][name])
            assert {service, "grpc.health.v1.Health", "kotadb.v1.HealthService"} <= listed, listed

        # The checkout is registered as the demo repository and indexed: the printed examples
        # work as printed (jobs watch to SUCCEEDED, repos list), and its files are documents.
        _wait_for_output(first, "Ctrl-C stops everything.")
        watched = _kotadb(_printed_example(first.output, "jobs watch"))
        assert watched.returncode == 0 and "SUCCEEDED" in watched.stdout, watched.stdout + watched.stderr
        repos = _kotadb(_printed_example(first.output, "repos list"))
        assert repos.returncode == 0 and devrepo.DEMO_REPOSITORY in repos.stdout, repos.stderr
        documents = asyncio.run(_demo_documents(stack["database_url"]))
        assert documents.get("services/cli/dev.py", 0) > 0, sorted(documents)[:20]
        assert "README.md" in documents
        assert _printed_example(first.output, "push")[:2] == ["push", "."]
        # The printed `kotadb search` finds this very function in the demo repository.
        # (The sync's last writes reach the index through the change feed: poll, bounded.)
        deadline = time.monotonic() + 120
        while (searched := _kotadb(_printed_example(first.output, "search"))).returncode == 1:
            assert time.monotonic() < deadline, searched.stderr
            time.sleep(1)
        assert searched.returncode == 0, searched.stdout + searched.stderr
        assert "services/cli/dev.py:" in searched.stdout and "def run_stack(" in searched.stdout
        # The MCP server answers behind the gateway's /mcp, with the demo key.
        mcp_status, mcp_body = _mcp_tools(stack["gateway"], stack["demo_api_key"])
        assert mcp_status == 200 and "search_code" in mcp_body, mcp_body
        assert stack["mcp"] and stack["pids"]["mcp"]

        result = _status(data_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        verdicts = lines[: len(COMPONENTS)]
        assert [line.split()[0] for line in verdicts] == COMPONENTS
        assert all(line.split()[1] == "ok" for line in verdicts)
        # Then every Prometheus endpoint stack.json knows: Envoy's at least.
        assert f"metrics: envoy {stack['envoy_admin']}/stats/prometheus" in lines[len(COMPONENTS) :]
        as_json = json.loads(_status(data_dir, "--json").stdout)
        assert [entry["name"] for entry in as_json] == COMPONENTS

        # A second `kotadb dev` on the same data dir refuses to start while this one runs.
        rival = DevStack(data_dir, "--gateway-port", "0")
        try:
            assert rival.process.wait(timeout=60) == 1
        finally:
            rival.kill_if_running()
        assert "already running" in rival.output
        assert (data_dir / "stack.json").exists()

        identifier = asyncio.run(_system_identifier(stack["database_url"]))
        processes = first.descendants(stack)
        names = {process.name() for process in processes}
        assert "envoy" in names and "postgres" in names
        assert len(processes) >= 5

        assert first.terminate() == 0, first.output
        survivors = [process for process in processes if _alive(process)]
        assert not survivors, f"left running: {survivors}"
        assert not (data_dir / "stack.json").exists()
        assert "stopped" in first.output

        after = _status(data_dir)
        assert after.returncode != 0
        assert "no stack running" in after.stderr
    finally:
        first.kill_if_running()

    second = DevStack(data_dir, "--gateway-port", "0")
    try:
        stack = second.wait_for_stack()
        assert "reusing the embedded Postgres cluster" in second.output
        assert "migrations applied: none, up to date" in second.output
        assert asyncio.run(_system_identifier(stack["database_url"])) == identifier
        # The demo repository is found again (not registered twice) and synced anew.
        _wait_for_output(second, "Ctrl-C stops everything.")
        assert f"found demo repository {devrepo.DEMO_REPOSITORY}" in second.output
        processes = second.descendants(stack)
        assert second.terminate(signal.SIGINT) == 0, second.output  # Ctrl-C
        assert not [process for process in processes if _alive(process)]
    finally:
        second.kill_if_running()


def test_taken_gateway_port_is_a_clear_error(data_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = DevStack(data_dir, "--gateway-port", str(port))
        try:
            code = stack.process.wait(timeout=60)
        finally:
            stack.kill_if_running()
    assert code == 1
    assert f"gateway {port}" in stack.output and "already in use" in stack.output
    assert not (data_dir / "stack.json").exists()
    assert not (data_dir / "postgres").exists(), "nothing should start when a port is taken"


def test_status_reports_down_components(tmp_path: Path) -> None:
    closed = [free_port() for _ in range(5)]
    stack = StackInfo(
        gateway=f"http://127.0.0.1:{closed[0]}",
        envoy_admin=f"http://127.0.0.1:{closed[1]}",
        grpc={"auth": f"127.0.0.1:{closed[2]}", "ingest": f"127.0.0.1:{closed[3]}", "search": "127.0.0.1:1"},
        auth_check="127.0.0.1:1",
        database_url=f"postgresql://postgres:secret@127.0.0.1:{closed[4]}/kotadb",
        pid=os.getpid(),
        started_at=StackInfo.now(),
        data_dir=str(tmp_path),
        logs=str(tmp_path / "logs"),
        pids={"postgres": None},
        demo_api_key="",
        demo_api_key_id="",
        demo_user_id="",
    )
    stack.save(tmp_path / "stack.json")
    result = _status(tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 6
    assert all(line.split()[1] == "DOWN" for line in lines), result.stdout
    assert "secret" not in result.stdout


def test_status_refuses_a_malformed_stack_json(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"gateway": "http://127.0.0.1:1", "pid": "12"}))
    result = _status(tmp_path)
    assert result.returncode == 1
    assert "stack.json" in result.stderr and "has no" in result.stderr
