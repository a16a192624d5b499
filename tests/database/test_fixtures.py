"""The shared session fixtures clean up after themselves, even when the run is terminated."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]

INNER_TEST = """
import asyncio
import pathlib

import asyncpg


def test_hold_the_cluster(pg_cluster):
    async def data_directory():
        conn = await asyncpg.connect(pg_cluster)
        try:
            return await conn.fetchval("select current_setting('data_directory')")
        finally:
            await conn.close()

    pathlib.Path({report!r}).write_text(asyncio.run(data_directory()))
    while True:
        asyncio.run(asyncio.sleep(0.05))
"""


def _postmasters(pgdata: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        # Zombies count as gone: PID 1 reaps orphaned postmasters on its own schedule.
        if pgdata in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_terminated_session_stops_its_cluster(tmp_path: Path) -> None:
    report = tmp_path / "pgdata.txt"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST.format(report=str(report)))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", "pyproject.toml", str(inner)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not report.exists() or not report.read_text():
            assert run.poll() is None, "the inner test run ended early"
            assert time.monotonic() < deadline, "the inner test never reached its cluster"
            time.sleep(0.1)
        pgdata = report.read_text()
        assert _postmasters(pgdata), "the cluster should be running while the test holds it"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == -signal.SIGTERM
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert _postmasters(pgdata) == []
    assert not Path(pgdata).exists()
