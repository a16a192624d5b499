"""The lean h2c unary gRPC server: real grpcio clients for the gRPC behaviour, raw sockets for HTTP/2.

grpcio channels (sync and aio) check what callers see: messages both ways, sizes past the flow
control windows, metadata, status codes and messages. A raw HTTP/2 client written here (HPACK
from the `hpack` package) checks what grpcio never sends: protocol errors and their GOAWAY codes,
PING, RST_STREAM of a pending call, CONTINUATION and padding, flow control held back by the peer's
windows, refused streams, and the GOAWAY of a graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hpack import Decoder, Encoder

from services.common.h2limits import H2Limits
from services.common.h2unary import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2UnaryServer,
    RpcError,
)

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
MAX_MESSAGE = 4 << 20
DENIED = "no access for key kd_1: ü 100%\nsecond line"
SECRET = "secret-detail-hunter2"


@dataclass
class Holder:
    """Holder lets a test keep calls of /t.Test/Hold open until it releases them."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def _methods(holder: Holder) -> dict[str, object]:
    def echo(message: bytes, headers: Mapping[str, str]) -> bytes:
        return message

    def meta(message: bytes, headers: Mapping[str, str]) -> bytes:
        return json.dumps(dict(headers)).encode()

    def big(message: bytes, headers: Mapping[str, str]) -> bytes:
        return bytes(range(256)) * (int(message) // 256)

    async def async_echo(message: bytes, headers: Mapping[str, str]) -> bytes:
        await asyncio.sleep(0)
        return message[::-1]

    def deny(message: bytes, headers: Mapping[str, str]) -> bytes:
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED, DENIED)

    async def async_deny(message: bytes, headers: Mapping[str, str]) -> bytes:
        await asyncio.sleep(0)
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "bad key")

    def boom(message: bytes, headers: Mapping[str, str]) -> bytes:
        raise RuntimeError(SECRET)

    async def async_boom(message: bytes, headers: Mapping[str, str]) -> bytes:
        await asyncio.sleep(0)
        raise ValueError(SECRET)

    async def hold(message: bytes, headers: Mapping[str, str]) -> bytes:
        holder.entered.set()
        try:
            await holder.release.wait()
        except asyncio.CancelledError:
            holder.cancelled.set()
            raise
        return b"released:" + message

    return {
        "/t.Test/Echo": echo,
        "/t.Test/Meta": meta,
        "/t.Test/Big": big,
        "/t.Test/AsyncEcho": async_echo,
        "/t.Test/Deny": deny,
        "/t.Test/AsyncDeny": async_deny,
        "/t.Test/Boom": boom,
        "/t.Test/AsyncBoom": async_boom,
        "/t.Test/Hold": hold,
    }


@dataclass
class Served:
    server: H2UnaryServer
    port: int
    holder: Holder

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _serve(max_streams: int = 1000) -> Served:
    holder = Holder()
    limits = H2Limits(max_message=MAX_MESSAGE, max_streams=max_streams)
    server = H2UnaryServer(_methods(holder), limits=limits)  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    return Served(server, port, holder)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = await _serve()
    yield s
    s.holder.release.set()
    await s.server.stop(1.0)


# -- a raw HTTP/2 client ---------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def grpc_body(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">L", len(message)) + message


@dataclass
class Frame:
    ftype: int
    flags: int
    sid: int
    payload: bytes

    def error_code(self) -> int:
        offset = 4 if self.ftype == GOAWAY else 0
        code: int = struct.unpack_from(">L", self.payload, offset)[0]
        return code


