"""`kotadb serve` and `python -m services.<name>` as real processes: start, serve, drain on a signal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cli.serve import main as serve_main
from tests.runtime.rpc import SERVING, wait_for_health

KOTADB = Path(sys.executable).with_name("kotadb")


class ServiceProcess:
    """ServiceProcess is one service child process with its JSON log lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self._seen = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode().rstrip("\n")
            async with self._seen:
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    self.other_lines.append(line)
                self._seen.notify_all()

    async def wait_for_log(self, msg: str, limit: float = 30) -> dict[str, Any]:
        """wait_for_log returns the first record whose msg is `msg`, waiting up to `limit` seconds."""
        async with asyncio.timeout(limit), self._seen:
            while True:
                for record in self.records:
                    if record.get("msg") == msg:
                        return record
                if self._reader.done():
                    raise AssertionError(f"process exited before logging {msg!r}: {self.other_lines[-20:]}")
                await self._seen.wait()

    async def finish(self, limit: float) -> int:
        """finish waits up to `limit` seconds for exit and returns the exit code."""
        async with asyncio.timeout(limit):
            code = await self.process.wait()
            await self._reader
        return code


def _environment(database_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KOTADB_DATABASE_URL": database_url,
            f"{prefix}READINESS_INTERVAL": "0.1",
            f"{prefix}SHUTDOWN_GRACE": "20",
            "KOTADB_SEARCH_DATA_DIR": str(tmp_path / "index"),
            "KOTADB_LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.fixture
async def search_process(database_url: str, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    port_file = tmp_path / "port"
    process = await asyncio.create_subprocess_exec(
        str(KOTADB),
        "serve",
        "search",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        env=_environment(database_url, "KOTADB_SEARCH_", tmp_path),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    child = ServiceProcess(process)
    try:
        yield child
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_search_drains_an_in_flight_call_on_sigterm(
    search_process: ServiceProcess, tmp_path: Path
) -> None:
    listening = await search_process.wait_for_log("listening")
    port = int(listening["port"])
    assert port > 0
    assert (tmp_path / "port").read_text().strip() == str(port)

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_for_health(channel, SERVING, "kotadb.v1.SearchService")

        # A bidirectional reflection stream is a call we can keep open across the signal.
        requests: asyncio.Queue[reflection_pb2.ServerReflectionRequest | None] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            while (item := await requests.get()) is not None:
                yield item

        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(outgoing(), timeout=60)
        await requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        first = await call.read()
        assert any(s.name == "kotadb.v1.SearchService" for s in first.list_services_response.service)

        search_process.process.send_signal(signal.SIGTERM)
        await search_process.wait_for_log("stopping")

        # The server is draining: the open call still gets answers and completes normally.
        await requests.put(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="kotadb.v1.SearchService")
        )
        second = await call.read()
        assert second.file_descriptor_response.file_descriptor_proto
        await requests.put(None)
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await channel.close(None)

    assert await search_process.finish(limit=30) == 0
    stopped = await search_process.wait_for_log("stopped")
    assert stopped["service"] == "search"
    # Every line the service wrote is one JSON object with the agreed fields.
    assert not search_process.other_lines, search_process.other_lines[:5]
    for record in search_process.records:
        assert {"ts", "level", "logger", "msg"} <= record.keys()
    access = [r for r in search_process.records if r.get("logger") == "kotadb.access"]
    assert all({"request_id", "method", "code", "duration_ms"} <= r.keys() for r in access)


async def test_python_dash_m_runs_a_service_until_sigint(database_url: str, tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.auth",
        "--port",
        "0",
        env=_environment(database_url, "KOTADB_AUTH_", tmp_path),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    child = ServiceProcess(process)
    try:
        port = int((await child.wait_for_log("listening"))["port"])
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            await wait_for_health(channel, SERVING, "kotadb.v1.AuthService")
        finally:
            await channel.close(None)
        process.send_signal(signal.SIGINT)
        assert await child.finish(limit=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_bad_settings_fail_fast_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOTADB_DATABASE_URL", "postgresql://127.0.0.1:1/none")
    monkeypatch.setenv("KOTADB_INGEST_PORT", "fifty")
    assert serve_main(["ingest"]) == 2
    assert "KOTADB_INGEST_PORT" in capsys.readouterr().err

    monkeypatch.delenv("KOTADB_INGEST_PORT")
    monkeypatch.delenv("KOTADB_DATABASE_URL")
    assert serve_main(["ingest"]) == 2
    assert "KOTADB_DATABASE_URL" in capsys.readouterr().err
