"""The auth process's Check listener against hostile traffic, as a real `kotadb serve auth` child.

What issue 10 described, end to end: a stranger without an API key floods the Check port with
2-byte DATA frames under a large announced message, over a few connections, and opens idle
connections past the cap. The auth process's memory (RSS, with a generous bound) must not
follow, its gRPC port must keep answering health checks, and a real Check with a real key must
be answered during and after. The Check listener must also stay on loopback when the gRPC port
is bound to every interface.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hpack import Encoder

from services.bench.auth import check_request
from services.common.supervisor import ChildProcess, Supervisor
from tests.harness import CHECK_LISTENERS, seed_key, service_env, spawn_service, wait_healthy

IDENTITY_KEY = "check-listener-hostile-identity-key-0123456789"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MiB = 1 << 20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


@pytest.fixture(scope="module")
def auth(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, ChildProcess]]:
    workdir: Path = tmp_path_factory.mktemp("check-hostile")
    # The gRPC port on every interface, as in a container; the Check listener must not follow.
    env = service_env(
        database_url,
        workdir,
        IDENTITY_KEY,
        KOTADB_AUTH_HOST="0.0.0.0",
        KOTADB_AUTH_CHECK_MAX_CONNECTIONS="64",
    )
    with Supervisor(grace=20) as supervisor:
        address, child = spawn_service(supervisor, workdir, "auth", "auth", env)
        wait_healthy(address, supervisor)
        yield address, CHECK_LISTENERS[address], child


def checked(target: str, key: str) -> None:
    """checked sends a real Check for `key` (a GET of /v1/index, as Envoy would) and expects OK."""
    request = check_request(key, "/v1/index")
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.headers["content-type"] = "application/json"
    with grpc.insecure_channel(target) as channel:
        answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=30)
    assert answer.status.code == 0, answer.status


def healthy(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_check_listener_binds_loopback_when_the_grpc_port_binds_everything(
    auth: tuple[str, str, ChildProcess],
) -> None:
    address, check, child = auth
    listening = {
        c.laddr.port: c.laddr.ip
        for c in psutil.Process(child.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening[int(address.rsplit(":", 1)[1])] in ("0.0.0.0", "::")
    assert listening[int(check.rsplit(":", 1)[1])] == "127.0.0.1"


def _flood(port: int, frames: int, done: list[bool]) -> None:
    """_flood announces a 4 MiB message and sends `frames` DATA frames of 2 bytes, reading nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        block = Encoder().encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", CHECK_PATH),
                (":authority", "auth"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        sock.sendall(
            PREFACE
            + frame(0x4, 0, 0)
            + frame(0x1, 0x4, 1, block)
            + frame(0x0, 0, 1, b"\x00" + struct.pack(">L", 4 * MiB - 1))
        )
        burst = frame(0x0, 0, 1, b"ab") * 10_000
        with contextlib.suppress(OSError):
            for _ in range(frames // 10_000):
                sock.sendall(burst)
            # The PING is answered after every frame before it was processed: then the flood has
            # reached the server's memory (or been refused), not just the kernel's buffers.
            sock.sendall(frame(0x6, 0, 0, b"flooded!"))
            _until_ping_ack(sock)
        done.append(True)


def _until_ping_ack(sock: socket.socket) -> None:
    """_until_ping_ack reads frames until the server's PING ACK (or the end of the connection)."""
    data = b""
    while True:
        while len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            if len(data) < 9 + length:
                break
            if data[3] == 0x6 and data[4] & 0x1:
                return
            data = data[9 + length :]
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk


def _established(process: psutil.Process, port: int) -> int:
    """_established counts the process's open connections on its side of `port`."""
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_a_tiny_frame_flood_and_idle_connections_leave_auth_whole(
    database_url: str, auth: tuple[str, str, ChildProcess]
) -> None:
    address, check, child = auth
    key = seed_key(database_url, email_prefix="check-hostile", rate_limit=100_000)
    checked(check, key)
    process = psutil.Process(child.pid)
    rss_before = process.memory_info().rss
    port = int(check.rsplit(":", 1)[1])
    # 4 connections x 1,000,000 frames of 2 bytes (44 MB on the wire): kept one object per
    # frame, some 170 MB; charged per frame, refused after a few hundred KB per stream.
    done: list[bool] = []
    floods = [threading.Thread(target=_flood, args=(port, 1_000_000, done)) for _ in range(4)]
    for thread in floods:
        thread.start()
    # Idle connections past the cap (64 here): the excess is refused, the process keeps its fds.
    idle = []
    for _ in range(200):
        with contextlib.suppress(OSError):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
    # During: the gRPC port answers health, a real Check on a new connection is answered (the
    # idle ones are still in their handshake, so a real client's connection takes a slot).
    healthy(address)
    checked(check, key)
    # The listener holds at most its cap of 64 connections (floods and idle ones together).
    deadline = time.monotonic() + 60
    while (held := _established(process, port)) > 64:
        assert time.monotonic() < deadline, f"{held} connections held on the Check port"
        time.sleep(0.1)
    for thread in floods:
        thread.join(300)
    assert len(done) == 4
    for sock in idle:
        sock.close()
    rss_after = process.memory_info().rss
    assert rss_after - rss_before < 64 * MiB, (rss_before, rss_after)
    # After.
    healthy(address)
    checked(check, key)