class RawClient:
    """RawClient speaks HTTP/2 frame by frame over a plain socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()
        self.decoder = Decoder()

    @classmethod
    async def connect(cls, port: int, *, settings: bytes = b"", preface: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if preface:
            client.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request_block(self, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
        block: bytes = self.encoder.encode(headers)
        return block

    def call(self, sid: int, path: str, message: bytes) -> None:
        self.send(
            frame(HEADERS, END_HEADERS, sid, self.request_block(path))
            + frame(DATA, END_STREAM, sid, grpc_body(message))
        )

    async def read_frame(self) -> Frame | None:
        """read_frame is the next frame, or None when the server closed the connection."""
        try:
            async with asyncio.timeout(5):
                head = await self.reader.readexactly(9)
                n = head[0] << 16 | head[1] << 8 | head[2]
                payload = await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return None
        sid = struct.unpack_from(">L", head, 5)[0] & 0x7FFFFFFF
        return Frame(head[3], head[4], sid, payload)

    async def until(self, ftype: int, sid: int | None = None) -> Frame:
        """until skips frames (decoding header blocks) up to the first of ftype (on sid)."""
        while True:
            f = await self.read_frame()
            assert f is not None, f"connection closed before a frame of type {ftype}"
            if f.ftype == HEADERS:
                f.payload = self.headers_dict_bytes(f.payload)
            if f.ftype == ftype and (sid is None or f.sid == sid):
                return f

    def headers_dict_bytes(self, block: bytes) -> bytes:
        return json.dumps(dict(self.decoder.decode(block))).encode()

    async def response(self, sid: int) -> tuple[dict[str, str], bytes, dict[str, str]]:
        """response collects one stream's headers, DATA and trailers (trailers-only: empty first)."""
        headers: dict[str, str] = {}
        body = b""
        while True:
            f = await self.until_stream(sid)
            if f.ftype == HEADERS:
                decoded = json.loads(f.payload)
                if f.flags & END_STREAM:
                    return headers, body, decoded
                headers = decoded
            elif f.ftype == DATA:
                body += f.payload
            elif f.ftype == RST_STREAM:
                raise AssertionError(f"stream {sid} reset with {f.error_code()}")

    async def until_stream(self, sid: int) -> Frame:
        while True:
            f = await self.read_frame()
            assert f is not None, f"connection closed while waiting for stream {sid}"
            if f.ftype == HEADERS:
                f.payload = self.headers_dict_bytes(f.payload)
            if f.sid == sid and f.ftype in (HEADERS, DATA, RST_STREAM):
                return f

    async def goaway(self) -> Frame:
        """goaway reads up to the server's GOAWAY and checks that the connection then closes."""
        f = await self.until(GOAWAY)
        rest = await self.read_frame()
        assert rest is None, f"frame after GOAWAY: {rest}"
        return f

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def message_of(body: bytes) -> bytes:
    assert body[0] == 0
    (length,) = struct.unpack_from(">L", body, 1)
    assert len(body) == 5 + length
    return body[5:]


# -- grpcio clients --------------------------------------------------------------------------


def rpc(channel: Any, path: str) -> Any:
    """rpc is a bytes-in, bytes-out unary callable for path on a sync or aio channel."""
    return channel.unary_unary(path)


async def test_sync_channel_echo_and_metadata(served: Served) -> None:
    def calls() -> tuple[bytes, dict[str, str]]:
        with grpc.insecure_channel(served.target) as channel:
            echoed = rpc(channel, "/t.Test/Echo")(b"hello", timeout=5)
            raw = rpc(channel, "/t.Test/Meta")(
                b"", metadata=(("x-request-id", "r-42"), ("x-tenant", "acme")), timeout=5
            )
            return echoed, json.loads(raw)

    echoed, headers = await asyncio.to_thread(calls)
    assert echoed == b"hello"
    assert headers["x-request-id"] == "r-42"
    assert headers["x-tenant"] == "acme"
    assert headers["content-type"].startswith("application/grpc")
    assert not any(name.startswith(":") for name in headers)


