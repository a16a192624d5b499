"""The lean h2c server under hostile traffic, driven by a second HTTP/2 implementation (python-hyper `h2`).

The server runs in its own thread and event loop, as it does next to auth's gRPC server; clients
are blocking sockets speaking HTTP/2 through `h2` (an implementation that shares no code with
ours), raw frames where `h2` refuses to send what an attacker would, and a real grpcio channel
calling Check, which must keep working during and after every attack. Memory is checked through
the server's own charge (`buffered`, which the limits are enforced on) and its refusal counts,
never through timings: timeouts are set small and the tests wait generously for their effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import metrics
from services.common.h2limits import FRAME_COST, H2Limits
from services.common.h2unary import (
    CONTINUATION,
    DATA,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PREFACE,
    SETTINGS,
    H2UnaryServer,
)

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
SERVICE = "h2-hostile-test"
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
T = TypeVar("T")


def check(message: bytes, headers: Mapping[str, str]) -> bytes:
    """check answers a CheckRequest with OK, echoing its path in a header (a Check-shaped handler)."""
    request = external_auth_pb2.CheckRequest.FromString(message)
    response = external_auth_pb2.CheckResponse()
    response.status.code = 0
    header = response.ok_response.headers.add().header
    header.key, header.value = "x-checked-path", request.attributes.request.http.path
    return bytes(response.SerializeToString())


class Served:
    """Served is an H2UnaryServer running in a thread of its own, as a separate process would be."""

    def __init__(self, limits: H2Limits) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = H2UnaryServer({CHECK_PATH: check}, limits=limits, name="hostile", service=SERVICE)
        self.port = self.run(self.server.start("127.0.0.1", 0))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refused(self, reason: str) -> int:
        return self.server.refusals.counts[reason]


@contextlib.contextmanager
def serving(**limits: Any) -> Iterator[Served]:
    served = Served(H2Limits(**limits))
    try:
        yield served
    finally:
        served.close()


def wait_for(what: str, condition: Callable[[], bool], limit: float = 30.0) -> None:
    """wait_for polls condition until it holds; the limit is only there so a broken server fails the test."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


def real_check(channel: grpc.Channel, path: str = "/v1/ok") -> None:
    """real_check calls Check through grpcio and checks the answer."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.path = path
    answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=20)
    assert answer.status.code == 0
    assert answer.ok_response.headers[0].header.value == path


def refusals_metric(reason: str) -> float:
    """refusals_metric is kotadb_refusals_total for this module's server and `reason`."""
    value = metrics.REGISTRY.get_sample_value("kotadb_refusals_total", {"service": SERVICE, "reason": reason})
    return value or 0.0


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def grpc_prefix(length: int) -> bytes:
    return b"\x00" + struct.pack(">L", length)


