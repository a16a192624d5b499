"""`kotadb dev` heals: a part killed with SIGKILL comes back on its ports, the rest reconnect.

One stack runs for the whole module, as a user runs it (a subprocess on free ports with its own
embedded Postgres). The tests run in order: the Postgres postmaster is killed, then a service, then Envoy;
each time `kotadb status` must turn healthy again and a request through the gateway must work.
The last test makes a service unable to start again (its port taken) and checks that the command
gives up after its bounded attempts, naming the service's log file.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.stack import StackInfo
from tests.harness import STOP_LIMIT, DevStack, kotadb

HEAL_LIMIT = 180.0  # seconds; a restarted service imports everything again on a shared machine
GIVE_UP_LIMIT = 300.0


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(tmp_path_factory.mktemp("heals") / "dev", "--gateway-port", "0")
    try:
        stack.wait_for_stack()
        yield stack
    finally:
        stack.kill_if_running()


def _usage_status(info: StackInfo) -> int:
    """_usage_status is the HTTP status of GET /v1/usage through the gateway with the demo key."""
    request = urllib.request.Request(
        f"{info.gateway}/v1/usage", headers={"Authorization": f"Bearer {info.demo_api_key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _wait_healed(dev: DevStack, part: str, old_pid: int) -> StackInfo:
    """_wait_healed waits until `part` runs under a new pid, status is all ok and a request works."""
    deadline = time.monotonic() + HEAL_LIMIT
    detail = ""
    while time.monotonic() < deadline:
        assert dev.process.poll() is None, f"kotadb dev exited instead of healing:\n{dev.output}"
        info = dev.info()
        if info.pids.get(part) not in (None, old_pid):
            status = kotadb("status", "--data-dir", str(dev.data_dir), timeout=60)
            detail = status.stdout + status.stderr
            if status.returncode == 0 and _usage_status(info) == 200:
                return info
        time.sleep(0.5)
    pytest.fail(f"{part} not healed after {HEAL_LIMIT}s; last status:\n{detail}\n{dev.output}")


def test_a_killed_postgres_is_restarted_and_the_services_reconnect(dev: DevStack) -> None:
    before = dev.info()
    assert _usage_status(before) == 200
    postmaster = before.pids["postgres"]
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)

    after = _wait_healed(dev, "postgres", postmaster)
    # Same address: every service's database URL is still right, nobody was restarted for it.
    assert after.database_url == before.database_url
    services = list(before.grpc)
    assert [after.pids[name] for name in services] == [before.pids[name] for name in services]
    assert "postgres stopped running; restarting in 0.5s" in dev.output
    assert "postgres restarted (attempt" in dev.output


def test_a_killed_service_is_restarted_on_its_ports(dev: DevStack) -> None:
    before = dev.info()
    old = before.pids["auth"]
    assert old is not None
    os.kill(old, signal.SIGKILL)

    after = _wait_healed(dev, "auth", old)
    # Envoy and the other services still reach auth where they knew it, Check listener included.
    assert after.grpc == before.grpc and after.auth_check == before.auth_check
    assert "auth exited with status -9; restarting in" in dev.output
    assert "auth restarted (attempt 1 of 5)" in dev.output


def test_a_killed_envoy_is_restarted_on_its_config(dev: DevStack) -> None:
    before = dev.info()
    old = before.pids["envoy"]
    assert old is not None
    os.kill(old, signal.SIGKILL)

    after = _wait_healed(dev, "envoy", old)
    assert after.gateway == before.gateway and after.envoy_admin == before.envoy_admin
    assert "envoy restarted (attempt 1 of 5)" in dev.output


def _occupy(port: int, limit: float = 10.0) -> socket.socket:
    """_occupy binds port (without SO_REUSEPORT, so gRPC cannot share it) as soon as it is free.

    SO_REUSEADDR lets the bind succeed while the killed server's connections are in TIME_WAIT.
    """
    deadline = time.monotonic() + limit
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
            continue
        sock.listen()
        return sock


def test_a_service_that_cannot_come_back_is_given_up_naming_its_log_file(dev: DevStack) -> None:
    info = dev.info()
    search = info.pids["search"]
    assert search is not None
    port = int(info.grpc["search"].rsplit(":", 1)[1])
    os.kill(search, signal.SIGKILL)
    # The first restart waits out a backoff; the port is ours well before that.
    with _occupy(port):
        code = dev.process.wait(timeout=GIVE_UP_LIMIT)
    output = dev.output
    assert code == 1, output
    log_file = Path(info.log_files["search"])
    assert log_file == dev.data_dir / "logs" / "search.log" and log_file.is_file()
    assert f"gave up after 5 restart attempts. See its log: {log_file}" in output, output
    assert "search restarted (attempt 5 of 5)" in output
    # It stopped the rest and cleaned up, as on Ctrl-C.
    assert "kotadb dev: stopped" in output
    assert not (dev.data_dir / "stack.json").exists()
    assert dev.process.wait(timeout=STOP_LIMIT) == 1