async def test_aio_channel_concurrent_large_and_async_calls(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        echo = rpc(channel, "/t.Test/Echo")
        requests = [bytes([i % 251]) * (i * 37 % 3000) for i in range(200)]
        replies = await asyncio.gather(*(echo(r, timeout=10) for r in requests))
        assert replies == requests
        assert served.server.connections == 1

        # Requests past a 16 KiB frame and the 64 KiB default windows, a response past the
        # client's windows (split into DATA frames the client's windows allow).
        for size in (20_000, 100_000, 1 << 20):
            payload = bytes(range(256)) * (size // 256) + b"!"
            assert await echo(payload, timeout=10) == payload
        big = await rpc(channel, "/t.Test/Big")(str(3 << 20).encode(), timeout=10)
        assert big == bytes(range(256)) * ((3 << 20) // 256)

        async_echo = rpc(channel, "/t.Test/AsyncEcho")
        assert await async_echo(b"abc", timeout=5) == b"cba"
        many = await asyncio.gather(*(async_echo(str(i).encode(), timeout=10) for i in range(100)))
        assert many == [str(i).encode()[::-1] for i in range(100)]


async def test_status_codes_at_the_client(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:

        async def fails(path: str, message: bytes = b"x") -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(channel, path)(message, timeout=5)
            return info.value

        err = await fails("/t.Test/Deny")
        assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED)
        err = await fails("/t.Test/AsyncDeny")
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "bad key")
        for path in ("/t.Test/Boom", "/t.Test/AsyncBoom"):
            err = await fails(path)
            assert err.code() == grpc.StatusCode.INTERNAL
            assert SECRET not in (err.details() or "")
        assert SECRET in caplog.text
        err = await fails("/t.Test/Missing")
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        err = await fails("/t.Test/Echo", b"y" * (MAX_MESSAGE + 1))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection survives every one of those.
        assert await rpc(channel, "/t.Test/Echo")(b"still", timeout=5) == b"still"
    assert served.server.connections == 1
    assert served.server.errors == 6


async def test_compressed_requests_are_unimplemented(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.target, compression=grpc.Compression.Gzip) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(channel, "/t.Test/Echo")(b"z" * 1000, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- raw HTTP/2 ------------------------------------------------------------------------------


async def test_bad_preface_is_a_protocol_error(served: Served) -> None:
    client = await RawClient.connect(served.port, preface=False)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.goaway()).error_code() == PROTOCOL_ERROR
    await client.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # The first frame after the preface must be SETTINGS.
        (lambda c: PREFACE + frame(PING, 0, 0, b"12345678"), PROTOCOL_ERROR),
        (lambda c: frame(DATA, END_STREAM, 0, b"abc"), PROTOCOL_ERROR),
        (lambda c: frame(HEADERS, END_HEADERS, 0, c.request_block("/t.Test/Echo")), PROTOCOL_ERROR),
        (lambda c: frame(HEADERS, END_HEADERS, 2, c.request_block("/t.Test/Echo")), PROTOCOL_ERROR),
        (lambda c: frame(RST_STREAM, 0, 0, struct.pack(">L", CANCEL)), PROTOCOL_ERROR),
        (lambda c: frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
        (lambda c: frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), PROTOCOL_ERROR),
        (lambda c: frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 31) - 1)), FLOW_CONTROL_ERROR),
        (lambda c: frame(PING, 0, 0, b"1234"), FRAME_SIZE_ERROR),
        (lambda c: frame(DATA, 0, 1, b"x" * 16385), FRAME_SIZE_ERROR),
        (lambda c: frame(CONTINUATION, END_HEADERS, 1, b""), PROTOCOL_ERROR),
        (lambda c: frame(DATA, 0, 7, b"x"), PROTOCOL_ERROR),
        (lambda c: frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), COMPRESSION_ERROR),
        # HEADERS without END_HEADERS must be followed by CONTINUATION on the same stream.
        (
            lambda c: frame(HEADERS, 0, 1, c.request_block("/t.Test/Echo")) + frame(PING, 0, 0, b"12345678"),
            PROTOCOL_ERROR,
        ),
    ],
    ids=[
        "not-settings-first",
        "data-on-stream-0",
        "headers-on-stream-0",
        "even-stream-id",
        "rst-on-stream-0",
        "settings-on-a-stream",
        "zero-window-increment",
        "window-overflow",
        "short-ping",
        "oversized-frame",
        "stray-continuation",
        "data-on-idle-stream",
        "bad-hpack",
        "interrupted-header-block",
    ],
)
async def test_protocol_errors_end_with_goaway(served: Served, frames: object, code: int) -> None:
    make = frames
    assert callable(make)
    probe = RawClient(*(await asyncio.open_connection("127.0.0.1", served.port)))
    data: bytes = make(probe)
    if not data.startswith(PREFACE):
        data = PREFACE + frame(SETTINGS, 0, 0) + data
    probe.send(data)
    goaway = await probe.goaway()
    assert goaway.error_code() == code
    await probe.close()