def request_headers(extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", CHECK_PATH),
        (":authority", "auth"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]


class H2Client:
    """H2Client is a blocking HTTP/2 client built on python-hyper `h2`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []
        # Read the server's SETTINGS so h2 knows our large receive windows.
        self.read_until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events))

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def read_until(self, done: Callable[[], bool]) -> None:
        while not done():
            data = self.sock.recv(65536)
            if not data:
                return
            self.events.extend(self.conn.receive_data(data))
            self.flush()

    def stream_end(self, sid: int) -> dict[str, str]:
        """stream_end is the headers ending stream sid (trailers or trailers-only), or {} if it was reset."""

        def ended() -> bool:
            return any(
                isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated))
                and getattr(e, "stream_id", sid) == sid
                for e in self.events
            )

        self.read_until(ended)
        found: dict[str, str] = {}
        for e in self.events:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and e.stream_id == sid:
                found.update(dict(e.headers))  # type: ignore[arg-type]
        return found

    def terminated(self) -> h2.events.ConnectionTerminated | None:
        self.read_until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in self.events))
        for e in self.events:
            if isinstance(e, h2.events.ConnectionTerminated):
                return e
        return None

    def ping_round_trip(self) -> None:
        """ping_round_trip returns once the server answered a PING: it has read all sent before."""
        self.conn.ping(b"barrier!")
        self.flush()
        self.read_until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in self.events))

    def send_body(self, sid: int, data: bytes) -> None:
        """send_body queues data on stream sid in frames of at most 16 KiB."""
        for i in range(0, len(data), 16384):
            self.conn.send_data(sid, data[i : i + 16384])

    def close(self) -> None:
        self.sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """closed_by_server reads until EOF (True) or a 20 s silence (False), discarding what arrives."""
    sock.settimeout(20)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


# -- message size and memory -------------------------------------------------------------------


def test_a_declared_oversize_message_is_refused_before_any_of_it_is_kept() -> None:
    with serving() as s:
        client = H2Client(s.port)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, request_headers())
        # Check's default bound is 64 KiB: a 1 MiB announcement is refused on its prefix alone.
        client.conn.send_data(sid, grpc_prefix(1 << 20) + b"x" * 100)
        client.flush()
        ended = client.stream_end(sid)
        assert ended["grpc-status"] == RESOURCE_EXHAUSTED
        assert "larger than 65536 bytes" in ended["grpc-message"]
        assert s.refused("MESSAGE_TOO_LARGE") == 1
        wait_for("the charge to go", lambda: s.server.buffered == s.server.cached)
        client.close()
        wait_for("the connection to go", lambda: s.server.open_connections == 0)
        assert s.server.buffered == 0


def test_a_flood_of_two_byte_data_frames_is_charged_per_frame_and_refused() -> None:
    cap = 256 << 10
    total = 512 << 10
    limits = {"max_connection_bytes": cap, "max_total_bytes": total}
    with serving(**limits) as s, grpc.insecure_channel(s.target) as channel:
        real_check(channel)
        peak = 0
        clients = [H2Client(s.port) for _ in range(4)]
        sids = []
        for client in clients:
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, request_headers())
            # A legal announcement (60,000 bytes), then its body 2 bytes per frame: 11 bytes on the
            # wire, some 40 in memory per frame if each is kept as its own object.
            client.conn.send_data(sid, grpc_prefix(60_000))
            client.flush()
            sids.append(sid)
        for burst in range(10):
            for client, sid in zip(clients, sids, strict=True):
                if client.conn.streams.get(sid) is None or client.conn.streams[sid].closed:
                    continue
                with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    for _ in range(500):
                        client.conn.send_data(sid, b"ab")
                with contextlib.suppress(OSError):
                    client.flush()
            # During the flood: the charge stays under the server's cap and Check is answered.
            real_check(channel, f"/v1/during/{burst}")
            peak = max(peak, s.server.buffered)
            assert s.server.buffered <= total
        # Without the per-frame charge, 5,000 frames of 2 bytes are 10 KB: well under the caps.
        answers = [client.stream_end(sid) for client, sid in zip(clients, sids, strict=True)]
        assert all(a.get("grpc-status") == RESOURCE_EXHAUSTED for a in answers), answers
        assert all("too many request bytes" in a["grpc-message"] for a in answers)
        assert s.refused("BUFFER_LIMIT") == 4
        assert 0 < peak <= total
        for client in clients:
            client.close()
        wait_for("the connections to go", lambda: s.server.open_connections == 1)
        # What is left is the grpcio connection's cached request headers.
        wait_for("the charge to go", lambda: s.server.buffered == s.server.cached)
        buffered = metrics.REGISTRY.get_sample_value("kotadb_h2_buffered_bytes", {"service": SERVICE})
        assert buffered == s.server.buffered
        real_check(channel, "/v1/after")


def test_the_total_cap_holds_across_connections() -> None:
    # Each connection alone could hold 200 KiB; together they may not pass 300 KiB.
    with serving(max_connection_bytes=200 << 10, max_total_bytes=300 << 10) as s:
        clients = [H2Client(s.port) for _ in range(3)]
        answers = []
        for client in clients:
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, request_headers())
            client.send_body(sid, grpc_prefix(60_000) + b"y" * 59_000)
            for _ in range(6):
                # Streams that stay open, each charged, none finished.
                more = client.conn.get_next_available_stream_id()
                client.conn.send_headers(more, request_headers())
                client.send_body(more, grpc_prefix(60_000) + b"z" * 20_000)
            client.flush()
            answers.append((client, sid))
        # Wait until every byte sent has been read by the server, by a PING round trip each.
        for client, _ in answers:
            client.ping_round_trip()
        assert s.server.buffered <= 300 << 10
        assert s.refused("BUFFER_LIMIT") >= 1
        for client, _ in answers:
            client.close()
        wait_for("the charge to go", lambda: s.server.buffered == 0 and s.server.open_connections == 0)


# -- handshake, idle and connection cap ----------------------------------------------------------


def test_a_truncated_preface_is_closed_after_the_handshake_timeout() -> None:
    with serving(handshake_timeout=0.3) as s:
        half = socket.create_connection(("127.0.0.1", s.port))
        half.sendall(PREFACE[:10])
        no_settings = socket.create_connection(("127.0.0.1", s.port))
        no_settings.sendall(PREFACE)
        assert closed_by_server(half)
        assert closed_by_server(no_settings)
        assert s.refused("HANDSHAKE_TIMEOUT") == 2
        wait_for("the connections to go", lambda: s.server.open_connections == 0)
        with grpc.insecure_channel(s.target) as channel:
            real_check(channel)


def test_an_idle_connection_and_a_trickled_request_are_closed() -> None:
    with serving(idle_timeout=0.3) as s:
        idle = H2Client(s.port)
        sid = idle.conn.get_next_available_stream_id()
        idle.conn.send_headers(sid, request_headers(), end_stream=False)
        idle.conn.send_data(sid, grpc_prefix(10) + b"abc")
        idle.flush()
        # The request never finishes: the stream is not work, the connection goes.
        terminated = idle.terminated()
        assert terminated is not None and terminated.error_code == NO_ERROR
        assert closed_by_server(idle.sock)
        assert s.refused("IDLE_TIMEOUT") == 1
        wait_for("the charge to go", lambda: s.server.buffered == 0)


def test_a_response_held_back_by_shut_windows_is_charged_and_the_connection_closed() -> None:
    with serving(idle_timeout=0.3) as s:
        client = H2Client(s.port)
        # The client grants no window at all for responses, and never opens it.
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid = client.conn.get_next_available_stream_id()
        body = external_auth_pb2.CheckRequest().SerializeToString()
        client.conn.send_headers(sid, request_headers())
        client.conn.send_data(sid, grpc_prefix(len(body)) + body, end_stream=True)
        client.flush()
        client.read_until(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in client.events))
        assert s.server.buffered > 0
        terminated = client.terminated()
        assert terminated is not None and terminated.error_code == NO_ERROR
        assert s.refused("IDLE_TIMEOUT") == 1
        wait_for("the charge to go", lambda: s.server.buffered == 0)
        client.close()


def test_a_client_that_reads_nothing_is_cut_off() -> None:
    with serving(idle_timeout=0.3, handshake_timeout=0.3) as s, grpc.insecure_channel(s.target) as channel:
        real_check(channel)
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.settimeout(60)
        ended: list[str] = []

        def ping_forever() -> None:
            pings = frame(PING, 0, 0, b"pingpong") * 4096
            try:
                sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
                for _ in range(10_000):  # 700 MB: never reached unless the server keeps answering
                    sock.sendall(pings)
                ended.append("all sent")
            except OSError as err:
                ended.append(type(err).__name__)

        sender = threading.Thread(target=ping_forever, daemon=True)
        sender.start()
        # Each PING asks for a 17-byte answer; the server stops reading once a batch of answers
        # is not read, then drops the connection when it goes idle.
        sender.join(120)
        assert ended and ended[0] != "all sent", ended
        real_check(channel, "/v1/during")
        wait_for("the connection to go", lambda: s.server.open_connections == 1)
        # At least the silent reader's; on a loaded machine the channel's own connection may also
        # sit idle past 0.3 s between the two checks and be closed (and reopened) the same way.
        assert s.refused("IDLE_TIMEOUT") >= 1
        sock.close()


def test_the_connection_cap_refuses_the_excess_quietly_and_check_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kotadb.h2unary")
    before = refusals_metric("CONNECTION_LIMIT")
    with (
        serving(max_connections=8, handshake_timeout=60, log_interval=3600) as s,
        grpc.insecure_channel(s.target) as channel,
    ):
        real_check(channel)
        # Connections that never send a preface: at the cap, each new one pushes out the oldest
        # of them, so they never hold more than the free slots.
        silent = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(40)]
        wait_for("the evictions", lambda: s.refused("CONNECTION_LIMIT") >= 33)
        assert s.server.open_connections <= 8
        real_check(channel, "/v1/during-silent")
        for sock in silent:
            sock.close()
        wait_for("the silent ones to go", lambda: s.server.open_connections == 1)
        # Connections that finish the handshake fill the cap; past it, new ones are closed at once.
        held = [H2Client(s.port) for _ in range(7)]
        wait_for("the handshakes", lambda: not s.server.slots.handshaking)
        refused_before = s.refused("CONNECTION_LIMIT")
        extra = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(100)]
        assert all(closed_by_server(sock) for sock in extra)
        assert s.refused("CONNECTION_LIMIT") == refused_before + 100
        assert metrics.REGISTRY.get_sample_value("kotadb_h2_open_connections", {"service": SERVICE}) == 8
        real_check(channel, "/v1/during-full")
        for sock in extra:
            sock.close()
        for client in held:
            client.close()
        wait_for("the held ones to go", lambda: s.server.open_connections == 1)
        with grpc.insecure_channel(s.target) as fresh:
            real_check(fresh, "/v1/after")
    assert refusals_metric("CONNECTION_LIMIT") - before == s.refused("CONNECTION_LIMIT")
    # 133 refusals, one log line: the first (then at most one per log_interval).
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


# -- header blocks -------------------------------------------------------------------------------


def test_a_header_list_over_the_limit_is_refused() -> None:
    with serving() as s:
        client = H2Client(s.port)
        sid = client.conn.get_next_available_stream_id()
        # 17,000 decoded bytes in about 11 KB on the wire (Huffman): the stream is refused.
        client.conn.send_headers(sid, request_headers([("x-big", "a" * 17_000)]), end_stream=True)
        client.flush()
        ended = client.stream_end(sid)
        assert ended[":status"] == "431"
        assert ended["grpc-status"] == RESOURCE_EXHAUSTED
        assert s.refused("HEADER_LIST_TOO_LARGE") == 1
        # The connection carries on.
        ok = client.conn.get_next_available_stream_id()
        body = external_auth_pb2.CheckRequest().SerializeToString()
        client.conn.send_headers(ok, request_headers())
        client.conn.send_data(ok, grpc_prefix(len(body)) + body, end_stream=True)
        client.flush()
        assert client.stream_end(ok)["grpc-status"] == "0"
        client.close()


def test_an_oversized_header_block_ends_the_connection() -> None:
    with serving() as s:
        client = H2Client(s.port)
        sid = client.conn.get_next_available_stream_id()
        # 40 KB of random-looking values: the encoded block itself is over the limit.
        value = "".join(chr(33 + (i * 7919) % 90) for i in range(40_000))
        client.conn.send_headers(sid, request_headers([("x-big", value)]), end_stream=True)
        client.flush()
        terminated = client.terminated()
        assert terminated is not None and terminated.error_code == ENHANCE_YOUR_CALM
        assert s.refused("HEADER_LIST_TOO_LARGE") == 1
        client.close()


def _literal(raw: bytes) -> bytes:
    assert len(raw) < 127
    return bytes((len(raw),)) + raw


def test_small_blocks_that_decode_large_are_charged_in_the_request_cache() -> None:
    cap = 128 << 10
    with serving(max_connection_bytes=cap) as s:
        sock = socket.create_connection(("127.0.0.1", s.port))
        # One 4 KB entry in the dynamic table, then blocks that name it four times in a byte each
        # (index 62, the newest entry): about 40 bytes that decode to some 16 KB, each made
        # distinct by a literal without indexing, so each is a new entry of the request cache.
        table = Encoder().encode([("x-pad", "v" * 4000)])
        fixed = b"\x83\x86\x04" + _literal(CHECK_PATH.encode()) + b"\x0f\x10" + _literal(b"application/grpc")
        named = fixed + b"\xbe" * 4 + b"\x00" + _literal(b"x-i")
        blocks = [named + _literal(str(i).encode()) for i in range(64)]
        data = PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, 0x4 | 0x1, 1, fixed + table)
        data += b"".join(frame(HEADERS, 0x4 | 0x1, 3 + 2 * i, block) for i, block in enumerate(blocks))
        sock.sendall(data + frame(PING, 0, 0, b"barrier!"))
        seen = b""
        sock.settimeout(20)
        while b"barrier!" not in seen:
            chunk = sock.recv(65536)
            assert chunk, "closed before the PING answer"
            seen += chunk
        # Every one refused (header list over 16 KiB), and what the cache holds stays within the
        # connection's cap although 64 entries of 16 KB would be 1 MB.
        assert s.refused("HEADER_LIST_TOO_LARGE") == 64
        assert 0 < s.server.cached <= s.server.buffered <= cap
        sock.close()
        wait_for("the charge to go", lambda: s.server.buffered == 0 and s.server.cached == 0)


def test_a_flood_of_empty_continuation_frames_ends_the_connection() -> None:
    with serving() as s:
        sock = socket.create_connection(("127.0.0.1", s.port))
        block = Encoder().encode(request_headers())
        flood = frame(HEADERS, 0, 1, block) + frame(CONTINUATION, 0, 1) * 100_000
        with contextlib.suppress(OSError):
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + flood)
        seen = b""
        sock.settimeout(20)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                seen += chunk
        goaway = seen.find(bytes((GOAWAY,)) + b"\x00\x00\x00\x00\x00", 0)
        assert goaway >= 3
        code = struct.unpack_from(">L", seen, goaway + 6 + 4)[0]
        assert code == ENHANCE_YOUR_CALM
        # The block was cut off after about max_header_block / FRAME_COST fragments.
        assert s.refused("HEADER_LIST_TOO_LARGE") == 1
        assert (16 << 10) // FRAME_COST < 100_000
        sock.close()


# -- a fuzz of frame sequences -------------------------------------------------------------------

_ENCODER_BLOCK = Encoder().encode(request_headers())
_CHECK_BODY = external_auth_pb2.CheckRequest().SerializeToString()

frames = st.one_of(
    # Arbitrary frames: any type (known or not), flags, small stream ids, short payloads.
    st.builds(
        frame,
        st.integers(0, 12),
        st.integers(0, 255),
        st.sampled_from([0, 1, 3, 5, 2, 0x7FFFFFFF]),
        st.binary(max_size=64),
    ),
    # Well-formed request pieces, so sequences reach streams, bodies and answers.
    st.builds(
        lambda sid, end: frame(HEADERS, 0x4 | (0x1 if end else 0), sid, _ENCODER_BLOCK),
        st.sampled_from([1, 3, 5, 7]),
        st.booleans(),
    ),
    st.builds(
        lambda sid, n, end: frame(DATA, 0x1 if end else 0, sid, grpc_prefix(n) + _CHECK_BODY[:n]),
        st.sampled_from([1, 3, 5, 7]),
        st.sampled_from([0, 2, 60_000, 1 << 20]),
        st.booleans(),
    ),
    st.builds(lambda sid: frame(DATA, 0, sid, b"ab"), st.sampled_from([1, 3, 5, 7])),
    st.builds(lambda sid: frame(CONTINUATION, 0, sid), st.sampled_from([1, 3])),
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[Served, grpc.Channel]]:
    limits = {"handshake_timeout": 1.0, "idle_timeout": 0.5, "max_connection_bytes": 128 << 10}
    with serving(**limits) as s:
        with grpc.insecure_channel(s.target) as channel:
            yield s, channel
        # With the last connection gone, nothing at all is charged.
        wait_for("the last charge to go", lambda: s.server.buffered == 0 and s.server.cached == 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    preface=st.sampled_from(["full", "none", "truncated"]),
    sequence=st.lists(frames, max_size=40),
    repeat=st.integers(1, 50),
)
def test_fuzzed_frame_sequences_leave_the_server_whole(
    fuzzed: tuple[Served, grpc.Channel], preface: str, sequence: list[bytes], repeat: int
) -> None:
    s, channel = fuzzed
    sock = socket.create_connection(("127.0.0.1", s.port))
    start = {"full": PREFACE + frame(SETTINGS, 0, 0), "none": b"", "truncated": PREFACE[:7]}[preface]
    with contextlib.suppress(OSError):
        sock.sendall(start + b"".join(sequence) * repeat)
    # During: the charge is within its caps and a real Check is answered.
    assert s.server.buffered <= s.server.limits.max_total_bytes
    real_check(channel)
    # The server ends every such connection (an error, the handshake timeout or the idle one).
    assert closed_by_server(sock)
    sock.close()
    # After: nothing is left charged or open but the grpcio channel's connection.
    wait_for("the fuzzed connection to go", lambda: s.server.open_connections <= 1)
    wait_for("the charge to go", lambda: s.server.buffered == s.server.cached)
    real_check(channel)