async def test_reused_stream_id_is_a_protocol_error(served: Served) -> None:
    client = await RawClient.connect(served.port)
    client.call(1, "/t.Test/Echo", b"one")
    _, body, trailers = await client.response(1)
    assert message_of(body) == b"one" and trailers["grpc-status"] == "0"
    client.call(1, "/t.Test/Echo", b"again")
    goaway = await client.goaway()
    assert goaway.error_code() == PROTOCOL_ERROR
    assert struct.unpack_from(">L", goaway.payload)[0] == 1  # last stream id
    await client.close()


async def test_settings_ping_and_a_plain_call(served: Served) -> None:
    client = await RawClient.connect(served.port)
    settings = await client.until(SETTINGS)
    assert not settings.flags & ACK
    values = dict(struct.iter_unpack(">HL", settings.payload))
    assert values[0x3] == 1000  # MAX_CONCURRENT_STREAMS
    assert values[0x4] >= 1 << 20  # INITIAL_WINDOW_SIZE
    assert 0x6 in values  # MAX_HEADER_LIST_SIZE
    update = await client.until(WINDOW_UPDATE, 0)
    assert struct.unpack(">L", update.payload)[0] > 0
    ack = await client.until(SETTINGS)
    assert ack.flags & ACK and not ack.payload

    client.send(frame(PING, 0, 0, b"pingpong"))
    pong = await client.until(PING)
    assert (pong.flags, pong.payload) == (ACK, b"pingpong")

    client.call(1, "/t.Test/Echo", b"raw")
    headers, body, trailers = await client.response(1)
    assert headers == {":status": "200", "content-type": "application/grpc"}
    assert message_of(body) == b"raw"
    assert trailers == {"grpc-status": "0"}
    await client.close()


async def test_continuation_padding_priority_and_unknown_frames(served: Served) -> None:
    client = await RawClient.connect(served.port)
    block = client.request_block("/t.Test/Meta", [("x-long", "v" * 300)])
    priority = struct.pack(">LB", 0, 15)
    pad = 7
    # HEADERS (padded, with priority) + two CONTINUATIONs, an unknown frame type between DATA
    # frames, a PRIORITY frame, and padded DATA split in two.
    client.send(
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes((pad,)) + priority + block[:100] + b"\x00" * pad)
        + frame(CONTINUATION, 0, 1, block[100:200])
        + frame(CONTINUATION, END_HEADERS, 1, block[200:])
        + frame(PRIORITY, 0, 1, struct.pack(">LB", 0, 1))
        + frame(DATA, PADDED, 1, b"\x03" + b"\x00\x00\x00" + b"\x00\x00\x00")
        + frame(0xEE, 0x5, 1, b"whatever")
        + frame(DATA, END_STREAM, 1, b"\x00\x00")
    )
    _, body, trailers = await client.response(1)
    assert trailers["grpc-status"] == "0"
    assert json.loads(message_of(body))["x-long"] == "v" * 300
    await client.close()


def _literal(raw: bytes) -> bytes:
    assert len(raw) < 127
    return bytes((len(raw),)) + raw


async def test_repeated_header_blocks_follow_the_dynamic_table(served: Served) -> None:
    # The server remembers what a table-neutral header block meant; a block that changes the
    # dynamic table must make it forget, because the same bytes then mean other headers.
    client = await RawClient.connect(served.port)
    fixed = (
        b"\x83\x86"  # :method POST, :scheme http (static table)
        + b"\x04"
        + _literal(b"/t.Test/Meta")  # :path, literal without indexing
        + b"\x0f\x10"
        + _literal(b"application/grpc")  # content-type, literal without indexing
    )
    index_a = b"\x40" + _literal(b"x-v") + _literal(b"a")  # literal with incremental indexing
    index_b = b"\x40" + _literal(b"x-v") + _literal(b"b")
    newest = b"\xbe"  # dynamic table entry 62: the newest entry
    for sid, block, expected in [
        (1, fixed + index_a, "a"),
        (3, fixed + newest, "a"),
        (5, fixed + newest, "a"),
        (7, fixed + index_b, "b"),
        (9, fixed + newest, "b"),
    ]:
        client.send(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, grpc_body(b"")))
        _, body, trailers = await client.response(sid)
        assert trailers["grpc-status"] == "0"
        assert json.loads(message_of(body))["x-v"] == expected, sid
    await client.close()


async def test_grpc_request_checks(served: Served) -> None:
    client = await RawClient.connect(served.port)
    # Wrong content-type: HTTP 415.
    block = client.encoder.encode(
        [(":method", "POST"), (":scheme", "http"), (":path", "/t.Test/Echo"), ("content-type", "text/plain")]
    )
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    _, _, trailers = await client.response(1)
    assert trailers[":status"] == "415"
    # GET: HTTP 405.
    block = client.encoder.encode(
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/t.Test/Echo"),
            ("content-type", "application/grpc"),
        ]
    )
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    _, _, trailers = await client.response(3)
    assert trailers[":status"] == "405"
    # No message at all, two messages, a truncated message, a compressed-flag message.
    cases = [
        (b"", "12"),
        (grpc_body(b"a") + grpc_body(b"b"), "12"),
        (grpc_body(b"abcdef")[:-2], "13"),
        (b"\x01" + grpc_body(b"abc")[1:], "12"),
    ]
    for i, (body, status) in enumerate(cases):
        sid = 5 + 2 * i
        client.send(frame(HEADERS, END_HEADERS, sid, client.request_block("/t.Test/Echo")))
        client.send(frame(DATA, END_STREAM, sid, body))
        headers, data, trailers = await client.response(sid)
        assert (headers, data) == ({}, b""), "errors are trailers-only"
        assert trailers[":status"] == "200"
        assert trailers["grpc-status"] == status, (i, trailers)
    # A message declared larger than max_message is refused as soon as its prefix arrives: the
    # stream is answered and reset while the client has not finished sending.
    client.send(frame(HEADERS, END_HEADERS, 13, client.request_block("/t.Test/Echo")))
    client.send(frame(DATA, 0, 13, b"\x00" + struct.pack(">L", MAX_MESSAGE + 1) + b"x" * 100))
    first = await client.until_stream(13)
    assert json.loads(first.payload)["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    reset = await client.until_stream(13)
    assert (reset.ftype, reset.error_code()) == (RST_STREAM, NO_ERROR)
    # More DATA the client had in flight is dropped; the connection carries on.
    client.send(frame(DATA, END_STREAM, 13, b"x" * 1000))
    client.call(15, "/t.Test/Echo", b"ok")
    _, body, _ = await client.response(15)
    assert message_of(body) == b"ok"
    await client.close()


async def test_client_reset_cancels_a_pending_call(served: Served) -> None:
    client = await RawClient.connect(served.port)
    client.call(1, "/t.Test/Hold", b"x")
    await asyncio.wait_for(served.holder.entered.wait(), 5)
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">L", CANCEL)))
    await asyncio.wait_for(served.holder.cancelled.wait(), 5)
    client.call(3, "/t.Test/Echo", b"after")
    _, body, _ = await client.response(3)
    assert message_of(body) == b"after"
    await client.close()


async def test_response_waits_for_the_peers_windows(served: Served) -> None:
    # A 10-byte stream window and the default 65,535-byte connection window.
    client = await RawClient.connect(served.port, settings=struct.pack(">HL", 0x4, 10))
    size = 70_000 - 70_000 % 256
    client.call(1, "/t.Test/Big", str(size).encode())
    await client.until(HEADERS, 1)
    first = await client.until(DATA, 1)
    assert len(first.payload) == 10
    # Raising SETTINGS_INITIAL_WINDOW_SIZE by 20 lets exactly 20 more bytes out.
    client.send(frame(SETTINGS, 0, 0, struct.pack(">HL", 0x4, 30)))
    second = await client.until(DATA, 1)
    assert len(second.payload) == 20
    # A large stream increment: now the connection window (65,535 in all) is the limit, and no
    # DATA frame is larger than the default 16 KiB maximum frame size.
    client.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 1 << 20)))
    received = 30
    while received < 65_535:
        f = await client.until(DATA, 1)
        assert len(f.payload) <= 16384
        received += len(f.payload)
    assert received == 65_535
    # Nothing more until the connection window grows: the PING answer comes before any DATA.
    client.send(frame(PING, 0, 0, b"barrier!"))
    while (seen := await client.read_frame()) is not None and seen.ftype != PING:
        assert seen.ftype != DATA, "DATA beyond the connection window"
    client.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20)))
    body = first.payload + second.payload
    _, rest, trailers = await client.response(1)
    assert trailers == {"grpc-status": "0"}
    assert len(body) + 65_535 - 30 + len(rest) == size + 5
    await client.close()


async def test_max_streams_refuses_extra_streams() -> None:
    s = await _serve(max_streams=1)
    try:
        client = await RawClient.connect(s.port)
        client.call(1, "/t.Test/Hold", b"a")
        client.call(3, "/t.Test/Hold", b"b")
        reset = await client.until(RST_STREAM, 3)
        assert reset.error_code() == REFUSED_STREAM
        s.holder.release.set()
        _, body, _ = await client.response(1)
        assert message_of(body) == b"released:a"
        await client.close()
    finally:
        s.holder.release.set()
        await s.server.stop(1.0)


async def test_stop_finishes_in_flight_calls_and_refuses_new_streams() -> None:
    s = await _serve()
    async with grpc.aio.insecure_channel(s.target) as channel:
        in_flight = asyncio.ensure_future(rpc(channel, "/t.Test/Hold")(b"grpc", timeout=10))
        await asyncio.wait_for(s.holder.entered.wait(), 5)
        client = await RawClient.connect(s.port)
        client.call(1, "/t.Test/Hold", b"raw")
        await client.until(SETTINGS)
        client.send(frame(PING, 0, 0, b"barrier!"))
        await client.until(PING)

        stopping = asyncio.ensure_future(s.server.stop(10.0))
        goaway = await client.until(GOAWAY)
        assert struct.unpack_from(">LL", goaway.payload) == (1, NO_ERROR)
        client.call(3, "/t.Test/Echo", b"late")
        reset = await client.until(RST_STREAM, 3)
        assert reset.error_code() == REFUSED_STREAM
        assert not stopping.done()

        s.holder.release.set()
        assert await in_flight == b"released:grpc"
        _, body, trailers = await client.response(1)
        assert message_of(body) == b"released:raw" and trailers["grpc-status"] == "0"
        assert await client.read_frame() is None  # closed once its last call finished
        await asyncio.wait_for(stopping, 5)
        await client.close()
    with pytest.raises(OSError):
        await RawClient.connect(s.port)
